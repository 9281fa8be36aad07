"""MaskedDiffusionLM: the cache strategies against the exact definition, and impl="reference" vs
impl="kernels" on the same weights."""
import math

import pytest
import torch

from hierkern.models import MaskedDiffusionLM

KW = dict(vocab_size=32, width=64, depth=2, heads=2, kv_heads=1)
GEN = dict(gen_length=12, block_length=4, steps=12)


def model(impl="kernels", **kw):
    torch.manual_seed(0)
    m = MaskedDiffusionLM(**{**KW, **kw}, impl=impl).eval()
    # larger weights than the init: sharper logits, so some steps reveal several tokens at once
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(20.0 if p.dim() > 1 else 1.0)
    return m


def prompt(B=2, P=5):
    return torch.randint(0, KW["vocab_size"], (B, P), generator=torch.Generator().manual_seed(1))


def plain_loop(m, pr, gen_length, block_length, steps, threshold):
    """The cache-free definition written out: one full forward per step."""
    B, P = pr.shape
    ids = torch.cat((pr, torch.full((B, gen_length), m.mask_id)), dim=1)
    nb = gen_length // block_length
    per_block = steps // nb
    for b in range(nb):
        s, e = P + b * block_length, P + (b + 1) * block_length
        for step in range(per_block):
            masked = ids[:, s:e] == m.mask_id
            if not masked.any():
                break
            with torch.no_grad():
                logits = m(ids)[:, s:e]
            quota = max(1, math.ceil(int(masked.sum(1).max()) / (per_block - step)))
            ids[:, s:e] = m.unmask(ids[:, s:e], masked, logits, threshold, quota)
    return ids


@pytest.mark.parametrize("impl", ["reference", "kernels"])
@pytest.mark.parametrize("threshold", [0.9, 0.3])
def test_none_equals_plain_loop(impl, threshold):
    m = model(impl)
    got = m.generate(prompt(), threshold=threshold, cache="none", **GEN)
    assert torch.equal(got, plain_loop(m, prompt(), threshold=threshold, **GEN))
    assert (got != m.mask_id).all() and torch.equal(got[:, :5], prompt())


@pytest.mark.parametrize("impl", ["reference", "kernels"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_refresh_every_step_equals_none(impl, cache):
    m = model(impl)
    want = m.generate(prompt(), threshold=0.5, cache="none", **GEN)
    assert torch.equal(m.generate(prompt(), threshold=0.5, cache=cache, interval=1, **GEN), want)


@pytest.mark.parametrize("impl", ["reference", "kernels"])
def test_adaptive_ratio_one_equals_none(impl):
    m = model(impl)
    want = m.generate(prompt(), threshold=0.5, cache="none", **GEN)
    for interval in (None, 3):
        got = m.generate(prompt(), threshold=0.5, cache="adaptive", interval=interval, ratio=1.0, **GEN)
        assert torch.equal(got, want)


@pytest.mark.parametrize("cache", ["prefix", "dual", "adaptive"])
def test_approximate_strategies_finish_and_keep_prompt(cache):
    m = model()
    got = m.generate(prompt(), threshold=0.9, cache=cache, ratio=0.25, **GEN)
    assert (got != m.mask_id).all() and torch.equal(got[:, :5], prompt())


def test_reference_vs_kernels_logits():
    mk, mr = model("kernels"), model("reference")
    ids = torch.randint(0, KW["vocab_size"] + 1, (2, 23))
    with torch.no_grad():
        lk = mk(ids)
        lr = mr(ids)
        l64 = model("reference").double()(ids)
    err = (lk.double() - l64).abs().max().item()
    eager = (lr.double() - l64).abs().max().item()
    assert err <= 2 * eager + 1e-5 * l64.abs().max().item(), (err, eager)


# Not "adaptive": its row choice ranks float32 cosines, and near-tied similarities (accumulated in
# another order by torch and the kernels) may swap which row is recomputed; the impls' equality for it
# is covered through ratio=1.0 (== "none" in each impl).
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_reference_vs_kernels_generate(cache):
    got = model("kernels").generate(prompt(), threshold=0.5, cache=cache, **GEN)
    want = model("reference").generate(prompt(), threshold=0.5, cache=cache, **GEN)
    assert torch.equal(got, want)


def test_generate_errors():
    m = model()
    with pytest.raises(ValueError, match="multiple of block_length"):
        m.generate(prompt(), gen_length=10, block_length=4, steps=12)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        m.generate(prompt(), gen_length=12, block_length=4, steps=10)
    with pytest.raises(ValueError, match="cache must be one of"):
        m.generate(prompt(), cache="kv", **GEN)
    with pytest.raises(ValueError, match="ratio"):
        m.generate(prompt(), cache="adaptive", ratio=1.5, **GEN)
    with pytest.raises(ValueError, match="interval"):
        m.generate(prompt(), cache="dual", interval=0, **GEN)
    with pytest.raises(ValueError, match="token ids"):
        m.generate(prompt() + 100, **GEN)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_query_rope_matches_rope_rows(dtype):
    """The queries' three-op rotation (model-level) is the rope_rows K gets on write, to the last
    float32 bit (addcmul may fuse its product), so q . k stays a function of the position difference."""
    from hierkern.ops.kv_reuse.reference import rope_rows
    m = model().to(dtype)
    rope = m._rope_tables(17)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, m.head_dim, generator=g).to(dtype)
    idx = torch.randint(0, 17, (2, 5), generator=g)
    tol = dict(rtol=torch.finfo(dtype).eps, atol=4 * torch.finfo(torch.float32).eps)
    got = rope.rotate(x, rope.rows(idx))
    assert got.dtype == dtype
    torch.testing.assert_close(got, rope_rows(x, rope.cos, rope.sin, idx), **tol)
    span = torch.arange(9, 14).expand(2, 5)
    torch.testing.assert_close(rope.rotate(x, rope.span(9, 5)), rope_rows(x, rope.cos, rope.sin, span), **tol)
    # a wrong sign or half swap is far outside that
    assert not torch.allclose(got, rope_rows(x, rope.cos, -rope.sin, idx), **tol)
