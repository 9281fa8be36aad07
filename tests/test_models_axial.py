"""AxialTransformer: impl="reference" vs impl="kernels" on the same weights (logits, NLL and every
parameter gradient, precision-relative to a float64 copy), the raster-order dependency structure,
cached semi-parallel sampling vs naive recomputing sampling, and bad inputs."""
import copy

import pytest
import torch

from hierkern.models import AxialTransformer
from hierkern.testing import assert_close_rel
from model_helpers import randomize

CFG = dict(image_size=(4, 5), channels=2, levels=16, width=64, heads=2, kv_heads=1, outer_depth=1, inner_depth=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads on the loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def model(impl="kernels", **kw):
    return randomize(AxialTransformer(**{**CFG, **kw, "impl": impl}))


def image(m, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, m.levels, (batch, m.H, m.W, m.channels), generator=g)


def run(m, x):
    m.zero_grad()
    logits, nll = m(x)
    nll.backward()
    return logits, nll, {n: p.grad.detach().clone() for n, p in m.named_parameters()}


def test_reference_vs_kernels():
    ref = model("reference")
    ker = model("kernels")
    ker.load_state_dict(ref.state_dict())
    x = image(ref)
    r64 = run(copy.deepcopy(ref).double(), x)
    r32 = run(ref, x)
    k32 = run(ker, x)
    assert_close_rel("logits", k32[0], r64[0], r32[0])
    assert_close_rel("nll", k32[1], r64[1], r32[1])
    for name in r64[2]:
        assert_close_rel(f"grad {name}", k32[2][name], r64[2][name], r32[2][name])


@pytest.mark.parametrize("impl", ["reference", "kernels"])
def test_raster_dependencies(impl):
    """Changing pixel (i, j) changes the logits of later pixels only (rows below, and the rest of row i),
    never of (i, j) itself or earlier ones."""
    m = model(impl)
    x = image(m, batch=1)
    base = m(x)[0]
    for i, j in ((0, 0), (1, 3), (2, 0), (3, 4)):
        y = x.clone()
        y[0, i, j] = (y[0, i, j] + 5) % m.levels
        changed = (m(y)[0] - base).abs().amax((-1, -2))[0] > 1e-6  # (H, W)
        flat = changed.flatten()
        p = i * m.W + j
        assert not flat[:p + 1].any(), f"pixel {(i, j)} leaks into itself or earlier pixels"
        if p + 1 < flat.numel():
            assert flat[p + 1], "the next pixel must see the change"


@pytest.mark.parametrize("impl", ["reference", "kernels"])
def test_cached_sampling_equals_naive(impl):
    m = model(impl, levels=8)
    a = m.sample(3, generator=torch.Generator().manual_seed(7), use_cache=True)
    b = m.sample(3, generator=torch.Generator().manual_seed(7), use_cache=False)
    assert a.shape == (3, m.H, m.W, m.channels) and a.dtype == torch.int64
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() < m.levels
    assert len(torch.unique(a)) > 1


def test_sampling_matches_forward_logits():
    """The cached decoder's per-pixel logits are the training forward's on the sampled image."""
    m = model("kernels")
    seen = []
    orig = m._logits

    def capture(u):
        out = orig(u)
        if out.dim() == 3:
            seen.append(out)
        return out
    m._logits = capture
    x = m.sample(2, generator=torch.Generator().manual_seed(3))
    m._logits = orig
    full = m(x)[0]
    got = torch.stack(seen, 1).view(full.shape)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)


def test_bad_inputs():
    with pytest.raises(ValueError, match="impl must be"):
        AxialTransformer(impl="fast")
    with pytest.raises(ValueError, match="head_dim"):
        AxialTransformer(width=48, heads=2)
    m = model()
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 4, 5, 2\)"):
        m(torch.zeros(1, 5, 4, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        m(torch.zeros(1, 4, 5, 2))
