"""cached_attention: queries (a scale, a block, a sub-block, one decode token) over the first kv_len
rows of a preallocated K/V cache, no mask (VAR / ACDiT / SDAR / Fast-dLLM v2 inference)."""
import torch

from ... import _backend, _validate
from ..attention import cos_attention
from .op import cached_attention_op

_NAME = "cached_attention"


def _check_kv_len(kv_len, max_len):
    if isinstance(kv_len, bool) or not isinstance(kv_len, (int, torch.SymInt)):
        raise TypeError(f"{_NAME}: kv_len must be an int, got {type(kv_len).__name__}")
    if not 1 <= kv_len <= max_len:
        raise ValueError(f"{_NAME}: kv_len must be in [1, max_len={max_len}] (max_len is k_cache.shape[1]), "
                         f"got {kv_len}")


def cached_attention(q, k_cache, v_cache, kv_len, scale=None, impl=None, qk_norm=False, temperature=None):
    """Attention of q over rows [0, kv_len) of a K/V cache, with no mask.

    Args:
        q: (batch, q_len, heads, head_dim), any strides (no copies are made), q_len >= 1.
        k_cache, v_cache: (batch, max_len, kv_heads, head_dim), heads % kv_heads == 0 (GQA); e.g. the
            buffers of a hierkern.KVCache. Rows from kv_len on are never read (they may hold anything).
        kv_len: int, 1 <= kv_len <= max_len.
        scale: softmax scale; default 1/sqrt(head_dim), or 1.0 with qk_norm.
        impl: None (fastest available), "reference", "cpu" or "triton".
        qk_norm: fused cos-attention prologue (VAR's attn_l2_norm, Infinity's cos_attn): q and k are
            L2-normalised over head_dim and q is multiplied by exp(min(temperature[h], ln 100)).
        temperature: (heads,) float32 tensor on q's device; required with qk_norm, else must be None.

    Returns:
        (batch, q_len, heads, head_dim) in q's dtype. Differentiable in q, k_cache, v_cache and
        temperature; the cache gradients are dense, zero from kv_len on.
    Dtypes: float32 / float16 / bfloat16 (float32 / bfloat16 on CPU); float64 with impl="reference".
    """
    _validate.check_attention_qkv(_NAME, q, k_cache, v_cache, doc="(batch, seq, heads, head_dim)",
                                  names=("q", "k_cache", "v_cache"))
    if q.shape[1] < 1:
        raise ValueError(f"{_NAME}: q must hold at least one query (q_len >= 1), got shape {tuple(q.shape)}")
    _check_kv_len(kv_len, k_cache.shape[1])
    temperature = cos_attention.check(_NAME, qk_norm, temperature, q)
    if scale is None:
        scale = cos_attention.default_scale(qk_norm, q.shape[-1])
    scale = _validate.resolve_scale(_NAME, scale, q.shape[-1])
    backend = _backend.select(_NAME, impl, q.device, dtype=q.dtype)
    return cached_attention_op(q, k_cache, v_cache, kv_len, scale, qk_norm, temperature, backend)
