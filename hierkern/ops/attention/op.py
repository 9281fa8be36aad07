"""Interval attention: torch.library registration (fake kernels, autograd, Triton kernels) and the
backend dispatch behind every public attention wrapper (next_scale_attention, ...)."""
import torch

from ... import _backend
from ..._autograd import below_autograd, call_op, dispatch
from . import cos_attention, reference, tiling

_LIB = "hierkern"


def _fake_fwd(q, k, v):
    out = q.new_empty(q.shape[:3] + (v.shape[3],))
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return out, lse


def _fake_bwd(q, k, v):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# Autograd: the forward saves q, k, v, out and the float32 log-sum-exp; the backward recomputes
# the probabilities tile by tile (no L x L tensor is kept). The lse output is not differentiable.
# With a temperature (qk_norm) the backward kernels return gradients with respect to the
# normalised q_hat, k_hat and cos_attention.backward finishes the chain rule to q, k and temperature.
def _setup(ctx, inputs, output):
    ctx.n_meta = len(inputs) - 7  # tensors between q, k, v and the trailing scalars
    ctx.save_for_backward(*inputs[:3 + ctx.n_meta], inputs[-1], *output)
    ctx.mark_non_differentiable(output[1])
    ctx.args = inputs[3 + ctx.n_meta:-1]


def _setup_triton(ctx, inputs, output):
    _setup(ctx, inputs, output)
    from . import triton as tk
    q = inputs[0]
    # The configs the backward tiles (dq_tiles, k_tiles) were cut for, pinned for the backward.
    ctx.triton_bwd_configs = tk.bwd_configs(q.shape[-1], q.dtype, q.device)


def _finish(ctx, q, k, temperature, dq, dk, dv):
    dt = None
    if temperature is not None:
        dq, dk, dt = cos_attention.backward(q, k, temperature, dq, dk)
    return (dq, dk, dv) + (None,) * (ctx.n_meta + len(ctx.args)) + (dt,)


def _bwd_compiled(ctx, grad_out, grad_lse):
    q, k, v, offsets, temperature, out, lse = ctx.saved_tensors
    op = torch.ops.hierkern.interval_attn_bwd
    dq, dk, dv = dispatch(op, below_autograd(op), grad_out, q, k, v, out, lse, offsets, *ctx.args, temperature)
    return _finish(ctx, q, k, temperature, dq, dk, dv)


def _bwd_triton(ctx, grad_out, grad_lse):
    from . import triton as tk
    q, k, v, offsets, _, dq_tiles, k_tiles, temperature, out, lse = ctx.saved_tensors
    with tk.pinned_bwd_configs(q.shape[-1], q.dtype, q.device, ctx.triton_bwd_configs):
        dq, dk, dv = dispatch(torch.ops.hierkern.interval_attn_bwd_triton, _triton_bwd,
                              grad_out, q, k, v, out, lse, offsets, dq_tiles, k_tiles, *ctx.args, temperature)
    return _finish(ctx, q, k, temperature, dq, dk, dv)


def _register():
    if not _backend.has_compiled_ops():
        return

    @torch.library.register_fake(f"{_LIB}::interval_attn_fwd")
    def _(q, k, v, offsets, pattern, block_size, scale, temperature=None):
        return _fake_fwd(q, k, v)

    @torch.library.register_fake(f"{_LIB}::interval_attn_bwd")
    def _(grad_out, q, k, v, out, lse, offsets, pattern, block_size, scale, temperature=None):
        return _fake_bwd(q, k, v)

    @torch.library.register_fake(f"{_LIB}::interval_attn_fwd_triton")
    def _(q, k, v, offsets, q_tiles, dq_tiles, k_tiles, pattern, block_size, scale, temperature=None):
        return _fake_fwd(q, k, v)

    @torch.library.register_fake(f"{_LIB}::interval_attn_bwd_triton")
    def _(grad_out, q, k, v, out, lse, offsets, dq_tiles, k_tiles, pattern, block_size, scale,
          temperature=None):
        return _fake_bwd(q, k, v)

    torch.library.register_autograd(f"{_LIB}::interval_attn_fwd", _bwd_compiled, setup_context=_setup)
    torch.library.register_autograd(f"{_LIB}::interval_attn_fwd_triton", _bwd_triton, setup_context=_setup_triton)

    if _backend.has_triton():
        # CPU tensors reach the Triton kernels only under the interpreter (tests without a GPU).
        keys = ["cuda"] + (["cpu"] if _backend.triton_interpreted() else [])
        for key in keys:
            torch.library.register_kernel(f"{_LIB}::interval_attn_fwd_triton", key, _triton_fwd)
            torch.library.register_kernel(f"{_LIB}::interval_attn_bwd_triton", key, _triton_bwd)


def _triton_fwd(q, k, v, offsets, q_tiles, dq_tiles, k_tiles, pattern, block_size, scale, temperature=None):
    from . import triton as tk  # imported on first use: importing triton costs about a second
    return tk.interval_attn_fwd(q, k, v, offsets, q_tiles, pattern, block_size, scale, temperature)


def _triton_bwd(grad_out, q, k, v, out, lse, offsets, dq_tiles, k_tiles, pattern, block_size, scale,
                temperature=None):
    from . import triton as tk
    return tk.interval_attn_bwd(grad_out, q, k, v, out, lse, offsets, dq_tiles, k_tiles, pattern,
                                block_size, scale, temperature)


_register()


def interval_attention(q, k, v, offsets, offsets_tensor, pattern, block_size, scale, impl,
                       opname, return_lse=False, temperature=None):
    """Run interval attention on the resolved backend.

    offsets: the host tuple of cumulative segment offsets; offsets_tensor(device) returns the cached
    int32 device copy. temperature: None, or the (H,) cos-attention temperature (qk_norm prologue).
    Inputs are already validated by the public wrapper."""
    if impl == "reference":
        if temperature is not None:
            q, k = cos_attention.reference(q, k, temperature)
        out, lse = reference.interval_attention_reference(q, k, v, offsets, pattern, scale, return_lse=True,
                                                           block_size=block_size)
    elif impl == "triton":
        from . import triton as tk
        d = q.shape[-1]
        fbm, _ = tk.fwd_blocks(d, q.dtype, q.device)
        bbm, bbn = tk.bwd_blocks(d, q.dtype, q.device)
        out, lse = call_op(
            torch.ops.hierkern.interval_attn_fwd_triton, _setup_triton, _bwd_triton, q, k, v, offsets_tensor(q.device),
            tiling.q_tiles(offsets, pattern, fbm, q.device, block_size),
            tiling.q_tiles(offsets, pattern, bbm, q.device, block_size),
            tiling.k_tiles(offsets, pattern, bbn, q.device, block_size), pattern, block_size, scale, temperature,
            eager=_triton_fwd)
    else:  # "cpu" or "cuda": the C++ op, dispatched on the tensors' device
        op = torch.ops.hierkern.interval_attn_fwd
        out, lse = call_op(op, _setup, _bwd_compiled, q, k, v, offsets_tensor(q.device), pattern, block_size, scale,
                           temperature, eager=below_autograd(op))
    return (out, lse) if return_lse else out
