"""ACDiT and BlockDiffusionLM reference models: impl="reference" vs impl="kernels" on the same weights
(outputs, loss and every parameter gradient, precision-relative to a float64 copy), the skip-causal
dependency structure, cached block-wise sampling vs recomputing the prefix, packed documents vs
separate ones, determinism and bad inputs."""
import pytest
import torch

import hierkern
from hierkern.models import ACDiT, BlockDiffusionLM
from hierkern.testing import assert_close_rel
from model_helpers import randomize

_missing = [n for n in ("skip_causal_attention", "block_causal_attention", "KVCache", "cached_attention")
            if not hasattr(hierkern, n)]
needs_kernels = pytest.mark.skipif(bool(_missing), reason="impl='kernels' needs hierkern." + ", hierkern.".join(_missing))
IMPLS = ["reference", pytest.param("kernels", marks=needs_kernels)]

ACDIT = dict(channels=4, latent_size=(2, 4), ar_len=3, width=64, depth=2, heads=2)  # 8 tokens per block
LM = dict(vocab_size=32, width=64, depth=2, heads=2, kv_heads=1, block_size=4)      # GQA 2/1, head_dim 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP's
    spin-waiting made each small op ~100x slower (33 ms vs 0.2 ms for a 48x64x256 linear)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def acdit(**kw):
    return randomize(ACDiT(**{**ACDIT, **kw}))


def lm(**kw):
    return randomize(BlockDiffusionLM(**{**LM, **kw}))


def acdit_batch(model, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, model.ar_len, model.channels, *model.latent_size)
    return (torch.randn(shape, generator=g, dtype=torch.float64), torch.rand(batch, model.ar_len, generator=g,
            dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64))


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def compare_grads(g_k, g64, g32):
    assert g64.keys() == g_k.keys()
    for name in g64:
        assert_close_rel(f"grad {name}", g_k[name], g64[name], g32[name])


@needs_kernels
def test_acdit_kernels_match_reference():
    model = acdit()
    x0, t, noise = acdit_batch(model)
    runs = {}
    for key, dtype, impl in (("64", torch.float64, "reference"), ("32", torch.float32, "reference"),
                             ("k", torch.float32, "kernels")):
        model.to(dtype).zero_grad()
        x0_, t_, noise_ = x0.to(dtype), t.to(dtype), noise.to(dtype)
        vel = model.velocity(x0_, (1 - t_[:, :, None, None, None]) * x0_ + t_[:, :, None, None, None] * noise_, t_,
                             impl=impl)
        loss = model(x0_, t=t_, noise=noise_, impl=impl)
        loss.backward()
        runs[key] = (vel.detach(), loss.detach(), grads(model))
    assert_close_rel("velocity", runs["k"][0], runs["64"][0], runs["32"][0])
    assert_close_rel("loss", runs["k"][1], runs["64"][1], runs["32"][1])
    compare_grads(runs["k"][2], runs["64"][2], runs["32"][2])
    assert runs["k"][2]["blocks.0.attn.kv.weight"].abs().max() > 0


@needs_kernels
@pytest.mark.parametrize("cu_seqlens", [None, [0, 8, 24]], ids=["one-doc", "packed"])
def test_lm_kernels_match_reference(cu_seqlens):
    model = lm()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, model.vocab_size, (2, 24), generator=g)
    t = 0.05 + 0.95 * torch.rand(2, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 24, generator=g) < t.repeat_interleave(4, dim=1)
    xt = torch.where(mask, model.mask_id, x0)
    weight = torch.randn(2, 24, model.vocab_size, generator=g, dtype=torch.float64)
    runs = {}
    for key, dtype, impl in (("64", torch.float64, "reference"), ("32", torch.float32, "reference"),
                             ("k", torch.float32, "kernels")):
        model.to(dtype).zero_grad()
        logits = model.denoiser_logits(xt, x0, cu_seqlens=cu_seqlens, impl=impl)
        loss = model(x0, t=t.to(dtype), mask=mask, cu_seqlens=cu_seqlens, impl=impl)
        (loss + (logits * weight.to(dtype)).sum() / logits.numel()).backward()
        runs[key] = (logits.detach(), loss.detach(), grads(model))
    assert_close_rel("logits", runs["k"][0], runs["64"][0], runs["32"][0])
    assert_close_rel("loss", runs["k"][1], runs["64"][1], runs["32"][1])
    compare_grads(runs["k"][2], runs["64"][2], runs["32"][2])


