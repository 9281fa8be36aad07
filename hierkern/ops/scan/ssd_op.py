"""SSD scan: torch.library registration (fake kernels, autograd, Triton kernels) of the ops in
csrc/ops.cpp and the backend dispatch behind hierkern.ssd_scan.

Autograd saves only the inputs: the backward kernel recomputes the states from initial_states (one
checkpoint per chunk), so a scan costs no (b, l, h, p, n) activation memory.
"""
import torch

from ... import _backend
from ..._autograd import call_op
from . import ssd_reference

_LIB = "hierkern"


def _fake_fwd(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, chunk_size):
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    final = x.new_empty((x.shape[0], x.shape[2], x.shape[3], B.shape[3]), dtype=torch.float32)
    return out, final


def _fake_bwd(grad_out, grad_final_states, x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus,
              chunk_size):
    f32 = torch.float32
    b, _, h, p = x.shape
    contig = torch.contiguous_format
    dz = x.new_empty((0,)) if z is None else torch.empty_like(x, memory_format=contig)
    dD = x.new_empty((h, p) if D is not None and D.dim() == 2 else (h,), dtype=f32)
    return (torch.empty_like(x, memory_format=contig), torch.empty_like(dt, memory_format=contig),
            x.new_empty((h,), dtype=f32), torch.empty_like(B, memory_format=contig),
            torch.empty_like(C, memory_format=contig), dD, dz, x.new_empty((h,), dtype=f32),
            x.new_empty((b, h, p, B.shape[3]), dtype=f32))


def _setup(ctx, inputs, output):
    *tensors, dt_softplus, chunk_size = inputs
    ctx.save_for_backward(*tensors)
    ctx.args = (dt_softplus, chunk_size)


def _backward_with(bwd_name):
    def backward(ctx, grad_out, grad_final_states):
        x, dt, A, B, C, D, z, dt_bias, initial_states = ctx.saved_tensors
        dx, ddt, dA, dB, dC, dD, dz, dbias, dinit = getattr(torch.ops.hierkern, bwd_name)(
            grad_out, grad_final_states, x, dt, A, B, C, D, z, dt_bias, initial_states, *ctx.args)
        return (dx, ddt, dA, dB, dC, None if D is None else dD, None if z is None else dz,
                None if dt_bias is None else dbias, None if initial_states is None else dinit, None, None)
    return backward


_BACKWARD = {suffix: _backward_with(f"ssd_scan_bwd{suffix}") for suffix in ("", "_triton")}


def _register():
    if not _backend.has_compiled_ops():
        return
    for suffix, backward in _BACKWARD.items():
        torch.library.register_fake(f"{_LIB}::ssd_scan_fwd{suffix}")(_fake_fwd)
        torch.library.register_fake(f"{_LIB}::ssd_scan_bwd{suffix}")(_fake_bwd)
        torch.library.register_autograd(f"{_LIB}::ssd_scan_fwd{suffix}", backward, setup_context=_setup)
    if _backend.has_triton():
        # CPU tensors reach the Triton kernels only under the interpreter (tests without a GPU).
        for key in ["cuda"] + (["cpu"] if _backend.triton_interpreted() else []):
            torch.library.register_kernel(f"{_LIB}::ssd_scan_fwd_triton", key, _triton_fwd)
            torch.library.register_kernel(f"{_LIB}::ssd_scan_bwd_triton", key, _triton_bwd)


def _triton_fwd(*args):
    from . import ssd_triton  # imported on first use: importing triton costs about a second
    return ssd_triton.ssd_scan_fwd(*args)


def _triton_bwd(*args):
    from . import ssd_triton
    return ssd_triton.ssd_scan_bwd(*args)


_register()


def ssd_scan_op(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_states, backend):
    """(out, final_states) on the resolved backend (inputs already validated by the public wrapper).
    The reference backend is the chunked SSD form (the sequential one is in ssd_reference)."""
    if backend == "reference":
        return ssd_reference.ssd_scan_chunked(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus,
                                              initial_states)
    suffix = "_triton" if backend == "triton" else ""
    return call_op(getattr(torch.ops.hierkern, f"ssd_scan_fwd{suffix}"), _setup, _BACKWARD[suffix], x, dt, A, B,
                   C, D, z, dt_bias, initial_states, dt_softplus, chunk_size)
