"""ssd_scan: the Mamba-2 SSD scan (mamba-ssm's mamba_chunk_scan_combined), plus an initial state so a
scan can be continued piece by piece (scale-by-scale generation) instead of re-run over the prefix."""
import torch

from ... import _backend, _validate
from .ssd_op import ssd_scan_op

_NAME = "ssd_scan"


def _check_param(name, t, shapes, state_dtype):
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_NAME}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) not in shapes:
        want = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{_NAME}: {name} must have shape {want}, got {tuple(t.shape)}")
    if t.dtype != state_dtype:
        raise TypeError(f"{_NAME}: {name} must be {state_dtype}, got {t.dtype}")


def _check_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states):
    _validate.check_tensor(_NAME, "x", x, 4, "(batch, seqlen, nheads, headdim)")
    _validate.check_tensor(_NAME, "dt", dt, 3, "(batch, seqlen, nheads)")
    _validate.check_tensor(_NAME, "A", A, 1, "(nheads,)")
    _validate.check_tensor(_NAME, "B", B, 4, "(batch, seqlen, ngroups, dstate)")
    _validate.check_tensor(_NAME, "C", C, 4, "(batch, seqlen, ngroups, dstate)")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{_NAME}: chunk_size must be a positive int, got {chunk_size!r}")
    if x.dtype not in _validate.CPU_DTYPES + (torch.float64,):
        raise TypeError(f"{_NAME}: x has dtype {x.dtype}; expected float32, bfloat16 or float16 "
                        f"(float64 with impl='reference')")
    b, l, h, p = x.shape
    if min(b, l, h, p) < 1:
        raise ValueError(f"{_NAME}: x must have batch, seqlen, nheads and headdim >= 1, got shape {tuple(x.shape)}")
    if tuple(dt.shape) != (b, l, h):
        raise ValueError(f"{_NAME}: dt must have shape (batch, seqlen, nheads) = {(b, l, h)}, got {tuple(dt.shape)}")
    if dt.dtype != x.dtype:
        raise TypeError(f"{_NAME}: dt has dtype {dt.dtype} but x has {x.dtype}; they must match")
    state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if A.dtype != state_dtype:
        raise TypeError(f"{_NAME}: A must be {state_dtype} (one real, negative value per head), got {A.dtype}")
    if tuple(A.shape) != (h,):
        raise ValueError(f"{_NAME}: A must have shape (nheads,) = {(h,)}, got {tuple(A.shape)}")
    g, n = B.shape[2], B.shape[3]
    if g < 1 or h % g:
        raise ValueError(f"{_NAME}: B has {g} groups (shape {tuple(B.shape)}), which does not divide nheads = {h}; "
                         f"B and C are (batch, seqlen, ngroups, dstate) with nheads % ngroups == 0")
    if n < 1:
        raise ValueError(f"{_NAME}: B must have dstate >= 1, got shape {tuple(B.shape)}")
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (b, l, g, n):
            raise ValueError(f"{_NAME}: {name} must have shape (batch, seqlen, ngroups, dstate) = {(b, l, g, n)}, "
                             f"got {tuple(t.shape)}")
        if t.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{_NAME}: {name} has dtype {t.dtype}; expected x's dtype {x.dtype} or float32")
    if z is not None:
        _validate.check_tensor(_NAME, "z", z, 4, "(batch, seqlen, nheads, headdim)")
        if z.shape != x.shape or z.dtype != x.dtype:
            raise ValueError(f"{_NAME}: z must match x's shape {tuple(x.shape)} and dtype {x.dtype}, got "
                             f"{tuple(z.shape)} {z.dtype}")
    _check_param("D", D, ((h,), (h, p)), state_dtype)
    _check_param("dt_bias", dt_bias, ((h,),), state_dtype)
    _check_param("initial_states", initial_states, ((b, h, p, n),), state_dtype)
    tensors = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias,
               "initial_states": initial_states}
    _validate.check_same(_NAME, {k: t for k, t in tensors.items() if t is not None}, "device")


def ssd_scan(x, dt, A, B, C, chunk_size=64, D=None, z=None, dt_bias=None, dt_softplus=False,
             initial_states=None, return_final_states=False, impl=None):
    """Mamba-2 SSD scan (mamba-ssm's mamba_chunk_scan_combined), continuable from a state.

    Per batch and head i, with state S (headdim, dstate) and B / C of group i // (nheads // ngroups):
        dt_t = softplus(dt_t + dt_bias) (softplus only with dt_softplus; no bias if None)
        S_t = exp(dt_t * A_i) * S_{t-1} + dt_t * x_t B_t^T,   S_{-1} = initial_states (zeros if None)
        y_t = S_t C_t + D * x_t;   out_t = y_t * silu(z_t) with z

    Args:
        x: (batch, seqlen, nheads, headdim) float32 / bfloat16 / float16 (float64 with
            impl="reference"). Any strides (the CPU kernel reads them in place). dt: (batch, seqlen,
            nheads), x's dtype. z: like x, or None.
        A: (nheads,) float32 (negative reals).
        B, C: (batch, seqlen, ngroups, dstate) with nheads % ngroups == 0; float32 or x's dtype.
        chunk_size: positive int; only how the computation is blocked in time (the reference's SSD
            chunks, the CPU kernel's time blocks and backward checkpoints). Results agree across
            chunk sizes to rounding.
        D: (nheads,) or (nheads, headdim) float32 or None. dt_bias: (nheads,) float32 or None.
        initial_states: (batch, nheads, headdim, dstate) float32 or None. Scanning a sequence in
            pieces, each from the previous piece's final states, equals scanning it whole (forward
            and backward).
        return_final_states: also return the state after the last step.
        impl: None (the C++ kernel on CPU tensors, the Triton kernels on CUDA tensors), "reference"
            (the chunked PyTorch form), "cpu" or "triton" (chunked SSD, 16-bit inputs on tensor cores; the
            kernels' own chunks whatever chunk_size: 64 steps on the GPU, 32 for float32; headdim and
            dstate up to 128). There is no CUDA C++
            kernel: "cuda" raises NotImplementedError.

    Returns:
        out (batch, seqlen, nheads, headdim) in x's dtype, or (out, final_states) with final_states
        (batch, nheads, headdim, dstate) float32. Differentiable in every tensor argument.
    """
    _check_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states)
    for name, flag in (("dt_softplus", dt_softplus), ("return_final_states", return_final_states)):
        if not isinstance(flag, bool):
            raise TypeError(f"{_NAME}: {name} must be a bool, got {type(flag).__name__}")
    # No CUDA C++ kernel (cuda_op=None): impl="cuda" raises NotImplementedError, None on CUDA picks Triton.
    backend = _backend.select(_NAME, impl, x.device, dtype=x.dtype)
    if backend == "triton":
        from .ssd_triton import check_dims
        check_dims(x.shape[3], B.shape[3])
    out, final = ssd_scan_op(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_states, backend)
    return (out, final) if return_final_states else out