@pytest.mark.parametrize("impl", IMPLS)
def test_acdit_skip_causal_dependencies(impl):
    """Clean-first SCAM: a change in clean block 1 moves the velocity of noisy block 2 only (noisy
    block i sees clean blocks < i); a change in noisy block 1 moves noisy block 1 only."""
    model = acdit()
    x0, t, noise = (a.float() for a in acdit_batch(model, batch=1))
    xt = (1 - t[:, :, None, None, None]) * x0 + t[:, :, None, None, None] * noise
    with torch.no_grad():
        base = model.velocity(x0, xt, t, impl=impl)
        for which, changed in (("x0", {2}), ("xt", {1})):
            x0_, xt_ = x0.clone(), xt.clone()
            (x0_ if which == "x0" else xt_)[:, 1] += 1.0
            out = model.velocity(x0_, xt_, t, impl=impl)
            for blk in range(model.ar_len):
                diff = (out[:, blk] - base[:, blk]).abs().max().item()
                assert (diff > 1e-4) == (blk in changed), f"{which} block 1 -> velocity of block {blk}: {diff}"


@pytest.mark.parametrize("impl", IMPLS)
def test_lm_skip_causal_dependencies(impl):
    """Noisy-first: logits of block i depend on x_t block i and on x_0 blocks < i only."""
    model = lm()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, model.vocab_size, (1, 12), generator=g)
    xt = torch.where(torch.rand(1, 12, generator=g) < 0.5, model.mask_id, x0)
    with torch.no_grad():
        base = model.denoiser_logits(xt, x0, impl=impl)
        for which, changed in (("x0", {2}), ("xt", {1})):
            x0_, xt_ = x0.clone(), xt.clone()
            target = x0_ if which == "x0" else xt_
            target[:, 4:8] = (target[:, 4:8] + 1) % model.vocab_size
            out = model.denoiser_logits(xt_, x0_, impl=impl)
            for blk in range(3):
                diff = (out[:, 4 * blk:4 * blk + 4] - base[:, 4 * blk:4 * blk + 4]).abs().max().item()
                assert (diff > 1e-4) == (blk in changed), f"{which} block 1 -> logits of block {blk}: {diff}"


@pytest.mark.parametrize("impl", IMPLS)
def test_lm_packed_documents_equal_separate(impl):
    model = lm()
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, model.vocab_size, (1, n), generator=g) for n in (8, 16, 4)]
    masks = [torch.rand(d.shape, generator=g) < 0.5 for d in docs]
    ts = [0.1 + 0.9 * torch.rand(1, d.shape[1] // 4, generator=g) for d in docs]
    x0, mask, t = torch.cat(docs, 1), torch.cat(masks, 1), torch.cat(ts, 1)
    xt = torch.where(mask, model.mask_id, x0)
    cu = torch.tensor([0, 8, 24, 28], dtype=torch.int32)
    with torch.no_grad():
        packed = model.denoiser_logits(xt, x0, cu_seqlens=cu, impl=impl)
        separate = torch.cat([model.denoiser_logits(torch.where(m, model.mask_id, d), d, impl=impl)
                              for d, m in zip(docs, masks)], dim=1)
        torch.testing.assert_close(packed, separate, atol=2e-5, rtol=1e-5)
        # the loss is a per-token mean: packing sums the documents' token-weighted losses
        loss = model(x0, t=t, mask=mask, cu_seqlens=cu, impl=impl) * 28
        parts = sum(model(d, t=tt, mask=m, impl=impl) * d.shape[1] for d, m, tt in zip(docs, masks, ts))
        torch.testing.assert_close(loss, parts, atol=1e-4, rtol=1e-5)
        # a one-document packing is the unpacked forward, and packing does change the result
        assert torch.equal(model.denoiser_logits(xt, x0, cu_seqlens=[0, 28], impl=impl),
                           model.denoiser_logits(xt, x0, impl=impl))
        assert (model.denoiser_logits(xt, x0, impl=impl) - packed).abs().max() > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_acdit_cached_sampling_equals_recompute(impl, monkeypatch):
    model = acdit()
    seen = []
    embed = model.x_embed.forward
    monkeypatch.setattr(model.x_embed, "forward", lambda x: (seen.append(x.shape[1]), embed(x))[1])
    out = model.generate(2, steps=3, generator=torch.Generator().manual_seed(5), use_cache=True, impl=impl)
    # the cached sampler only ever embeds one block: the clean prefix is never recomputed
    assert seen == [8] * (3 * 3 + 2)
    ref = model.generate(2, steps=3, generator=torch.Generator().manual_seed(5), use_cache=False, impl=impl)
    assert out.shape == (2, 3, 4, 2, 4)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert (out[:, 2] - out[:, 1]).abs().max() > 1e-2


@needs_kernels
def test_acdit_sampling_kernels_equal_reference_and_is_deterministic():
    model = acdit()
    run = lambda seed, impl: model.generate(1, steps=2, generator=torch.Generator().manual_seed(seed), impl=impl)  # noqa: E731
    a = run(0, "kernels")
    torch.testing.assert_close(a, run(0, "reference"), atol=1e-4, rtol=1e-4)
    assert torch.equal(a, run(0, "kernels")) and torch.isfinite(a).all()
    assert (a - run(1, "kernels")).abs().max() > 1e-2, "the generator does not reach the noise"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kw", [dict(temperature=1.0, threshold=0.6), dict(temperature=0.8, top_k=8, steps=2,
                                threshold=1.0, block_size=3), dict(temperature=0.0, threshold=0.9)],
                         ids=["sampled", "steps-top_k-bs3", "greedy"])
