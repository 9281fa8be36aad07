"""causal_conv1d: the causal depthwise conv1d of a Mamba block (its short conv), with conv state in and
out, compatible with the causal-conv1d package's causal_conv1d_fn."""
import torch

from ... import _backend, _validate
from .op import causal_conv1d_op

_NAME = "causal_conv1d"
MIN_WIDTH, MAX_WIDTH = 2, 4
_ACTIVATIONS = {None: False, "silu": True, "swish": True}


def _check_optional(name, t, shape, x):
    if t is None:
        return
    _validate.check_tensor(_NAME, name, t, len(shape), "")
    if tuple(t.shape) != shape:
        raise ValueError(f"{_NAME}: {name} must have shape {shape}, got {tuple(t.shape)}")
    _validate.check_same(_NAME, {"x": x, name: t}, "device")
    _validate.check_same(_NAME, {"x": x, name: t}, "dtype")


def causal_conv1d(x, weight, bias=None, initial_state=None, return_final_state=False, activation=None,
                  impl=None):
    """out[b, c, t] = act(bias[c] + sum_k weight[c, k] * xpad[b, c, t + k]), xpad = cat(initial_state, x).

    Args:
        x: (batch, dim, seqlen), seqlen >= 1, any strides: a channel-last view y.transpose(1, 2) of a
            contiguous (batch, seqlen, dim) y (what Mamba-2 passes) is read in place, never copied.
        weight: (dim, width), 2 <= width <= 4.
        bias: (dim,) or None.
        initial_state: (batch, dim, width - 1) or None (zeros): the last width - 1 inputs before x.
        return_final_state: also return final_state (batch, dim, width - 1), the last width - 1 columns
            of xpad; passing it as the next call's initial_state continues the sequence exactly (also when
            seqlen < width - 1, where part of it comes from initial_state).
        activation: None, "silu" or "swish" (the same).
        impl: None (C++ kernels for CPU tensors, Triton for CUDA tensors), "reference", "cpu" or "triton".

    Returns:
        out, or (out, final_state). out has x's shape and dtype, and x's memory layout when x is dense
        (contiguous or channel-last), else it is contiguous; final_state is contiguous. Differentiable in x,
        weight, bias and initial_state (final_state's gradient flows back into x and initial_state).
    Dtypes: float32, float16, bfloat16 (all tensors share x's dtype); accumulation in float32.
    float64 with impl="reference".
    """
    _validate.check_tensor(_NAME, "x", x, 3, "(batch, dim, seqlen)")
    _validate.check_tensor(_NAME, "weight", weight, 2, "(dim, width)")
    batch, dim, seqlen = x.shape
    if seqlen < 1:
        raise ValueError(f"{_NAME}: x must hold at least one time step, got shape {tuple(x.shape)}")
    if weight.shape[0] != dim:
        raise ValueError(f"{_NAME}: weight has {weight.shape[0]} channels but x has dim {dim}; "
                         f"weight must be (dim, width)")
    width = weight.shape[1]
    if not MIN_WIDTH <= width <= MAX_WIDTH:
        raise ValueError(f"{_NAME}: weight width {width} is not supported; expected {MIN_WIDTH} <= width "
                         f"<= {MAX_WIDTH}")
    _validate.check_same(_NAME, {"x": x, "weight": weight}, "device")
    _validate.check_same(_NAME, {"x": x, "weight": weight}, "dtype")
    allowed = _validate.CPU_DTYPES if x.device.type == "cpu" else _validate.GPU_DTYPES
    if x.dtype not in allowed and x.dtype != torch.float64:
        raise TypeError(f"{_NAME}: x has dtype {x.dtype}; expected one of {allowed}")
    _check_optional("bias", bias, (dim,), x)
    _check_optional("initial_state", initial_state, (batch, dim, width - 1), x)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{_NAME}: activation must be None, 'silu' or 'swish', got {activation!r}")
    if impl == "cuda":
        raise NotImplementedError(f"{_NAME}: there is no CUDA C++ kernel for causal_conv1d (backend 'cuda'); "
                                  f"use impl='triton' or impl=None on CUDA tensors")
    backend = _backend.select(_NAME, impl, x.device, dtype=x.dtype)
    out, final_state = causal_conv1d_op(x, weight, bias, initial_state, _ACTIVATIONS[activation], backend)
    return (out, final_state) if return_final_state else out
