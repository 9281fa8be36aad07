"""scatter_kv: in-place row writes into K/V caches with rotary embedding on write."""
import torch

from ... import _backend, _validate
from .op import scatter_kv_op
from .refresh_select import check_dtype

_NAME = "scatter_kv"
_DOC = "(batch, max_len, kv_heads, head_dim)"


def _check_index_values(index, max_len):
    """Range and distinctness of the destination slots (the reference and Triton paths; the C++ kernel
    checks them itself while the rows are in cache). On CUDA this is two host syncs (the range, then
    the distinctness)."""
    if index.numel() == 0:
        return
    lo, hi = _validate.value_range(index)
    if lo < 0 or hi >= max_len:
        raise IndexError(f"{_NAME}: index values out of range: they must be in [0, max_len={max_len}), got values "
                         f"in [{lo}, {hi}]")
    if index.shape[1] > 1 and bool((index.sort(dim=1).values.diff(dim=1) == 0).any()):
        raise ValueError(f"{_NAME}: index holds a slot more than once in some batch row; duplicated indices "
                         f"are an error (the write order would decide the result)")


def scatter_kv(k_cache, v_cache, index, k, v, cos=None, sin=None, impl=None):
    """In place: k_cache[b, index[b, i]] = rope(k[b, i]), v_cache[b, index[b, i]] = v[b, i].

    Args:
        k_cache, v_cache: (batch, max_len, kv_heads, head_dim), one dtype, any strides; written in place.
        index: (batch, n) int64 destination slots, distinct within a row, in [0, max_len) (else
            IndexError / ValueError, and nothing is written).
        k, v: (batch, n, kv_heads, head_dim), the caches' dtype.
        cos, sin: None (no rotary), or rotate-half tables (max_len, head_dim // 2), float32 or the
            caches' dtype, indexed by the destination slot: row i lands at position p = index[b, i] as
            cat(k1 cos[p] - k2 sin[p], k2 cos[p] + k1 sin[p]) with k1, k2 = k[..., :D/2], k[..., D/2:]
            (LLaMA / LLaDA's rotate_half with full tables cat(cos, cos)), computed in float32 and
            rounded once. v is never rotated.
        impl: None (fastest available), "reference", "cpu" or "triton".

    Returns None. Not differentiable (a cache write): k / v must not require grad under grad mode.
    Dtypes: float32 / float16 / bfloat16; float64 with impl="reference".
    """
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        _validate.check_tensor(_NAME, name, t, 4, _DOC if "cache" in name else "(batch, n, kv_heads, head_dim)")
    _validate.check_tensor(_NAME, "index", index, 2, "(batch, n)")
    named = {"k_cache": k_cache, "v_cache": v_cache, "index": index, "k": k, "v": v}
    _validate.check_same(_NAME, named, "device")
    _validate.check_same(_NAME, {"k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v}, "dtype")
    check_dtype("k_cache", _NAME, k_cache)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{_NAME}: k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if index.dtype != torch.int64:
        raise TypeError(f"{_NAME}: index must be int64, got {index.dtype}")
    B, max_len, Hk, D = k_cache.shape
    want = (B, index.shape[1], Hk, D)
    if index.shape[0] != B:
        raise ValueError(f"{_NAME}: index has batch {index.shape[0]} but k_cache has batch {B}")
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != want:
            raise ValueError(f"{_NAME}: {name} must have shape (batch, n, kv_heads, head_dim) = {want}, got "
                             f"{tuple(t.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError(f"{_NAME}: pass both cos and sin (rotary on write) or neither")
    if cos is not None:
        if D % 2:
            raise ValueError(f"{_NAME}: rotary embedding needs an even head_dim, got {D}")
        for name, t in (("cos", cos), ("sin", sin)):
            _validate.check_tensor(_NAME, name, t, 2, "(max_len, head_dim // 2)")
            if tuple(t.shape) != (max_len, D // 2):
                raise ValueError(f"{_NAME}: {name} must have shape (max_len, head_dim // 2) = {(max_len, D // 2)}, "
                                 f"got {tuple(t.shape)}")
            if t.dtype not in (torch.float32, k_cache.dtype):
                raise TypeError(f"{_NAME}: {name} must be float32 or the caches' dtype {k_cache.dtype}, got {t.dtype}")
        _validate.check_same(_NAME, {"k_cache": k_cache, "cos": cos, "sin": sin}, "device")
        _validate.check_same(_NAME, {"cos": cos, "sin": sin}, "dtype")
    if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
        raise RuntimeError(f"{_NAME}: is a cache write and not differentiable; call it under torch.no_grad() "
                           f"or pass detached k / v")
    backend = _backend.select(_NAME, impl, k_cache.device, dtype=k_cache.dtype)
    if backend != "cpu":
        _check_index_values(index, max_len)
    scatter_kv_op(k_cache, v_cache, index, k, v, cos, sin, backend)
