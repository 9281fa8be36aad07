"""Host-side tile schedules of the Triton kernels: coverage, scale alignment, order, ranges, and the
two-span schedules of the block patterns (exact hulls, homogeneous tiles)."""
import pytest

from hierkern import ScaleLayout
from hierkern.layouts import VAR_256, VAR_512
from hierkern.ops.attention import tiling
from hierkern.ops.attention.patterns import key_query_ranges, row_key_ranges

LAYOUTS = [ScaleLayout(VAR_256), ScaleLayout(VAR_512), ScaleLayout.from_sizes((1, 3, 7, 130, 257)),
           ScaleLayout.from_sizes((1,) * 9), ScaleLayout.from_sizes((300,))]


def _keys(offsets, pattern, rows):
    seen = set()
    for r in rows:
        for a, b in row_key_ranges(offsets, pattern, r):
            seen.update(range(a, b))
    return seen


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda l: f"L{l.L}")
@pytest.mark.parametrize("pattern", [0, 1])
@pytest.mark.parametrize("block", [16, 64, 128])
def test_q_tiles_cover_rows_and_keys(lay, pattern, block):
    rows = tiling.q_tiles(lay.offsets, pattern, block, "cpu").tolist()
    covered = []
    for r0, r1, k0, k1, *second in rows:
        assert second == [0, 0]
        assert 0 < r1 - r0 <= block
        covered += range(r0, r1)
        keys = _keys(lay.offsets, pattern, range(r0, r1))
        assert min(keys) == k0 and max(keys) + 1 == k1
    assert sorted(covered) == list(range(lay.L))
    spans = [k1 - k0 for _, _, k0, k1, *_ in rows]
    assert spans == sorted(spans, reverse=True), "longest key span first"


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda l: f"L{l.L}")
def test_q_tiles_are_scale_aligned(lay):
    """A scale that fits in a tile is never cut; VAR 256px's first six scales (91 tokens) share one."""
    block = 128
    bounds = {r0 for r0, *_ in tiling.query_row_blocks(lay.offsets, block)}
    for s0, s1 in zip(lay.offsets[:-1], lay.offsets[1:]):
        if s1 - s0 <= block:
            assert not any(s0 < b < s1 for b in bounds), (s0, s1)
    if lay.sizes == tuple(p * p for p in VAR_256):
        assert tiling.query_row_blocks(lay.offsets, block)[0] == (0, 91)


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda l: f"L{l.L}")
@pytest.mark.parametrize("pattern", [0, 1])
def test_k_tiles_full_size_and_query_union(lay, pattern):
    block = 64
    rows = tiling.k_tiles(lay.offsets, pattern, block, "cpu").tolist()
    assert sorted((c0, c1) for c0, c1, *_ in rows) == [
        (c, min(lay.L, c + block)) for c in range(0, lay.L, block)]
    for c0, c1, q0, q1, *_ in rows:
        qs = set()
        for j in range(c0, c1):
            for a, b in key_query_ranges(lay.offsets, pattern, j):
                qs.update(range(a, b))
        assert min(qs) == q0 and max(qs) + 1 == q1


# --- block patterns (skip-causal, block-causal): two spans per tile ------------------------------

BLOCK_CASES = [  # (pattern, document lengths, block_size)
    (2, (24,), 4), (3, (24,), 4), (2, (2, 74, 6), 1), (3, (22, 88), 11), (2, (32, 256), 16),
    (3, (128, 512), 64), (2, (512,), 256), (4, (13,), 4), (4, (5, 130, 77, 1), 16), (4, (300,), 1),
]


def _doc_offsets(doc_lens):
    out = [0]
    for n in doc_lens:
        out.append(out[-1] + n)
    return tuple(out)


def _hulls(ranges_of, positions):
    """Exact hull of each of the two ranges over `positions` (brute force)."""
    hulls = []
    for t in range(2):
        seen = [x for p in positions for x in range(*ranges_of(p)[t])]
        hulls.append((min(seen), max(seen) + 1) if seen else (0, 0))
    return hulls


def _check_two_span_rows(rows, offsets, pattern, B, block, ranges_fn):
    L = offsets[-1]
    pieces = tiling.homogeneous_pieces(offsets, pattern)
    covered = []
    for t0, t1, a0, b0, a1, b1 in rows:
        assert 0 < t1 - t0 <= block
        covered += range(t0, t1)
        # Homogeneous: inside one document, and one half of it for skip-causal.
        assert any(p0 <= t0 and t1 <= p1 for p0, p1 in pieces), (t0, t1)
        h0, h1 = _hulls(lambda p: ranges_fn(offsets, pattern, p, B), range(t0, t1))
        assert ((a0, b0), (a1, b1)) == (h0, h1), (t0, t1)
        assert b0 <= a1 or (a1, b1) == (0, 0)
    assert sorted(covered) == list(range(L))
    work = [b0 - a0 + b1 - a1 for _, _, a0, b0, a1, b1 in rows]
    assert work == sorted(work, reverse=True), "longest first"


@pytest.mark.parametrize("pattern,doc_lens,B", BLOCK_CASES)
@pytest.mark.parametrize("block", [16, 64, 128])
def test_block_pattern_q_tiles(pattern, doc_lens, B, block):
    offsets = _doc_offsets(doc_lens)
    rows = tiling.q_tiles(offsets, pattern, block, "cpu", B).tolist()
    _check_two_span_rows(rows, offsets, pattern, B, block, row_key_ranges)


@pytest.mark.parametrize("pattern,doc_lens,B", BLOCK_CASES)
@pytest.mark.parametrize("block", [16, 64])
def test_block_pattern_k_tiles(pattern, doc_lens, B, block):
    offsets = _doc_offsets(doc_lens)
    rows = tiling.k_tiles(offsets, pattern, block, "cpu", B).tolist()
    _check_two_span_rows(rows, offsets, pattern, B, block, key_query_ranges)


@pytest.mark.parametrize("B", [1, 4, 16])
def test_small_blocks_do_not_sweep_the_noisy_half(B):
    """A noisy tile's own-block span is its rows' own blocks (<= 128 + 2B keys), not the noisy half."""
    N = 1024
    offsets = (0, 2 * N)
    for pattern in (2, 3):
        for r0, r1, a0, b0, a1, b1 in tiling.q_tiles(offsets, pattern, 128, "cpu", B).tolist():
            noisy = (r0 < N) == (pattern == 2)
            own = (a0, b0) if pattern == 2 else (a1, b1)
            if noisy:
                assert own[1] - own[0] <= r1 - r0 + 2 * B and own[0] <= r0 and r1 <= own[1]


def test_segment_rows_have_an_empty_second_span():
    lay = ScaleLayout(VAR_256)
    for rows in (tiling.q_tiles(lay.offsets, 0, 64, "cpu").tolist(),
                 tiling.k_tiles(lay.offsets, 1, 64, "cpu").tolist()):
        assert all(len(r) == 6 and r[4:] == [0, 0] for r in rows)


def test_block_patterns_need_a_block_size():
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        tiling.q_tiles((0, 32), 2, 64, "cpu")
