"""cached_attention: queries (a scale, a block, a sub-block, one decode token) over the first kv_len
rows of a preallocated K/V cache, no mask (VAR / ACDiT / SDAR / Fast-dLLM v2 inference)."""
import torch

from ... import _backend, _validate
from .op import cached_attention_op

_NAME = "cached_attention"


def _check_kv_len(kv_len, max_len):
    if isinstance(kv_len, bool) or not isinstance(kv_len, (int, torch.SymInt)):
        raise TypeError(f"{_NAME}: kv_len must be an int, got {type(kv_len).__name__}")
    if not 1 <= kv_len <= max_len:
        raise ValueError(f"{_NAME}: kv_len must be in [1, max_len={max_len}] (max_len is k_cache.shape[1]), "
                         f"got {kv_len}")


def _check_temperature(temperature, qk_norm, q):
    if not qk_norm:
        if temperature is not None:
            raise ValueError(f"{_NAME}: temperature is only used with qk_norm=True; pass qk_norm=True "
                             f"or drop temperature")
        return
    if temperature is None:
        raise ValueError(f"{_NAME}: qk_norm=True needs temperature, a ({q.shape[2]},) float32 tensor "
                         f"(one log-multiplier per query head)")
    if not isinstance(temperature, torch.Tensor):
        raise TypeError(f"{_NAME}: temperature must be a torch.Tensor, got {type(temperature).__name__}")
    if temperature.shape != (q.shape[2],):
        raise ValueError(f"{_NAME}: temperature must have shape (heads,) = ({q.shape[2]},), got "
                         f"{tuple(temperature.shape)}")
    if temperature.dtype != torch.float32 and not (q.dtype == torch.float64 and temperature.dtype == q.dtype):
        raise TypeError(f"{_NAME}: temperature must be float32, got {temperature.dtype}")
    if temperature.device != q.device:
        raise ValueError(f"{_NAME}: temperature is on {temperature.device} but q is on {q.device}")


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
    if not isinstance(qk_norm, bool):
        raise TypeError(f"{_NAME}: qk_norm must be a bool, got {type(qk_norm).__name__}")
    _check_temperature(temperature, qk_norm, q)
    scale = _validate.resolve_scale(_NAME, scale, q.shape[-1]) if (scale is not None or not qk_norm) else 1.0
    backend = _backend.select(_NAME, impl, q.device)
    if q.dtype == torch.float64 and backend != "reference":
        raise TypeError(f"{_NAME}: float64 is supported by impl='reference' only (backend {backend!r})")
    return cached_attention_op(q, k_cache, v_cache, kv_len, scale, qk_norm, temperature, backend)
