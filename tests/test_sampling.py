"""Token sampling shared by the generation loops (hierkern/models/_sampling.py)."""
import pytest
import torch

from hierkern.models import _sampling


@pytest.mark.parametrize("top_k,top_p", [(0, 0.0), (5, 0.0), (0, 0.8), (7, 0.9)])
def test_chunked_sampling_draws_from_the_filtered_distribution(top_k, top_p, monkeypatch):
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
def test_sampling_matches_the_filtered_distribution_empirically(top_k, top_p, ties, monkeypatch):
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


def test_generator_stream_does_not_depend_on_the_logits():
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
