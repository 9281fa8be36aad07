"""The selective scan as plain PyTorch: the sequential recurrence, one step at a time. This is the
executable specification (differentiable by autograd) that every kernel is tested against.

Computation precision: float32 for float32 / bfloat16 / float16 inputs (the kernels keep a float32
state too), float64 for float64 inputs (the ground truth in tests).
"""
import torch
import torch.nn.functional as F


def _per_step(X, d):
    """B or C as a function t -> (b or 1, d or 1, n): time-invariant (d, n), variable (b, n, l) or
    grouped (b, g, n, l), where channel c belongs to group c // (d // g)."""
    if X.dim() == 2:
        return lambda t: X.unsqueeze(0)
    if X.dim() == 3:
        return lambda t: X[:, None, :, t]
    grouped = X.repeat_interleave(d // X.shape[1], dim=1)  # (b, d, n, l)
    return lambda t: grouped[..., t]


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False, initial_state=None):
    """x_t = exp(dt_t * A) * x_{t-1} + dt_t * B_t * u_t;  y_t = <C_t, x_t> + D * u_t;  out = y * silu(z),
    with dt = softplus(delta + delta_bias) (softplus only if delta_softplus) and x_{-1} = initial_state
    (zeros if None). Shapes as hierkern.selective_scan. Returns out in u's dtype, and with
    return_last_state the state after the last step (float32, float64 for float64 inputs)."""
    ct = torch.float64 if u.dtype == torch.float64 else torch.float32
    out_dtype = u.dtype
    b, d, l = u.shape
    u, delta, A = u.to(ct), delta.to(ct), A.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B_t, C_t = _per_step(B.to(ct), d), _per_step(C.to(ct), d)
    if initial_state is None:
        x = u.new_zeros(b, d, A.shape[1])
    else:
        x = initial_state.to(ct)
    ys = []
    for t in range(l):
        dt = delta[:, :, t, None]
        x = torch.exp(dt * A) * x + dt * B_t(t) * u[:, :, t, None]
        ys.append((x * C_t(t)).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(ct)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(ct))
    out = y.to(out_dtype)
    return (out, x) if return_last_state else out
