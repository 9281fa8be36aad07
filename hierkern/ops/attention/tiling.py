"""Host-side tile schedules for the Triton interval-attention kernels.

Scale-aligned tiling: consecutive small segments are packed into one query tile (VAR's first six
scales, 91 tokens, share a single 128-row tile) and big segments are split into full tiles, instead of
cutting the sequence at multiples of 128. Tiles are launched longest-first (most key work first) so
the big tiles do not trail at the end of the grid. Schedules are tiny (tens of rows) and cached.
"""
from functools import lru_cache

import torch

from .patterns import SEGMENT_PATTERNS, key_query_ranges, row_key_ranges


def _check_segment_pattern(pattern):
    # The union helpers below assume ranges monotone within a segment, true of the segment patterns
    # only; the Triton kernels take no block pattern yet (skip_causal.py refuses impl="triton").
    if pattern not in SEGMENT_PATTERNS:
        raise NotImplementedError(f"tiling: no Triton tile schedule for interval pattern {pattern}")


def _union_keys(offsets, pattern, r0, r1):
    lo, hi = None, 0
    # Row ranges are monotone within a segment, so the first/last row of each segment bound the union.
    for r in {r0, r1 - 1} | {o for o in offsets if r0 <= o < r1} | {o - 1 for o in offsets if r0 < o <= r1}:
        for a, b in row_key_ranges(offsets, pattern, r):
            if b > a:
                lo = a if lo is None else min(lo, a)
                hi = max(hi, b)
    return (lo or 0), hi


def _union_queries(offsets, pattern, c0, c1):
    lo, hi = None, 0
    for j in {c0, c1 - 1} | {o for o in offsets if c0 <= o < c1} | {o - 1 for o in offsets if c0 < o <= c1}:
        for a, b in key_query_ranges(offsets, pattern, j):
            if b > a:
                lo = a if lo is None else min(lo, a)
                hi = max(hi, b)
    return (lo or 0), hi


def query_row_blocks(offsets, block_m):
    """Scale-aligned query tiles [(r0, r1)]: whole small segments packed, big ones split."""
    tiles = []
    cur0 = cur1 = 0
    for i in range(len(offsets) - 1):
        s0, s1 = offsets[i], offsets[i + 1]
        n = s1 - s0
        if n <= block_m and cur1 - cur0 + n <= block_m:
            cur1 = s1
            continue
        if cur1 > cur0:
            tiles.append((cur0, cur1))
        if n <= block_m:
            cur0, cur1 = s0, s1
            continue
        n_full, rem = divmod(n, block_m)
        for t in range(n_full):
            tiles.append((s0 + t * block_m, s0 + (t + 1) * block_m))
        cur0, cur1 = s1 - rem, s1
    if cur1 > cur0:
        tiles.append((cur0, cur1))
    return tiles


@lru_cache(maxsize=256)
def _q_schedule(offsets, pattern, block_m):
    _check_segment_pattern(pattern)
    rows = []
    for r0, r1 in query_row_blocks(offsets, block_m):
        k0, k1 = _union_keys(offsets, pattern, r0, r1)
        rows.append((r0, r1, k0, k1))
    rows.sort(key=lambda t: (-(t[3] - t[2]), t[0]))  # longest key span first
    return tuple(rows)


@lru_cache(maxsize=256)
def _k_schedule(offsets, pattern, block_n):
    _check_segment_pattern(pattern)
    rows = []
    L = offsets[-1]
    for c0 in range(0, L, block_n):
        c1 = min(L, c0 + block_n)
        q0, q1 = _union_queries(offsets, pattern, c0, c1)
        rows.append((c0, c1, q0, q1))
    rows.sort(key=lambda t: (-(t[3] - t[2]), t[0]))
    return tuple(rows)


def q_tiles(offsets, pattern, block_m, device):
    """(n, 4) int32 rows (q_start, q_end, k_start, k_end), longest first, for the fwd and dQ passes."""
    return _as_tensor(_q_schedule(tuple(offsets), int(pattern), int(block_m)), device)


def k_tiles(offsets, pattern, block_n, device):
    """(n, 4) int32 rows (k_start, k_end, q_start, q_end) of full-size key tiles for the dK/dV pass."""
    return _as_tensor(_k_schedule(tuple(offsets), int(pattern), int(block_n)), device)


_TENSOR_CACHE = {}


def _as_tensor(rows, device):
    key = (rows, str(device))
    t = _TENSOR_CACHE.get(key)
    if t is None:
        t = torch.tensor(rows, dtype=torch.int32).reshape(-1, 4).to(device)
        if len(_TENSOR_CACHE) > 512:
            _TENSOR_CACHE.clear()
        _TENSOR_CACHE[key] = t
    return t
