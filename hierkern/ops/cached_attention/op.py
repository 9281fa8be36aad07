"""Cached attention: torch.library registration (fake kernels, autograd, Triton kernels) and the
backend dispatch behind hierkern.cached_attention.

Autograd with qk_norm: the kernels recompute the normalised q and k in-kernel in both passes and
return the gradients w.r.t. them (q_hat = normalize(q) * exp(min(t, ln 100)), k_hat = normalize(k)).
Those come back in float32 (they are intermediates). The chain rule through the normalisation and
the temperature is row-local, so it is applied here
with a few torch ops (prologue_backward) instead of in every kernel backend.
"""
import torch

from ... import _backend
from ..._autograd import below_autograd, call_op, dispatch
from ..attention import cos_attention
from . import reference

_LIB = "hierkern"
_OPS = ("cached_attn_fwd", "cached_attn_fwd_triton")


def _fake_fwd(q, k_cache, v_cache, temperature, kv_len, qk_norm, scale, num_splits):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return out, lse


def _fake_bwd(grad_out, q, k_cache, v_cache, temperature, out, lse, kv_len, qk_norm, scale):
    gdtype = torch.float32 if qk_norm else q.dtype  # see csrc/ops.cpp: float32 w.r.t. q_hat, k_hat
    return (torch.empty_like(q, dtype=gdtype), torch.empty_like(k_cache, dtype=gdtype),
            torch.empty_like(v_cache))


def prologue_backward(q, k_cache, temperature, kv_len, dq_hat, dk_hat):
    """(dq, dk_cache, dtemperature) from the float32 gradients w.r.t. the normalised q_hat and k_hat;
    dk_cache dense, zero from kv_len on."""
    dq, dk_filled, dt = cos_attention.backward(q, k_cache.narrow(1, 0, kv_len), temperature, dq_hat,
                                               dk_hat.narrow(1, 0, kv_len))
    dk = torch.zeros_like(k_cache)
    dk.narrow(1, 0, kv_len).copy_(dk_filled)
    return dq, dk, dt


def _setup(ctx, inputs, output):
    q, k_cache, v_cache, temperature, kv_len, qk_norm, scale, _ = inputs
    ctx.save_for_backward(q, k_cache, v_cache, temperature, *output)
    ctx.mark_non_differentiable(output[1])
    ctx.args = (kv_len, qk_norm, scale)


def _backward_with(bwd_op, eager):
    def backward(ctx, grad_out, grad_lse):
        q, k_cache, v_cache, temperature, out, lse = ctx.saved_tensors
        kv_len, qk_norm, scale = ctx.args
        dq, dk, dv = dispatch(bwd_op, eager, grad_out, q, k_cache, v_cache, temperature, out, lse, kv_len,
                              qk_norm, scale)
        dt = None
        if qk_norm:
            dq, dk, dt = prologue_backward(q, k_cache, temperature, kv_len, dq, dk)
        return dq, dk, dv, dt, None, None, None, None
    return backward


def _register():
    if not _backend.has_compiled_ops():
        return
    for name in _OPS:
        torch.library.register_fake(f"{_LIB}::{name}")(_fake_fwd)
        torch.library.register_fake(f"{_LIB}::{name.replace('fwd', 'bwd')}")(_fake_bwd)
    torch.library.register_autograd(f"{_LIB}::cached_attn_fwd",
                                    _backward_with(torch.ops.hierkern.cached_attn_bwd, None), setup_context=_setup)
    torch.library.register_autograd(f"{_LIB}::cached_attn_fwd_triton",
                                    _backward_with(torch.ops.hierkern.cached_attn_bwd_triton, None),
                                    setup_context=_setup)
    if _backend.has_triton():
        # CPU tensors reach the Triton kernels only under the interpreter (tests without a GPU).
        keys = ["cuda"] + (["cpu"] if _backend.triton_interpreted() else [])
        for key in keys:
            torch.library.register_kernel(f"{_LIB}::cached_attn_fwd_triton", key, _triton_fwd)
            torch.library.register_kernel(f"{_LIB}::cached_attn_bwd_triton", key, _triton_bwd)


def _triton_fwd(q, k_cache, v_cache, temperature, kv_len, qk_norm, scale, num_splits):
    from . import triton as tk  # imported on first use: importing triton costs about a second
    return tk.cached_attn_fwd(q, k_cache, v_cache, temperature, kv_len, qk_norm, scale, num_splits)


def _triton_bwd(grad_out, q, k_cache, v_cache, temperature, out, lse, kv_len, qk_norm, scale):
    from . import triton as tk
    return tk.cached_attn_bwd(grad_out, q, k_cache, v_cache, temperature, out, lse, kv_len, qk_norm, scale)


_register()


def cached_attention_op(q, k_cache, v_cache, kv_len, scale, qk_norm, temperature, impl, num_splits=0,
                        return_lse=False):
    """Run cached attention on the resolved backend (inputs already validated by the public wrapper).
    num_splits: split-KV chunk count for the kernels (0: automatic)."""
    if impl == "reference":
        out, lse = reference.cached_attention_reference(q, k_cache, v_cache, kv_len, scale, qk_norm, temperature,
                                                        return_lse=True)
    else:
        if impl == "triton":
            op, bwd = torch.ops.hierkern.cached_attn_fwd_triton, torch.ops.hierkern.cached_attn_bwd_triton
            eager, eager_bwd = _triton_fwd, _triton_bwd
        else:
            op, bwd = torch.ops.hierkern.cached_attn_fwd, torch.ops.hierkern.cached_attn_bwd
            eager, eager_bwd = below_autograd(op), below_autograd(bwd)
        out, lse = call_op(op, _setup, _backward_with(bwd, eager_bwd), q, k_cache, v_cache, temperature, kv_len,
                           qk_norm, scale, num_splits, eager=eager)
    return (out, lse) if return_lse else out
