"""Host-side tile schedules for the Triton interval-attention kernels.

Every schedule row carries one tile and the (at most two) spans of the other axis that its rows see:
q tiles (q_start, q_end, k0_start, k0_end, k1_start, k1_end) for the forward and dQ passes, k tiles
(k_start, k_end, q0_start, q0_end, q1_start, q1_end) for the dK/dV pass. Span t is the hull of the
tile's t-th ranges (ranges are ascending, so spans are too); an unused span is (0, 0).

Segment patterns (next-scale): scale-aligned tiling: consecutive small segments are packed into one
query tile (VAR's first six scales, 91 tokens, share a single 128-row tile) and big segments are split
into full tiles, instead of cutting the sequence at multiples of 128. A row sees one key range, so the
second span stays empty.

Block patterns (skip-causal, block-causal): tiles are cut at document boundaries and, for skip-causal,
at each document's noisy/clean midpoint, so every tile is homogeneous (all noisy or all clean rows of
one document) and the union of its rows' ranges is two tight spans: a noisy tile visits exactly the
union of its rows' own blocks plus the clean prefix, never the gap between them (with block_size 4 a
128-row noisy tile's own-block span is its own 128 keys, not the whole noisy half).

Tiles are launched longest-first (most work first) so the big tiles do not trail at the end of the grid.
Schedules are tiny (tens of rows) and cached.
"""
from functools import lru_cache

import torch

from .patterns import SEGMENT_PATTERNS, SKIP_PATTERNS, key_query_ranges, row_key_ranges

_COLS = 6


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


def homogeneous_pieces(offsets, pattern):
    """[(p0, p1)]: the documents, or for skip-causal each document's two halves. Inside a piece every
    row's (and key's) ranges depend only on its block index, monotonically."""
    pieces = []
    for a, e in zip(offsets[:-1], offsets[1:]):
        if pattern in SKIP_PATTERNS:
            pieces += [(a, a + (e - a) // 2), (a + (e - a) // 2, e)]
        else:
            pieces.append((a, e))
    return pieces


def _split(pieces, block):
    return [(t, min(t + block, p1)) for p0, p1 in pieces for t in range(p0, p1, block)]


def _two_spans(ranges_of, positions):
    """Span t: the hull of the t-th ranges over `positions`, empty ranges ignored; (0, 0) when all are
    empty. Span t stays in slot t (the kernels skip the mask of a block inside every entry's t-th
    range), unless the two hulls overlap (no pattern's homogeneous tiles do): then slot 0 holds their
    union, so that no key is visited twice, and slot 1 is (0, 0)."""
    hulls = []
    for t in range(2):
        lo = hi = None
        for p in positions:
            a, b = ranges_of(p)[t]
            if b > a:
                lo = a if lo is None else min(lo, a)
                hi = b if hi is None else max(hi, b)
        hulls.append((0, 0) if lo is None else (lo, hi))
    (a0, b0), (a1, b1) = hulls
    if b0 > a0 and b1 > a1 and a1 < b0 and a0 < b1:
        hulls = [(min(a0, a1), max(b0, b1)), (0, 0)]
    return hulls[0] + hulls[1]


def _segment_positions(offsets, p0, p1):
    # Ranges are monotone within a segment, so the first/last position of each segment bound the union.
    return {p0, p1 - 1} | {o for o in offsets if p0 <= o < p1} | {o - 1 for o in offsets if p0 < o <= p1}


def _block_positions(pieces, block_size, p0, p1):
    # Inside a piece the ranges are a monotone function of the block index, and only its first block
    # (a noisy row of block 0: no clean prefix) or last block (a clean key of the last block: no noisy
    # row after it) has an empty range: the first two and last two blocks of the tile bound the hull.
    base = next(a for a, e in pieces if a <= p0 < e)
    first_next = base + ((p0 - base) // block_size + 1) * block_size
    last_start = base + ((p1 - 1 - base) // block_size) * block_size
    return {p for p in (p0, first_next, last_start - 1, p1 - 1) if p0 <= p < p1}


def _span_len(row):
    return (row[3] - row[2]) + (row[5] - row[4])


@lru_cache(maxsize=256)
def _q_schedule(offsets, pattern, block_m, block_size):
    if pattern in SEGMENT_PATTERNS:
        tiles = query_row_blocks(offsets, block_m)
        positions = lambda r0, r1: _segment_positions(offsets, r0, r1)  # noqa: E731
    else:
        pieces = homogeneous_pieces(offsets, pattern)
        tiles = _split(pieces, block_m)
        positions = lambda r0, r1: _block_positions(pieces, block_size, r0, r1)  # noqa: E731
    ranges_of = lambda r: row_key_ranges(offsets, pattern, r, block_size)  # noqa: E731
    rows = [(r0, r1) + _two_spans(ranges_of, positions(r0, r1)) for r0, r1 in tiles]
    rows.sort(key=lambda t: (-_span_len(t), t[0]))
    return tuple(rows)


@lru_cache(maxsize=256)
def _k_schedule(offsets, pattern, block_n, block_size):
    L = offsets[-1]
    if pattern in SEGMENT_PATTERNS:
        tiles = [(c0, min(L, c0 + block_n)) for c0 in range(0, L, block_n)]
        positions = lambda c0, c1: _segment_positions(offsets, c0, c1)  # noqa: E731
    else:
        pieces = homogeneous_pieces(offsets, pattern)
        tiles = _split(pieces, block_n)
        positions = lambda c0, c1: _block_positions(pieces, block_size, c0, c1)  # noqa: E731
    ranges_of = lambda j: key_query_ranges(offsets, pattern, j, block_size)  # noqa: E731
    rows = [(c0, c1) + _two_spans(ranges_of, positions(c0, c1)) for c0, c1 in tiles]
    rows.sort(key=lambda t: (-_span_len(t), t[0]))
    return tuple(rows)


def _check_block_size(pattern, block_size):
    if pattern not in SEGMENT_PATTERNS and block_size < 1:
        raise ValueError(f"tiling: block_size must be >= 1 for interval pattern {pattern}, got {block_size}")


def q_tiles(offsets, pattern, block_m, device, block_size=0):
    """(n, 6) int32 rows (q_start, q_end, k0_start, k0_end, k1_start, k1_end), longest first, for the
    fwd and dQ passes."""
    _check_block_size(pattern, block_size)
    return _as_tensor(_q_schedule(tuple(offsets), int(pattern), int(block_m), int(block_size)), device)


def k_tiles(offsets, pattern, block_n, device, block_size=0):
    """(n, 6) int32 rows (k_start, k_end, q0_start, q0_end, q1_start, q1_end) of key tiles (full size
    except at the end of the sequence, or of a document / half for the block patterns) for the dK/dV
    pass."""
    _check_block_size(pattern, block_size)
    return _as_tensor(_k_schedule(tuple(offsets), int(pattern), int(block_n), int(block_size)), device)


_TENSOR_CACHE = {}


def _as_tensor(rows, device):
    key = (rows, str(device))
    t = _TENSOR_CACHE.get(key)
    if t is None:
        t = torch.tensor(rows, dtype=torch.int32).reshape(-1, _COLS).to(device)
        if len(_TENSOR_CACHE) > 512:
            _TENSOR_CACHE.clear()
        _TENSOR_CACHE[key] = t
    return t
