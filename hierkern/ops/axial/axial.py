"""axial_attention: attention along one axis of a channel-last (batch, H, W, heads, head_dim) image,
without the permute copies that running column attention through SDPA needs."""
import torch

from ... import _backend, _validate
from .op import axial_attention_op

_NAME = "axial_attention"
_DOC = "(batch, H, W, heads, head_dim)"
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128  # the GPU tiles are sized (and spill-checked) up to 128


def _check(q, k, v, axis, causal):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _validate.check_tensor(_NAME, name, t, 5, _DOC)
    _validate.check_same(_NAME, {"q": q, "k": k, "v": v}, "device")
    _validate.check_same(_NAME, {"q": q, "k": k, "v": v}, "dtype")
    allowed = _validate.CPU_DTYPES if q.device.type == "cpu" else _validate.GPU_DTYPES
    if q.dtype not in allowed and q.dtype != torch.float64:
        raise TypeError(f"{_NAME}: q has dtype {q.dtype}; expected one of {allowed}")
    if isinstance(axis, bool) or not isinstance(axis, int) or axis not in (1, 2):
        raise ValueError(f"{_NAME}: axis must be 1 (attend along H, within each column) or 2 (along W, "
                         f"within each row), got {axis!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"{_NAME}: causal must be a bool, got {type(causal).__name__}")
    if k.shape != v.shape:
        raise ValueError(f"{_NAME}: k and v must have the same shape, got k {tuple(k.shape)} and "
                         f"v {tuple(v.shape)}")
    for i, what in ((0, "batch"), (1, "H"), (2, "W"), (4, "head_dim")):
        if k.shape[i] != q.shape[i]:
            raise ValueError(f"{_NAME}: k/v have {what} {k.shape[i]} but q has {what} {q.shape[i]}")
    if k.shape[3] == 0 or q.shape[3] % k.shape[3] != 0:
        raise ValueError(f"{_NAME}: q heads ({q.shape[3]}) must be a multiple of k/v heads ({k.shape[3]}) (GQA)")
    if min(q.shape[:3]) < 1:
        raise ValueError(f"{_NAME}: batch, H and W must be >= 1, got q shape {tuple(q.shape)}")
    d = q.shape[4]
    if not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM and d % 8 == 0):
        raise ValueError(f"{_NAME}: head_dim {d} is not supported; expected a multiple of 8 in "
                         f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")


def axial_attention(q, k, v, axis, causal=False, scale=None, impl=None):
    """Attention along one image axis: out[b, i, j, h] attends to the positions of its column (axis=1:
    keys (b, :, j)) or of its row (axis=2: keys (b, i, :)).

    Args:
        q: (batch, H, W, heads, head_dim); k, v: (batch, H, W, kv_heads, head_dim) with heads a multiple
            of kv_heads (GQA: q head i reads kv head i // (heads // kv_heads)). Any strides: the kernels
            index by stride (a column is read at the H stride), nothing is permuted or copied.
        axis: 1 (along H, within each column) or 2 (along W, within each row).
        causal: position p along the axis sees positions <= p only.
        scale: softmax scale, default head_dim ** -0.5.
        impl: None (C++ kernels for CPU tensors, Triton for CUDA tensors), "reference", "cpu" or "triton".

    Returns:
        out (batch, H, W, heads, head_dim), contiguous (channel-last), q's dtype. Differentiable in q, k, v.
    Dtypes: float32, bfloat16, float16 (accumulation in float32); float64 with impl="reference".
    head_dim: a multiple of 8 in [16, 128].
    """
    _check(q, k, v, axis, causal)
    scale = _validate.resolve_scale(_NAME, scale, q.shape[4])
    if impl == "cuda":
        raise NotImplementedError(f"{_NAME}: there is no CUDA C++ kernel for axial attention (backend 'cuda'); "
                                  f"use impl='triton' or impl=None on CUDA tensors")
    backend = _backend.select(_NAME, impl, q.device, dtype=q.dtype)
    return axial_attention_op(q, k, v, axis, causal, scale, backend)
