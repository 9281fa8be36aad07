"""Axial attention: torch.library registration (fake kernels, autograd, Triton kernels) and the backend
dispatch behind hierkern.axial_attention."""
import torch

from ... import _backend
from ..._autograd import call_op
from . import reference

_LIB = "hierkern"


def _fake_fwd(q, k, v, axis, causal, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty(q.shape[:4], dtype=torch.float32)


def _fake_bwd(grad_out, q, k, v, out, lse, axis, causal, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


# The forward saves q, k, v, out and the float32 log-sum-exp; the backward recomputes P tile by tile.
def _setup(ctx, inputs, output):
    q, k, v, axis, causal, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.mark_non_differentiable(output[1])
    ctx.args = (axis, causal, scale)


def _backward_with(op_name):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = getattr(torch.ops.hierkern, op_name)(grad_out, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None
    return backward


_bwd_compiled = _backward_with("axial_attn_bwd")
_bwd_triton = _backward_with("axial_attn_bwd_triton")


def _register():
    if not _backend.has_compiled_ops():
        return
    for suffix, bwd in (("", _bwd_compiled), ("_triton", _bwd_triton)):
        torch.library.register_fake(f"{_LIB}::axial_attn_fwd{suffix}")(_fake_fwd)
        torch.library.register_fake(f"{_LIB}::axial_attn_bwd{suffix}")(_fake_bwd)
        torch.library.register_autograd(f"{_LIB}::axial_attn_fwd{suffix}", bwd, setup_context=_setup)
    if _backend.has_triton():
        # CPU tensors reach the Triton kernels only under the interpreter (tests without a GPU).
        keys = ["cuda"] + (["cpu"] if _backend.triton_interpreted() else [])
        for key in keys:
            torch.library.register_kernel(f"{_LIB}::axial_attn_fwd_triton", key, _triton_fwd)
            torch.library.register_kernel(f"{_LIB}::axial_attn_bwd_triton", key, _triton_bwd)


def _triton_fwd(q, k, v, axis, causal, scale):
    from . import triton as tk  # imported on first use: importing triton costs about a second
    return tk.axial_attn_fwd(q, k, v, axis, causal, scale)


def _triton_bwd(grad_out, q, k, v, out, lse, axis, causal, scale):
    from . import triton as tk
    return tk.axial_attn_bwd(grad_out, q, k, v, out, lse, axis, causal, scale)


_register()


def axial_attention_op(q, k, v, axis, causal, scale, impl):
    """out on the resolved backend (inputs already validated by the public wrapper)."""
    if impl == "reference":
        return reference.axial_attention_reference(q, k, v, axis, causal, scale)
    if impl == "triton":
        op, bwd = torch.ops.hierkern.axial_attn_fwd_triton, _bwd_triton
    else:  # "cpu": the C++ op
        op, bwd = torch.ops.hierkern.axial_attn_fwd, _bwd_compiled
    return call_op(op, _setup, bwd, q, k, v, axis, causal, scale)[0]
