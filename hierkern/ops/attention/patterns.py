"""Interval-attention mask semantics on the host (mirror of csrc/interval.h; keep the two in step).

Query row r sees at most two contiguous key ranges, derived from cumulative segment offsets, a pattern
id and a block size. These helpers are used for host-side tile schedules and by the reference (which
expands them into an explicit mask: the only place an L x L tensor may exist).
"""
from bisect import bisect_right

SEGMENT_CAUSAL = 0    # row of segment i sees [0, end_i)            (VAR, Infinity, FlexVAR)
SEGMENT_DIAGONAL = 1  # row of segment i sees [start_i, end_i)      (HMAR, M-VAR intra-scale)

PATTERN_NAMES = {SEGMENT_CAUSAL: "segment_causal", SEGMENT_DIAGONAL: "segment_diagonal"}


def segment_of(offsets, r):
    """Index i of the segment with offsets[i] <= r < offsets[i + 1]."""
    return bisect_right(offsets, r) - 1


def row_key_ranges(offsets, pattern, r):
    """((lo0, hi0), (lo1, hi1)) keys visible to query row r; an empty range has lo >= hi."""
    s = segment_of(offsets, r)
    hi = offsets[s + 1]
    lo = 0 if pattern == SEGMENT_CAUSAL else offsets[s]
    return (lo, hi), (0, 0)


def key_query_ranges(offsets, pattern, j):
    """((lo0, hi0), (lo1, hi1)) query rows that see key j (the transpose of row_key_ranges)."""
    s = segment_of(offsets, j)
    hi = offsets[-1] if pattern == SEGMENT_CAUSAL else offsets[s + 1]
    return (offsets[s], hi), (0, 0)


def visible_pairs(offsets, pattern):
    """Number of (query, key) pairs the mask allows: the useful work for FLOP counts."""
    total = 0
    for i in range(len(offsets) - 1):
        n = offsets[i + 1] - offsets[i]
        total += n * (offsets[i + 1] if pattern == SEGMENT_CAUSAL else n)
    return total
