"""refresh_select: which cached tokens drifted most (dLLM-Cache's V-similarity test), fused."""
import torch

from ... import _backend, _validate
from .op import refresh_select_op

_NAME = "refresh_select"


def check_dtype(name, opname, t):
    allowed = _validate.CPU_DTYPES if t.device.type == "cpu" else _validate.GPU_DTYPES
    if t.dtype not in allowed and t.dtype != torch.float64:
        raise TypeError(f"{opname}: {name} has dtype {t.dtype}; expected one of {allowed}")


def refresh_select(new, cached, k, impl=None):
    """Indices of the k tokens whose new K/V (or V) differ most from the cached ones.

    Args:
        new, cached: (batch, seq, heads, head_dim), same shape, dtype and device, any strides.
        k: int, 0 <= k <= seq.
        impl: None (fastest available), "reference", "cpu" or "triton".

    Returns:
        (batch, k) int64, sorted ascending per row: the k tokens of lowest cosine similarity
        <new_s, cached_s> / max(|new_s| |cached_s|, 1e-8) over heads x head_dim (float32 accumulation;
        a NaN similarity counts as -inf, i.e. most changed); equal similarities are taken lowest index
        first. k = 0 gives a (batch, 0) tensor, k = seq every index. Not differentiable.
    Dtypes: float32 / float16 / bfloat16; float64 with impl="reference".
    """
    for name, t in (("new", new), ("cached", cached)):
        _validate.check_tensor(_NAME, name, t, 4, "(batch, seq, heads, head_dim)")
    _validate.check_same(_NAME, {"new": new, "cached": cached}, "device")
    _validate.check_same(_NAME, {"new": new, "cached": cached}, "dtype")
    check_dtype("new", _NAME, new)
    if new.shape != cached.shape:
        raise ValueError(f"{_NAME}: new and cached must have the same shape, got new {tuple(new.shape)} and "
                         f"cached {tuple(cached.shape)}")
    if isinstance(k, bool) or not isinstance(k, (int, torch.SymInt)):
        raise TypeError(f"{_NAME}: k must be an int, got {type(k).__name__}")
    if not 0 <= k <= new.shape[1]:
        raise ValueError(f"{_NAME}: k must be in [0, seq={new.shape[1]}], got {k}")
    backend = _backend.select(_NAME, impl, new.device, dtype=new.dtype)
    return refresh_select_op(new, cached, k, backend)
