"""Selective scan: torch.library registration (fake kernels, autograd) of the C++ ops in csrc/ops.cpp
and the backend dispatch behind hierkern.selective_scan.

Autograd saves only the inputs: the backward kernel recomputes the states from initial_state, so a
scan costs no (b, d, l, n) activation memory.
"""
import torch

from ... import _backend
from . import cuda_nvrtc, reference

_LIB = "hierkern"


def _fake_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    last = u.new_empty((u.shape[0], u.shape[1], A.shape[1]), dtype=torch.float32)
    return out, last


def _fake_bwd(grad_out, grad_last_state, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    f32 = torch.float32
    b, d, _ = u.shape
    contig = torch.contiguous_format
    dz = u.new_empty((0,)) if z is None else torch.empty_like(u, memory_format=contig)
    return (torch.empty_like(u, memory_format=contig), torch.empty_like(u, memory_format=contig),
            A.new_empty(A.shape, dtype=f32), torch.empty_like(B, memory_format=contig),
            torch.empty_like(C, memory_format=contig), u.new_empty((d,), dtype=f32), dz,
            u.new_empty((d,), dtype=f32), u.new_empty((b, d, A.shape[1]), dtype=f32))


def _setup(ctx, inputs, output):
    *tensors, delta_softplus = inputs
    ctx.save_for_backward(*tensors)
    ctx.delta_softplus = delta_softplus


def _backward(ctx, grad_out, grad_last_state):
    u, delta, A, B, C, D, z, delta_bias, initial_state = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, dbias, dinit = torch.ops.hierkern.selective_scan_bwd(
        grad_out, grad_last_state, u, delta, A, B, C, D, z, delta_bias, initial_state, ctx.delta_softplus)
    return (du, ddelta, dA, dB, dC, None if D is None else dD, None if z is None else dz,
            None if delta_bias is None else dbias, None if initial_state is None else dinit, None)


def _register():
    if not _backend.has_compiled_ops():
        return
    torch.library.register_fake(f"{_LIB}::selective_scan_fwd")(_fake_fwd)
    torch.library.register_fake(f"{_LIB}::selective_scan_bwd")(_fake_bwd)
    torch.library.register_autograd(f"{_LIB}::selective_scan_fwd", _backward, setup_context=_setup)
    cuda_nvrtc.register_if_unbuilt()


_register()


def selective_scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, backend):
    """(out, last_state) on the resolved backend (inputs already validated by the public wrapper)."""
    if backend == "reference":
        return reference.selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                  return_last_state=True, initial_state=initial_state)
    return torch.ops.hierkern.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                                 delta_softplus)
