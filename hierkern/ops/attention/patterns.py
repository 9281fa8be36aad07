"""Interval-attention mask semantics on the host (mirror of csrc/interval.h; keep the two in step).

Query row r sees at most two contiguous key ranges, derived from cumulative segment offsets, a pattern
id and a block size. These helpers are used for host-side tile schedules and by the reference (which
expands them into an explicit mask: the only place an L x L tensor may exist).

The block patterns read the offsets as document offsets (cu_seqlens): documents are packed one after
another and never attend to each other. A skip-causal document holds 2N tokens, noisy x_t and clean
x_0, in blocks of block_size (which divides N): noisy block i sees itself and clean blocks < i; clean
block i sees clean blocks <= i.
"""
from bisect import bisect_right

SEGMENT_CAUSAL = 0     # row of segment i sees [0, end_i)            (VAR, Infinity, FlexVAR)
SEGMENT_DIAGONAL = 1   # row of segment i sees [start_i, end_i)      (HMAR, M-VAR intra-scale)
SKIP_NOISY_FIRST = 2   # documents [x_t ; x_0]                        (BD3-LM, SDAR, Fast-dLLM v2)
SKIP_CLEAN_FIRST = 3   # documents [x_0 ; x_t]                        (ACDiT SCAM)
BLOCK_CAUSAL = 4       # row r of a document sees keys < (r // B + 1) * B, clamped to the document end

PATTERN_NAMES = {SEGMENT_CAUSAL: "segment_causal", SEGMENT_DIAGONAL: "segment_diagonal",
                 SKIP_NOISY_FIRST: "skip_noisy_first", SKIP_CLEAN_FIRST: "skip_clean_first",
                 BLOCK_CAUSAL: "block_causal"}
SEGMENT_PATTERNS = (SEGMENT_CAUSAL, SEGMENT_DIAGONAL)
SKIP_PATTERNS = (SKIP_NOISY_FIRST, SKIP_CLEAN_FIRST)
BLOCK_PATTERNS = (SKIP_NOISY_FIRST, SKIP_CLEAN_FIRST, BLOCK_CAUSAL)


def segment_of(offsets, r):
    """Index i of the segment with offsets[i] <= r < offsets[i + 1]."""
    return bisect_right(offsets, r) - 1


def row_key_ranges(offsets, pattern, r, block_size=0):
    """((lo0, hi0), (lo1, hi1)) keys visible to query row r, ascending; an empty range has lo >= hi."""
    s = segment_of(offsets, r)
    a, e = offsets[s], offsets[s + 1]
    if pattern in SEGMENT_PATTERNS:
        return (0 if pattern == SEGMENT_CAUSAL else a, e), (0, 0)
    B, x = block_size, r - a
    if pattern == BLOCK_CAUSAL:
        return (a, min(a + (x // B + 1) * B, e)), (0, 0)
    n = (e - a) // 2
    noisy = (x < n) == (pattern == SKIP_NOISY_FIRST)
    clean0 = a + n if pattern == SKIP_NOISY_FIRST else a
    i = (x if x < n else x - n) // B
    if not noisy:
        return (clean0, clean0 + (i + 1) * B), (0, 0)
    own = (r - x % B, r - x % B + B)
    prefix = (clean0, clean0 + i * B)
    return (own, prefix) if pattern == SKIP_NOISY_FIRST else (prefix, own)


def key_query_ranges(offsets, pattern, j, block_size=0):
    """((lo0, hi0), (lo1, hi1)) query rows that see key j (the transpose of row_key_ranges)."""
    s = segment_of(offsets, j)
    a, e = offsets[s], offsets[s + 1]
    if pattern in SEGMENT_PATTERNS:
        return (a, offsets[-1] if pattern == SEGMENT_CAUSAL else e), (0, 0)
    B, y = block_size, j - a
    if pattern == BLOCK_CAUSAL:
        return (j - y % B, e), (0, 0)
    n = (e - a) // 2
    noisy = (y < n) == (pattern == SKIP_NOISY_FIRST)
    i = (y if y < n else y - n) // B
    if noisy:
        return (j - y % B, j - y % B + B), (0, 0)
    if pattern == SKIP_NOISY_FIRST:
        return (a + (i + 1) * B, a + n), (a + n + i * B, e)
    return (a + i * B, a + n), (a + n + (i + 1) * B, e)


def visible_pairs(offsets, pattern, block_size=0):
    """Number of (query, key) pairs the mask allows: the useful work for FLOP counts."""
    total = 0
    for i in range(len(offsets) - 1):
        n = offsets[i + 1] - offsets[i]
        if pattern in SEGMENT_PATTERNS:
            total += n * (offsets[i + 1] if pattern == SEGMENT_CAUSAL else n)
        elif pattern in SKIP_PATTERNS:
            half = n // 2
            total += half * half + half * block_size  # N^2 + N*B per document
        else:  # block-causal: each block's rows see every key up to the block's end
            total += sum((min(b0 + block_size, n) - b0) * min(b0 + block_size, n)
                         for b0 in range(0, n, block_size))
    return total
