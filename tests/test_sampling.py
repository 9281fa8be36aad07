"""Token sampling shared by the generation loops (hierkern/models/_sampling.py)."""
import pytest
import torch

from hierkern import _backend
from hierkern.models import _sampling

PATHS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not _backend.has_compiled_ops(),
                                                                reason="hierkern._C not built"))]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Run sample() through the PyTorch version or the C++ sampler (CPU rows, hierkern._C built)."""
    if request.param == "torch":
        monkeypatch.setattr(_sampling, "uses_cpu_kernel", lambda device: False)
    else:
        assert _sampling.uses_cpu_kernel(torch.device("cpu"))
    return request.param


@pytest.mark.parametrize("top_k,top_p", [(0, 0.0), (5, 0.0), (0, 0.8), (7, 0.9)])
def test_chunked_sampling_draws_from_the_filtered_distribution(top_k, top_p, monkeypatch, path):
    logits = torch.randn(3, 50, 32, dtype=torch.bfloat16) * 3
    probs = _sampling.filter_logits(logits.float(), top_k, top_p).softmax(dim=-1)
    monkeypatch.setattr(_sampling, "_CHUNK_LOGITS", 32 * 7)  # 7 rows per chunk: 22 chunks, a short last one
    ids, conf = _sampling.sample(logits, top_k, top_p, torch.Generator().manual_seed(0))
    assert ids.shape == conf.shape == (3, 50) and ids.dtype == torch.long and conf.dtype == torch.float32
    picked = probs.gather(-1, ids[..., None]).squeeze(-1)
    assert (picked > 0).all(), "a filtered-out token was sampled"
    torch.testing.assert_close(conf, picked, rtol=0, atol=1e-6)  # candidate vs full-vocabulary softmax
    if top_k:  # the top_k largest survive, ties with the k-th included (as VAR's sampler)
        kth = logits.float().topk(top_k, dim=-1).values[..., -1:]
        assert not (probs > 0)[logits.float() < kth].any()


@pytest.mark.parametrize("top_k,top_p,ties", [(0, 0.0, False), (4, 0.0, False), (4, 0.9, False), (3, 0.0, True),
                                              (0, 0.7, False)])
def test_sampling_matches_the_filtered_distribution_empirically(top_k, top_p, ties, monkeypatch, path):
    # one row repeated: every chunk samples the same distribution, so frequencies must match it.
    # top_k > 0 draws among the sorted top_k candidates unless the k-th value is tied (then it filters
    # the whole vocabulary, which keeps every tie)
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, 0.0 if ties else -0.5, -1.0, -8.0])
    logits = row.expand(6000, 7).reshape(2, 3000, 7)
    monkeypatch.setattr(_sampling, "_CHUNK_LOGITS", 7 * 512)
    ids, conf = _sampling.sample(logits, top_k, top_p, torch.Generator().manual_seed(1))
    want = _sampling.filter_logits(row[None], top_k, top_p).softmax(-1)[0]
    freq = torch.bincount(ids.flatten(), minlength=7).float() / ids.numel()
    torch.testing.assert_close(freq, want, atol=0.02, rtol=0)
    assert (want[ids] > 0).all()
    torch.testing.assert_close(conf, want[ids], atol=1e-6, rtol=0)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.0), (5, 0.9)])
def test_guided_sampling_equals_sampling_the_guided_logits(top_k, top_p, monkeypatch, path):
    # cfg_ratio: (2B, n, V) conditional-then-null rows; the C++ sampler forms each guided row itself
    # with the roundings of guide(), so it draws exactly what sampling guide(logits) draws
    logits = torch.randn(4, 30, 33, dtype=torch.bfloat16) * 3
    monkeypatch.setattr(_sampling, "_CHUNK_LOGITS", 33 * 7)  # chunks of 7 rows: cond and null chunked alike
    for ratio in (0.0, 1.5, 3.25):
        want = _sampling.sample(_sampling.guide(logits, ratio), top_k, top_p, torch.Generator().manual_seed(4))
        got = _sampling.sample(logits, top_k, top_p, torch.Generator().manual_seed(4), cfg_ratio=ratio)
        assert got[0].shape == (2, 30)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.skipif(not _backend.has_compiled_ops(), reason="hierkern._C not built")
def test_cpu_sampler_guidance_arguments():
    op = torch.ops.hierkern.sample_top_k_top_p
    logits, uncond, u = torch.randn(4, 10), torch.randn(4, 10), torch.rand(4)
    torch.library.opcheck(op.default, (logits, u, 3, 0.9, uncond, 1.5))
    guided = (2.5 * logits - 1.5 * uncond).contiguous()
    assert all(torch.equal(a, b) for a, b in zip(op(logits, u, 3, 0.9, uncond, 1.5), op(guided, u, 3, 0.9)))
    with pytest.raises(RuntimeError, match="uncond must be a float32 CPU tensor of logits' shape"):
        op(logits, u, 3, 0.9, uncond[:3], 1.5)
    with pytest.raises(RuntimeError, match="uncond must be a float32 CPU tensor"):
        op(logits, u, 3, 0.9, uncond.double(), 1.5)
    with pytest.raises(RuntimeError, match="cfg_ratio must be finite"):
        op(logits, u, 3, 0.9, uncond, float("nan"))
    bad = uncond.clone()
    bad[2, 5] = float("nan")
    with pytest.raises(RuntimeError, match="row 2 contains NaN"):
        op(logits, u, 3, 0.9, bad, 1.5)


def test_generator_stream_does_not_depend_on_the_logits(path):
    # one uniform per row whatever the path (top_k candidates, tied k-th value, full filter): a cached
    # and a recomputed generation whose logits differ by rounding draw the same random numbers
    tied = torch.zeros(2, 9, 11)
    for logits, top_k in ((torch.randn(2, 9, 11), 3), (tied, 3), (torch.randn(2, 9, 11), 0)):
        g = torch.Generator().manual_seed(3)
        _sampling.sample(logits, top_k, 0.9, g)
        assert torch.equal(torch.rand(4, generator=g), torch.rand(18 + 4, generator=torch.Generator().manual_seed(3))[18:])


def test_inverse_cdf_draw_never_returns_a_zero_probability_index():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.3, 0.0, 0.7, 0.0, 0.0]])
    u = torch.tensor([[0.0], [1.0 - 1e-8]])  # the extremes of [0, 1)
    assert _sampling._draw(probs, u).flatten().tolist() == [1, 2]


def _reference64(logits, u, top_k, top_p):
    """float64 rule: (ids, probability of each id, rows whose result no rounding can change: every
    top-p mass-before and every CDF boundary farther than 1e-5 from its threshold)."""
    x = logits.double()
    R, V = x.shape
    keep = torch.ones_like(x, dtype=torch.bool)
    if 0 < top_k < V:
        keep = x >= x.topk(top_k, dim=-1).values[:, -1:]
    p = x.masked_fill(~keep, float("-inf")).softmax(-1)
    safe = torch.ones(R, dtype=torch.bool)
    if 0.0 < top_p < 1.0:
        order = x.masked_fill(~keep, float("-inf")).argsort(dim=-1, descending=True, stable=True)
        p_desc = p.gather(1, order)
        before = p_desc.cumsum(-1) - p_desc
        drop = before >= top_p
        drop[:, 0] = False
        safe &= ((before - top_p).abs() > 1e-5).all(-1)
        p = p.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), 0.0)
        p = p / p.sum(-1, keepdim=True)
    cdf = p.cumsum(-1)
    target = u.double()[:, None] * cdf[:, -1:]
    ids = torch.searchsorted(cdf, target, right=True).clamp(max=V - 1).squeeze(1)
    safe &= ((cdf - target).abs() > 1e-5).all(-1)
    return ids, p.gather(1, ids[:, None]).squeeze(1), safe


@pytest.mark.parametrize("top_k,top_p", [(0, 0.0), (40, 0.0), (0, 0.9), (40, 0.9), (299, 0.5), (1, 0.9)])
def test_sampler_matches_float64_rule(top_k, top_p, path):
    # irregular vocabulary (not a multiple of 8: the exp tail), a batch of one row too
    for R, V in ((1500, 301), (1, 17)):
        g = torch.Generator().manual_seed(R + V)
        logits = torch.randn(R, V, generator=g) * 2
        logits[0, :3] = float("-inf")  # masked vocabulary entries are fine (probability 0)
        gen = torch.Generator().manual_seed(7)
        u = torch.rand((R, 1), generator=torch.Generator().manual_seed(7))[:, 0]
        ids, conf = _sampling.sample(logits[None], top_k, top_p, gen)
        want, p64, safe = _reference64(logits, u, top_k, top_p)
        assert safe.float().mean() > 0.9
        assert torch.equal(ids[0][safe], want[safe])
        torch.testing.assert_close(conf[0][safe].double(), p64[safe], rtol=1e-5, atol=1e-7)


def test_both_paths_refuse_nan_and_infinite_rows(path):
    # the row numbers count within a chunk of rows (one chunk here)
    logits = torch.randn(1, 4, 10)
    for row, value, msg in ((2, float("nan"), "row 2 contains NaN"), (3, float("inf"), "row 3 has no finite maximum")):
        bad = logits.clone()
        bad[0, row, 5] = value
        with pytest.raises(RuntimeError, match=msg):
            _sampling.sample(bad, 3, 0.9, torch.Generator().manual_seed(0))
    bad = logits.clone()
    bad[0, 1] = float("-inf")
    with pytest.raises(RuntimeError, match="row 1 has no finite maximum"):
        _sampling.sample(bad, 0, 0.0, torch.Generator().manual_seed(0))


@pytest.mark.skipif(not _backend.has_compiled_ops(), reason="hierkern._C not built")
def test_cpu_sampler_errors_and_opcheck():
    op = torch.ops.hierkern.sample_top_k_top_p
    logits, u = torch.randn(4, 10), torch.rand(4)
    torch.library.opcheck(op.default, (logits, u, 3, 0.9))
    bad = logits.clone()
    bad[2, 5] = float("nan")
    with pytest.raises(RuntimeError, match="row 2 contains NaN"):
        op(bad, u, 3, 0.9)
    bad = logits.clone()
    bad[1] = float("-inf")
    with pytest.raises(RuntimeError, match="row 1 has no finite maximum"):
        op(bad, u, 0, 0.0)
    with pytest.raises(RuntimeError, match="logits must be float32"):
        op(logits.double(), u, 3, 0.9)
    with pytest.raises(RuntimeError, match="u must be float32"):
        op(logits, u[:3], 3, 0.9)
    with pytest.raises(RuntimeError, match="top_p must be in"):
        op(logits, u, 3, 1.5)
    # strided rows (a column-sliced view) read in place
    wide = torch.randn(4, 20)
    torch.testing.assert_close(op(wide[:, ::2], u, 3, 0.9)[1], op(wide[:, ::2].contiguous(), u, 3, 0.9)[1])
