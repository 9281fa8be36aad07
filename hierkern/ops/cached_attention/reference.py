"""Executable specification of cached attention: plain PyTorch, any device, any floating dtype (float64
for the ground truth the tests compare against).

The cos-attention prologue (qk_norm) is hierkern/ops/attention/cos_attention.py's, shared with
next_scale_attention.
"""
import torch

from ..attention import cos_attention

def cached_attention_reference(q, k_cache, v_cache, kv_len, scale, qk_norm=False, temperature=None,
                               return_lse=False):
    """Softmax attention of q (B, Lq, H, D) over rows [0, kv_len) of k_cache / v_cache (B, max_len,
    Hk, D), no mask, GQA by head repetition. Rows at and beyond kv_len are never read."""
    k = k_cache[:, :kv_len]
    v = v_cache[:, :kv_len]
    if qk_norm:
        q, k = cos_attention.reference(q, k, temperature)
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    lse = torch.logsumexp(s.float(), dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v)
    return (out, lse) if return_lse else out
