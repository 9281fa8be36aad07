"""Token sampling for generation: top-k / top-p filtering and a draw with a caller's generator (so a
seed fixes the output).

CPU rows go to the C++ sampler (hierkern::sample_top_k_top_p, csrc/cpu/sampling.cpp) when hierkern._C
is built; other devices (and a build without _C) run the PyTorch version below. Both draw from the
same filtered distribution with the same uniform per row; they may pick different tokens only where
u lands within rounding of a cumulative-probability boundary (their softmax and sums round
differently), so a seed fixes the output of one build on one device.
"""
import numbers

import torch

from .. import _backend

if _backend.has_compiled_ops():
    @torch.library.register_fake("hierkern::sample_top_k_top_p")
    def _fake_sample(logits, u, top_k, top_p, uncond=None, cfg_ratio=0.0):
        rows = logits.shape[0]
        return logits.new_empty((rows,), dtype=torch.long), logits.new_empty((rows,))


def check_sampling_args(owner, cfg, top_k, top_p, generator):
    if isinstance(cfg, bool) or not isinstance(cfg, numbers.Real) or cfg < 0:
        raise ValueError(f"{owner}: cfg must be a non-negative number, got {cfg!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"{owner}: top_k must be a non-negative int (0 disables it), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0.0 <= top_p <= 1.0:
        raise ValueError(f"{owner}: top_p must be in [0, 1] (0 or 1 disables it), got {top_p!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{owner}: generator must be a torch.Generator or None, got {type(generator).__name__}")


def guide(logits, ratio):
    """(2B, n, V) conditional-then-null logits -> (B, n, V) classifier-free guided logits, as VAR
    combines them."""
    cond, uncond = logits.float().chunk(2)
    return (1 + ratio) * cond - ratio * uncond


def filter_logits(logits, top_k, top_p):
    """Set to -inf every logit outside the top_k largest and outside the smallest set whose
    probability reaches top_p (the most likely token always survives)."""
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1.0 - top_p
        drop_sorted[..., -1] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# Rows are filtered and sampled in chunks of at most this many logits: the float32 temporaries of
# filter_logits and softmax (top-p's sort, its int64 order, the cumulative sum) then stay a few tens of
# MiB instead of growing with batch x tokens x vocabulary. At a 512px scale (1024 tokens x 4096 codes,
# batch 8) they were the peak of a whole HMAR generation.
_CHUNK_LOGITS = 1 << 22


def _draw(probs, u):
    """Inverse-CDF draw: per row, the first index whose cumulative probability exceeds u * total
    (u (R, 1) uniform in [0, 1)); a zero-probability index is never returned."""
    cdf = probs.cumsum(dim=-1)
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    # rounding can push u * total onto the total: fall back on the row's last nonzero index
    index = torch.arange(probs.shape[-1], device=probs.device)
    last = torch.where(probs > 0, index, -1).amax(dim=-1, keepdim=True)
    return torch.minimum(pick, last)


def _candidates(logits, top_k, top_p):
    """(probs, ids) of (R, V) float32 rows: the filtered distribution over the top_k candidates in
    vocabulary order with their ids (no full-vocabulary sort), or over the whole vocabulary with ids
    None when top_k is off or a row has ties at the k-th value (filter_logits keeps all of them)."""
    V = logits.shape[-1]
    if 0 < top_k < V:
        # The k + 1 largest, unsorted (a sorted top-k costs more than sorting the few survivors): the
        # k-th value is tied iff the two smallest of them are equal, with no pass over the vocabulary.
        vals, idx = logits.topk(top_k + 1, dim=-1, sorted=False)
        low, low_at = vals.topk(2, dim=-1, largest=False)  # (k+1)-th and k-th largest
        if not bool((low[:, 0] == low[:, 1]).any()):
            vals = vals.scatter(1, low_at[:, :1], float("-inf"))  # the (k+1)-th: probability 0
            # Vocabulary order from here on, so the arithmetic does not depend on the order topk
            # returned: in value order two candidates whose logits differ by rounding swap places
            # between runs (a cached and a recomputed generation) and move every token after them.
            idx, order = idx.sort(dim=-1)
            vals = vals.gather(1, order)
            if 0.0 < top_p < 1.0:
                # filter_logits' rule in descending order (ties: lowest id first): drop a token once
                # the mass before it reaches top_p (the first token always stays)
                desc = vals.argsort(dim=-1, descending=True, stable=True)
                p_desc = vals.softmax(dim=-1).gather(1, desc)
                drop_desc = p_desc.cumsum(dim=-1) - p_desc >= top_p
                vals = vals.masked_fill(torch.empty_like(drop_desc).scatter_(1, desc, drop_desc), float("-inf"))
            return vals.softmax(dim=-1), idx
    return filter_logits(logits, top_k, top_p).softmax(dim=-1), None


def _check_rows(logits):
    """The C++ sampler's rule, so both paths refuse the same rows: a row holding NaN, or one with no
    finite maximum (every logit -inf, or a +inf), raises instead of drawing from NaN probabilities.
    One reduction and, on a GPU, one host sync per chunk."""
    bad = ~torch.isfinite(logits.amax(dim=-1))  # amax propagates NaN
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        if bool(logits[row].isnan().any()):
            raise RuntimeError(f"sample: logits row {row} contains NaN")
        raise RuntimeError(f"sample: logits row {row} has no finite maximum (every logit -inf, or a +inf)")


def _sample_rows(logits, top_k, top_p, u):
    """(ids, conf) of (R, V) float32 rows, one uniform u (R, 1) per row."""
    _check_rows(logits)
    probs, ids = _candidates(logits, top_k, top_p)
    pick = _draw(probs, u)
    return (pick if ids is None else ids.gather(1, pick)).squeeze(1), probs.gather(1, pick).squeeze(1)


def uses_cpu_kernel(device):
    """Whether sample() runs the C++ sampler for logits on `device`."""
    return device.type == "cpu" and _backend.has_compiled_ops()


def sample(logits, top_k, top_p, generator, cfg_ratio=None):
    """(B, n, V) logits -> (ids (B, n) int64, probability of each sampled id (B, n) float32), from
    softmax(filter_logits(logits)). One uniform number per row, drawn up front: the generator's
    stream does not depend on the logits, so two runs whose logits differ by rounding (a cached and a
    recomputed generation) stay in step.

    cfg_ratio: logits are (2B, n, V) conditional-then-null rows, sampled as guide(logits, cfg_ratio)
    (the C++ sampler forms each guided row itself: no (B, n, V) guided tensor)."""
    V = logits.shape[-1]
    kernel = uses_cpu_kernel(logits.device)
    uncond = None
    if cfg_ratio is not None:
        if not kernel:
            return sample(guide(logits, cfg_ratio), top_k, top_p, generator)
        logits, uncond = logits.chunk(2)
        uncond = uncond.reshape(-1, V)
    flat = logits.reshape(-1, V)
    u = torch.rand((flat.shape[0], 1), generator=generator, device=logits.device)
    ids = torch.empty(flat.shape[0], dtype=torch.long, device=logits.device)
    conf = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    rows = max(1, _CHUNK_LOGITS // V)
    for start in range(0, flat.shape[0], rows):
        chunk, uc = flat[start:start + rows].float(), u[start:start + rows]
        if kernel:
            guided = () if uncond is None else (uncond[start:start + rows].float(), float(cfg_ratio))
            ids[start:start + rows], conf[start:start + rows] = torch.ops.hierkern.sample_top_k_top_p(
                chunk, uc[:, 0], top_k, float(top_p), *guided)
        else:
            ids[start:start + rows], conf[start:start + rows] = _sample_rows(chunk, top_k, top_p, uc)
    return ids.view(logits.shape[:-1]), conf.view(logits.shape[:-1])
