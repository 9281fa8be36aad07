"""Causal conv1d: torch.library registration (fake kernels, autograd, Triton kernels) and the backend
dispatch behind hierkern.causal_conv1d.

Autograd: final_state is xpad's last width - 1 columns, so its gradient flows back into x and
initial_state; the backward ops take it (None when final_state was not used) and fold it in.
"""
import torch

from ... import _backend
from . import reference

_LIB = "hierkern"


def _fake_fwd(x, weight, bias, initial_state, silu):
    out = torch.empty_like(x)
    final_state = x.new_empty((x.shape[0], x.shape[1], weight.shape[1] - 1))
    return out, final_state


def _fake_bwd(grad_out, grad_final_state, x, weight, bias, initial_state, silu):
    return (torch.empty_like(x), torch.empty_like(weight, memory_format=torch.contiguous_format),
            x.new_empty((x.shape[1],)), x.new_empty((x.shape[0], x.shape[1], weight.shape[1] - 1)))


def _setup(ctx, inputs, output):
    x, weight, bias, initial_state, silu = inputs
    ctx.save_for_backward(x, weight, bias, initial_state)
    ctx.silu = silu


def _backward_with(bwd_op):
    def backward(ctx, grad_out, grad_final_state):
        x, weight, bias, initial_state = ctx.saved_tensors
        dx, dw, db, dinit = bwd_op(grad_out, grad_final_state, x, weight, bias, initial_state, ctx.silu)
        return (dx, dw, None if bias is None else db, None if initial_state is None else dinit, None)
    return backward


def _register():
    if not _backend.has_compiled_ops():
        return
    for suffix in ("", "_triton"):
        torch.library.register_fake(f"{_LIB}::causal_conv1d_fwd{suffix}")(_fake_fwd)
        torch.library.register_fake(f"{_LIB}::causal_conv1d_bwd{suffix}")(_fake_bwd)
        bwd = getattr(torch.ops.hierkern, f"causal_conv1d_bwd{suffix}")
        torch.library.register_autograd(f"{_LIB}::causal_conv1d_fwd{suffix}", _backward_with(bwd),
                                        setup_context=_setup)
    if _backend.has_triton():
        # CPU tensors reach the Triton kernels only under the interpreter (tests without a GPU).
        keys = ["cuda"] + (["cpu"] if _backend.triton_interpreted() else [])
        for key in keys:
            torch.library.register_kernel(f"{_LIB}::causal_conv1d_fwd_triton", key, _triton_fwd)
            torch.library.register_kernel(f"{_LIB}::causal_conv1d_bwd_triton", key, _triton_bwd)


def _triton_fwd(x, weight, bias, initial_state, silu):
    from . import triton as tk  # imported on first use: importing triton costs about a second
    return tk.causal_conv1d_fwd(x, weight, bias, initial_state, silu)


def _triton_bwd(grad_out, grad_final_state, x, weight, bias, initial_state, silu):
    from . import triton as tk
    return tk.causal_conv1d_bwd(grad_out, grad_final_state, x, weight, bias, initial_state, silu)


_register()


def causal_conv1d_op(x, weight, bias, initial_state, silu, impl):
    """(out, final_state) on the resolved backend (inputs already validated by the public wrapper)."""
    if impl == "reference":
        return reference.causal_conv1d_reference(x, weight, bias, initial_state, silu)
    op = torch.ops.hierkern.causal_conv1d_fwd_triton if impl == "triton" else torch.ops.hierkern.causal_conv1d_fwd
    return op(x, weight, bias, initial_state, silu)
