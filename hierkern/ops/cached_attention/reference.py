"""Executable specification of cached attention: plain PyTorch, any device, any floating dtype (float64
for the ground truth the tests compare against).

The cos-attention prologue (qk_norm) is VAR's attn_l2_norm / Infinity's cos_attn: q and k are
L2-normalised over head_dim and q is multiplied by exp(min(temperature[h], ln 100)).
"""
import math

import torch
import torch.nn.functional as F

MAX_LOG_MULT = math.log(100.0)
NORM_EPS = 1e-12  # F.normalize's default; the kernels clamp the norm the same way


def temperature_multiplier(temperature, dtype):
    """(H,) exp(min(t, ln 100)) computed in float32 (as the kernels do; float64 for a float64 `dtype`),
    then cast to `dtype`."""
    t = temperature.to(torch.promote_types(temperature.dtype, dtype))
    return t.clamp(max=MAX_LOG_MULT).exp().to(dtype)


def cos_prologue(q, k, temperature):
    """L2-normalised q times the per-head multiplier, and L2-normalised k, in the inputs' dtype."""
    qn = F.normalize(q, dim=-1, eps=NORM_EPS) * temperature_multiplier(temperature, q.dtype)[:, None]
    return qn, F.normalize(k, dim=-1, eps=NORM_EPS)


def cached_attention_reference(q, k_cache, v_cache, kv_len, scale, qk_norm=False, temperature=None,
                               return_lse=False):
    """Softmax attention of q (B, Lq, H, D) over rows [0, kv_len) of k_cache / v_cache (B, max_len,
    Hk, D), no mask, GQA by head repetition. Rows at and beyond kv_len are never read."""
    k = k_cache[:, :kv_len]
    v = v_cache[:, :kv_len]
    if qk_norm:
        q, k = cos_prologue(q, k, temperature)
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    lse = torch.logsumexp(s.float(), dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v)
    return (out, lse) if return_lse else out
