"""selective_scan: mamba-ssm's selective_scan_fn (Mamba-1), plus an initial state so a scan can be
continued piece by piece (scale-by-scale generation) instead of re-run over the whole prefix."""
import torch

from ... import _backend, _validate
from .op import selective_scan_op

_NAME = "selective_scan"


def _check_bc(name, X, b, d, n, l, dtype):
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{_NAME}: {name} must be a torch.Tensor, got {type(X).__name__}")
    if X.dim() == 2:
        want = (d, n)
        what = "time-invariant (dim, dstate)"
    elif X.dim() == 3:
        want = (b, n, l)
        what = "variable (batch, dstate, seqlen)"
    elif X.dim() == 4:
        g = X.shape[1]
        if g < 1 or d % g:
            raise ValueError(f"{_NAME}: {name} has {g} groups (shape {tuple(X.shape)}), which does not divide "
                             f"dim = {d}; grouped {name} is (batch, groups, dstate, seqlen) with dim % groups == 0")
        want = (b, g, n, l)
        what = "grouped (batch, groups, dstate, seqlen)"
    else:
        raise ValueError(f"{_NAME}: {name} must be 2-D (dim, dstate), 3-D (batch, dstate, seqlen) or 4-D "
                         f"(batch, groups, dstate, seqlen), got shape {tuple(X.shape)}")
    if tuple(X.shape) != want:
        raise ValueError(f"{_NAME}: {what} {name} must have shape {want}, got {tuple(X.shape)}")
    if X.dtype not in (dtype, torch.float32):
        raise TypeError(f"{_NAME}: {name} has dtype {X.dtype}; expected u's dtype {dtype} or float32")


def _check_float_param(name, t, shape, state_dtype):
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_NAME}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{_NAME}: {name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != state_dtype:
        raise TypeError(f"{_NAME}: {name} must be {state_dtype}, got {t.dtype}")


def _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state):
    _validate.check_tensor(_NAME, "u", u, 3, "(batch, dim, seqlen)")
    _validate.check_tensor(_NAME, "delta", delta, 3, "(batch, dim, seqlen)")
    _validate.check_tensor(_NAME, "A", A, 2, "(dim, dstate)")
    if u.dtype not in _validate.CPU_DTYPES + (torch.float64,):
        raise TypeError(f"{_NAME}: u has dtype {u.dtype}; expected float32, bfloat16 or float16 "
                        f"(float64 with impl='reference')")
    if delta.shape != u.shape:
        raise ValueError(f"{_NAME}: delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if delta.dtype != u.dtype:
        raise TypeError(f"{_NAME}: delta has dtype {delta.dtype} but u has {u.dtype}; they must match")
    b, d, l = u.shape
    if l < 1 or b < 1 or d < 1:
        raise ValueError(f"{_NAME}: u must have batch, dim and seqlen >= 1, got shape {tuple(u.shape)}")
    # The state is float32 (float64 for the float64 ground truth), and so are A and the (d,) parameters.
    state_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    if A.dtype != state_dtype:
        raise TypeError(f"{_NAME}: A must be {state_dtype} (real-valued A as in mamba-ssm), got {A.dtype}")
    if A.shape[0] != d or A.shape[1] < 1:
        raise ValueError(f"{_NAME}: A must be (dim, dstate) with dim = {d} and dstate >= 1, got {tuple(A.shape)}")
    n = A.shape[1]
    _check_bc("B", B, b, d, n, l, u.dtype)
    _check_bc("C", C, b, d, n, l, u.dtype)
    if z is not None:
        _validate.check_tensor(_NAME, "z", z, 3, "(batch, dim, seqlen)")
        if z.shape != u.shape or z.dtype != u.dtype:
            raise ValueError(f"{_NAME}: z must match u's shape {tuple(u.shape)} and dtype {u.dtype}, got "
                             f"{tuple(z.shape)} {z.dtype}")
    _check_float_param("D", D, (d,), state_dtype)
    _check_float_param("delta_bias", delta_bias, (d,), state_dtype)
    _check_float_param("initial_state", initial_state, (b, d, n), state_dtype)
    tensors = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias,
               "initial_state": initial_state}
    _validate.check_same(_NAME, {k: t for k, t in tensors.items() if t is not None}, "device")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None, impl=None):
    """Mamba-1 selective scan (mamba-ssm's selective_scan_fn), continuable from a state.

    Per batch b and channel c, with state x (dstate,):
        dt_t = softplus(delta_t + delta_bias) (softplus only with delta_softplus; no bias if None)
        x_t = exp(dt_t * A) * x_{t-1} + dt_t * B_t * u_t,   x_{-1} = initial_state (zeros if None)
        y_t = <C_t, x_t> + D * u_t;   out_t = y_t * silu(z_t) with z

    Args:
        u, delta: (batch, dim, seqlen), same dtype: float32 / bfloat16 / float16 (float64 with
            impl="reference"). Any strides (the CPU kernel reads them in place).
        A: (dim, dstate) float32 (real).
        B, C: (dim, dstate) time-invariant, (batch, dstate, seqlen) variable, or (batch, groups, dstate,
            seqlen) grouped with dim % groups == 0 (channel c uses group c // (dim // groups));
            float32 or u's dtype.
        D, delta_bias: (dim,) float32 or None. z: like u, or None.
        return_last_state: also return the state after the last step.
        initial_state: (batch, dim, dstate) float32 or None: the state before the first step.
            Scanning a sequence in pieces, each starting from the previous piece's last state, equals
            scanning it whole (forward and backward).
        impl: None (the C++ kernel on CPU tensors, the CUDA kernel on CUDA tensors), "reference",
            "cpu" or "cuda". "cuda" runs the kernel compiled into hierkern._C, or, in a build without
            CUDA, the same kernel compiled at first use by NVRTC through cupy (pip install
            'hierkern[cupy]'); with neither it raises saying so. There is no Triton kernel:
            impl="triton" raises NotImplementedError.

    Returns:
        out (batch, dim, seqlen) in u's dtype, or (out, last_state) with last_state (batch, dim, dstate)
        float32. Differentiable in every tensor argument.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    for name, flag in (("delta_softplus", delta_softplus), ("return_last_state", return_last_state)):
        if not isinstance(flag, bool):
            raise TypeError(f"{_NAME}: {name} must be a bool, got {type(flag).__name__}")
    # The GPU backend is CUDA C++ only (compiled into hierkern._C, or NVRTC through cupy: cuda_nvrtc.py).
    backend = _backend.select(_NAME, impl, u.device, cuda_op="selective_scan_fwd", dtype=u.dtype, triton=False)
    out, last = selective_scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, backend)
    return (out, last) if return_last_state else out
