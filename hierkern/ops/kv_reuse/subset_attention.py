"""subset_attention: attention of the queries of a subset of positions over a whole K/V cache,
bidirectional (the recompute step of approximate KV reuse). It is hierkern.cached_attention's kernel
family (reference, C++ CPU, Triton split-KV) with its log-sum-exp exposed, not a kernel of its own."""
import torch

from ... import _backend, _validate
from ..cached_attention.op import cached_attention_op

_NAME = "subset_attention"


def subset_attention(q, k_cache, v_cache, kv_len=None, scale=None, return_lse=False, impl=None):
    """Softmax attention of q over cache rows [0, kv_len), no mask, GQA.

    Args:
        q: (batch, n, heads, head_dim), the queries of the refreshed positions (any n >= 1, any
            strides; their positions are the caller's business: apply RoPE before).
        k_cache, v_cache: (batch, max_len, kv_heads, head_dim), heads % kv_heads == 0.
        kv_len: rows of the cache to attend, default max_len; 1 <= kv_len <= max_len.
        scale: default 1/sqrt(head_dim).
        return_lse: also return the float32 log-sum-exp (batch, heads, n) of each query's scores (to
            merge with attention over other keys).
        impl: None (fastest available), "reference", "cpu" or "triton".

    Returns:
        out (batch, n, heads, head_dim) in q's dtype, or (out, lse). Differentiable in q, k_cache and
        v_cache (the cache gradients dense, zero from kv_len on); lse is not differentiable.
    Dtypes: float32 / float16 / bfloat16; float64 with impl="reference".
    """
    _validate.check_attention_qkv(_NAME, q, k_cache, v_cache, names=("q", "k_cache", "v_cache"))
    if q.shape[1] < 1:
        raise ValueError(f"{_NAME}: q must hold at least one query, got shape {tuple(q.shape)}")
    if kv_len is None:
        kv_len = k_cache.shape[1]
    if isinstance(kv_len, bool) or not isinstance(kv_len, (int, torch.SymInt)):
        raise TypeError(f"{_NAME}: kv_len must be an int or None, got {type(kv_len).__name__}")
    if not 1 <= kv_len <= k_cache.shape[1]:
        raise ValueError(f"{_NAME}: kv_len must be in [1, max_len={k_cache.shape[1]}] (max_len is "
                         f"k_cache.shape[1]), got {kv_len}")
    scale = _validate.resolve_scale(_NAME, scale, q.shape[-1])
    backend = _backend.select(_NAME, impl, q.device, dtype=q.dtype)
    return cached_attention_op(q, k_cache, v_cache, kv_len, scale, False, None, backend, return_lse=return_lse)
