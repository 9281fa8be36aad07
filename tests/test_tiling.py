"""Host-side tile schedules of the Triton kernels: coverage, scale alignment, order, ranges."""
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
    for r0, r1, k0, k1 in rows:
        assert 0 < r1 - r0 <= block
        covered += range(r0, r1)
        keys = _keys(lay.offsets, pattern, range(r0, r1))
        assert min(keys) == k0 and max(keys) + 1 == k1
    assert sorted(covered) == list(range(lay.L))
    spans = [k1 - k0 for _, _, k0, k1 in rows]
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
    for c0, c1, q0, q1 in rows:
        qs = set()
        for j in range(c0, c1):
            for a, b in key_query_ranges(lay.offsets, pattern, j):
                qs.update(range(a, b))
        assert min(qs) == q0 and max(qs) + 1 == q1