def test_lm_cached_sampling_equals_recompute(impl, kw, monkeypatch):
    model = lm()
    prompt = torch.randint(0, model.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    # the logits of every step, not only the tokens: stale K/V of a finished block (not rerun with its
    # final tokens) can leave argmax/samples unchanged while moving the logits
    logits = {True: [], False: []}
    inner = model._unmask
    runs = []
    for c in (True, False):
        monkeypatch.setattr(model, "_unmask", lambda blk, masked, lg, *a, c=c: (logits[c].append(lg),
                                                                                 inner(blk, masked, lg, *a))[1])
        runs.append(model.generate(prompt, 11, generator=torch.Generator().manual_seed(9), use_cache=c, impl=impl,
                                   **kw))
    assert torch.equal(runs[0], runs[1]), f"cached {runs[0].tolist()} != recomputed {runs[1].tolist()}"
    assert len(logits[True]) == len(logits[False])
    for a, b in zip(logits[True], logits[False]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert runs[0].shape == (2, 17) and torch.equal(runs[0][:, :6], prompt)
    assert runs[0].max() < model.vocab_size, "a [MASK] was left in the output"


@needs_kernels
def test_lm_greedy_sampling_kernels_equal_reference():
    model = lm()
    prompt = torch.randint(0, model.vocab_size, (3, 8), generator=torch.Generator().manual_seed(6))
    assert torch.equal(model.generate(prompt, 8, impl="kernels"), model.generate(prompt, 8, impl="reference"))


@pytest.mark.parametrize("impl", IMPLS)
def test_lm_sampling_schedule_deterministic_and_filled(impl, monkeypatch):
    model = lm()
    prompt = torch.randint(0, model.vocab_size, (2, 4), generator=torch.Generator().manual_seed(7))
    calls = []
    inner = model._unmask

    def spy(blk, masked, *args):
        calls.append(masked.sum(dim=1).tolist())
        return inner(blk, masked, *args)
    monkeypatch.setattr(model, "_unmask", spy)

    def run(seed, **kw):
        return model.generate(prompt, 8, generator=torch.Generator().manual_seed(seed), temperature=1.0, impl=impl, **kw)
    # threshold 1 reveals nothing by confidence: exactly one token per row and step
    a = run(0, threshold=1.0)
    assert calls == [[n, n] for n in (4, 3, 2, 1)] * 2
    calls.clear()
    # with steps=2 a 4-token block takes two steps of two
    run(0, threshold=1.0, steps=2)
    assert calls == [[4, 4], [2, 2]] * 2
    calls.clear()
    # threshold 0 reveals every token in one step
    run(0, threshold=0.0)
    assert calls == [[4, 4]] * 2
    assert torch.equal(a, run(0, threshold=1.0)) and a.max() < model.vocab_size
    assert not torch.equal(a, run(1, threshold=1.0)), "the generator does not reach sampling"


def test_training_step_with_default_init():
    for model, args in ((ACDiT(**ACDIT, impl="reference"), (torch.randn(2, 3, 4, 2, 4),)),
                        (BlockDiffusionLM(**LM, impl="reference"), (torch.randint(0, 32, (2, 8)),))):
        loss = model(*args, generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert torch.isfinite(loss) and loss > 0
        assert all(p.grad is not None for p in model.parameters())


def test_bad_inputs_name_the_argument(monkeypatch):
    model, net = lm(), acdit()
    x0 = torch.randint(0, 32, (2, 8))
    lat = torch.randn(2, 3, 4, 2, 4)
    t = torch.rand(2, 3)
    p = x0[:, :3]
    cases = [
        (lambda: model(x0.float()), TypeError, "x0 must have an integer dtype"),
        (lambda: model(x0[:, :6]), ValueError, "multiple of block_size 4"),
        (lambda: model(x0 + 32), ValueError, r"x0 must hold token ids in \[0, 32\)"),
        (lambda: model(x0, cu_seqlens=[0, 3, 8]), ValueError, "document length must be a multiple of block_size"),
        (lambda: model(x0, cu_seqlens=[0, 4]), ValueError, "cu_seqlens must increase strictly from 0"),
        (lambda: model(x0, cu_seqlens="0,8"), TypeError, "cu_seqlens must be"),
        (lambda: model(x0, mask=x0 > 3), ValueError, "mask needs its masking rates t"),
        (lambda: model(x0, t=torch.rand(2, 3)), ValueError, r"t must be a floating tensor of shape \(batch=2"),
        (lambda: model(x0, t=torch.zeros(2, 2)), ValueError, r"t must lie in \(0, 1\]"),
        (lambda: model(x0, t=torch.rand(2, 2), mask=x0), ValueError, "mask must be a bool tensor"),
        (lambda: model.denoiser_logits(x0[:1], x0), ValueError, r"xt must have shape \(2, 8\)"),
        (lambda: model(x0, impl="cpu"), ValueError, "impl must be 'reference' or 'kernels'"),
        (lambda: model.generate(p, 0), ValueError, "gen_length must be a positive int"),
        (lambda: model.generate(p, 4, block_size=0), ValueError, "block_size must be a positive int"),
        (lambda: model.generate(p, 4, steps=0), ValueError, "steps must be a positive int"),
        (lambda: model.generate(p, 4, threshold=1.5), ValueError, r"threshold must be in \[0, 1\]"),
        (lambda: model.generate(p, 4, temperature=-1), ValueError, "temperature must be"),
        (lambda: model.generate(p, 4, top_p=2.0), ValueError, "top_p"),
        (lambda: model.generate(p, 4, generator=1), TypeError, "generator must be a torch.Generator"),
        (lambda: model.generate(p[0], 4), ValueError, r"prompt must have shape \(batch, length\)"),
        (lambda: model.generate(p + 32, 4), ValueError, "prompt must hold token ids"),
        (lambda: BlockDiffusionLM(heads=4, kv_heads=3), ValueError, "multiple of kv_heads"),
        (lambda: BlockDiffusionLM(block_size=0), ValueError, "block_size must be a positive int"),
        (lambda: net(lat[:, :2]), ValueError, r"x0 must have shape \(batch, ar_len=3, channels=4, H=2, W=4\)"),
        (lambda: net(lat.double()), TypeError, "x0 must be torch.float32"),
        (lambda: net(lat, t=t[:, :2]), ValueError, r"t must have shape \(batch=2, ar_len=3\)"),
        (lambda: net(lat, t=t + 1), ValueError, r"t must lie in \[0, 1\]"),
        (lambda: net(lat, t=t.long()), TypeError, "t must be a floating tensor"),
        (lambda: net(lat, noise=lat[:1]), ValueError, r"noise must have shape \(2, ar_len=3"),
        (lambda: net.velocity(lat, lat, t, impl="triton"), ValueError, "impl must be"),
        (lambda: net.generate(0), ValueError, "batch must be a positive int"),
        (lambda: net.generate(1, steps=1.5), ValueError, "steps must be a positive int"),
        (lambda: net.generate(1, generator="seed"), TypeError, "generator must be"),
        (lambda: ACDiT(latent_size=(2, 0)), ValueError, "latent_size must be"),
        (lambda: ACDiT(width=36, heads=4), ValueError, "even head_dim"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()
    monkeypatch.delattr(hierkern, "skip_causal_attention", raising=False)
    with pytest.raises(RuntimeError, match="hierkern.skip_causal_attention"):
        model(x0, impl="kernels")
    with pytest.raises(RuntimeError, match="hierkern.skip_causal_attention"):
        net(lat, impl="kernels")
