"""Causal depthwise conv1d, plain PyTorch: the executable specification (any device, any float dtype,
autograd for every input).

    xpad = cat(initial_state, x) along time           (zeros of width - 1 columns when None)
    out[b, c, t] = act(bias[c] + sum_k weight[c, k] * xpad[b, c, t + k])
    final_state = xpad[:, :, -(width - 1):]           (feeding it back as initial_state continues x)
"""
import torch
import torch.nn.functional as F


def causal_conv1d_reference(x, weight, bias=None, initial_state=None, silu=False):
    """Returns (out, final_state). Accumulates in float32 for 16-bit inputs (float64 stays float64), as
    the kernels do, and rounds the result to x's dtype."""
    width = weight.shape[1]
    if initial_state is None:
        initial_state = x.new_zeros(x.shape[0], x.shape[1], width - 1)
    xpad = torch.cat([initial_state, x], dim=2)
    final_state = xpad[:, :, xpad.shape[2] - (width - 1):]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = F.conv1d(xpad.to(acc), weight.to(acc).unsqueeze(1), None if bias is None else bias.to(acc),
                   groups=x.shape[1])
    if silu:
        out = F.silu(out)
    return out.to(x.dtype), final_state
