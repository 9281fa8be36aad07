"""The SSD scan (Mamba-2) as plain PyTorch, in two forms that must agree: the sequential recurrence
(one step at a time) and the chunked matrix ("SSD") form of the Mamba-2 paper. Both are
differentiable by autograd and are the executable specification the kernels are tested against.

Computation precision: float32 for float32 / bfloat16 / float16 inputs (the kernels keep a float32
state too), float64 for float64 inputs (the ground truth in tests).
"""
import torch
import torch.nn.functional as F


def _prepare(x, dt, A, B, C, dt_bias, dt_softplus, initial_states):
    """Inputs in the computation dtype: x, dt (after bias / softplus), A, B and C expanded from groups
    to heads (b, l, h, n), and the initial state (b, h, p, n) (zeros if None)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.shape[2]
    x, dt, A = x.to(ct), dt.to(ct), A.to(ct)
    if dt_bias is not None:
        dt = dt + dt_bias.to(ct)
    if dt_softplus:
        dt = F.softplus(dt)
    rep = h // B.shape[2]  # head i reads group i // rep
    B = B.to(ct).repeat_interleave(rep, dim=2)
    C = C.to(ct).repeat_interleave(rep, dim=2)
    if initial_states is None:
        S = x.new_zeros(x.shape[0], h, x.shape[3], B.shape[3])
    else:
        S = initial_states.to(ct)
    return x, dt, A, B, C, S


def _finish(y, x, D, z, out_dtype):
    if D is not None:
        D = D.to(y.dtype)
        y = y + (D[:, None] if D.dim() == 1 else D) * x
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def ssd_scan_sequential(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                        initial_states=None):
    """S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T (per batch and head, S (p, n));
    y_t = S_t C_t + D x_t;  out = y * silu(z). Returns (out in x's dtype, final state)."""
    out_dtype = x.dtype
    x, dt, A, B, C, S = _prepare(x, dt, A, B, C, dt_bias, dt_softplus, initial_states)
    ys = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]                       # (b, h, 1, 1)
        S = decay * S + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", S, C[:, t]))
    y = torch.stack(ys, dim=1)
    return _finish(y, x, D, z, out_dtype), S


def ssd_scan_chunked(x, dt, A, B, C, chunk_size=64, D=None, z=None, dt_bias=None, dt_softplus=False,
                     initial_states=None):
    """The same scan in the SSD matrix form, chunk by chunk of Q steps:
    - intra-chunk: y_i += sum_{j <= i} exp(cum_i - cum_j) <C_i, B_j> dt_j x_j  (cum: the running sum
      of dt A inside the chunk), the (Q x Q) decay-masked C B^T matrix times dt x;
    - chunk states: the state each chunk adds, sum_j exp(cum_last - cum_j) dt_j x_j B_j^T;
    - inter-chunk: the state entering chunk c is passed through the chunk's decays,
      S_c = exp(cum_last(c)) S_{c-1} + state(c), and contributes exp(cum_i) S_{c-1} C_i.
    The sequence is padded to a multiple of Q with dt = 0 steps (decay 1, no input), which leave the
    state unchanged. Returns (out in x's dtype, final state)."""
    out_dtype = x.dtype
    x, dt, A, B, C, S = _prepare(x, dt, A, B, C, dt_bias, dt_softplus, initial_states)
    b, l, h, p = x.shape
    Q = chunk_size
    pad = (-l) % Q
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    nc = (l + pad) // Q
    x, B, C = (t.reshape(b, nc, Q, h, -1) for t in (x, B, C))
    dt = dt.reshape(b, nc, Q, h)
    cum = torch.cumsum(dt * A, dim=2)                                              # (b, c, Q, h)
    # exp(cum_i - cum_j) for j <= i, 0 above the diagonal (masked before exp: no overflow there).
    diff = cum[:, :, :, None, :] - cum[:, :, None, :, :]                           # (b, c, i, j, h)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    L = torch.exp(diff.masked_fill(~causal[None, None, :, :, None], float("-inf")))
    scores = torch.einsum("bcihn,bcjhn->bcijh", C, B) * L
    dtx = dt[..., None] * x                                                        # (b, c, Q, h, p)
    y = torch.einsum("bcijh,bcjhp->bcihp", scores, dtx)
    to_end = torch.exp(cum[:, :, -1:, :] - cum)                                    # (b, c, Q, h)
    chunk_states = torch.einsum("bcjhn,bcjhp->bchpn", B * to_end[..., None], dtx)
    chunk_decay = torch.exp(cum[:, :, -1, :])                                      # (b, c, h)
    entering = []
    for c in range(nc):
        entering.append(S)
        S = chunk_decay[:, c, :, None, None] * S + chunk_states[:, c]
    S_in = torch.stack(entering, dim=1)                                            # (b, c, h, p, n)
    y = y + torch.einsum("bcihn,bchpn->bcihp", C, S_in) * torch.exp(cum)[..., None]
    y = y.reshape(b, nc * Q, h, p)[:, :l]
    return _finish(y, x.reshape(b, nc * Q, h, p)[:, :l], D, z, out_dtype), S
