"""The Mamba-2 mixer of M-VAR's inter-scale layers, with its recurrent state in and out.

Structure (mamba-ssm's Mamba2 with ngroups groups, rmsnorm=True, norm_before_gate=False):
    in_proj(u) -> z (d_inner), xBC (d_inner + 2 * ngroups * d_state), dt (nheads)
    xBC -> causal depthwise conv1d (width d_conv) + SiLU -> x, B, C
    y = ssd_scan(x, dt, A = -exp(A_log), B, C, D, z, dt_bias, dt_softplus=True)   (y * silu(z) inside)
    out_proj(rmsnorm(y) * norm_weight)
The state of a sequence is (conv_state (batch, conv_dim, d_conv - 1) in the activations' dtype,
ssm_state (batch, nheads, headdim, d_state) float32, float64 for float64 activations): feeding a
sequence in pieces, each piece starting from the previous piece's state, equals feeding it whole.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import hierkern


class Mamba2Mixer(nn.Module):
    def __init__(self, width, *, d_state=64, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=64,
                 dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, A_init_range=(1.0, 16.0), norm_eps=1e-5):
        super().__init__()
        d_inner = expand * width
        if d_inner % headdim:
            raise ValueError(f"Mamba2Mixer: expand * width ({d_inner}) must be a multiple of headdim ({headdim})")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"Mamba2Mixer: nheads ({nheads}) must be a multiple of ngroups ({ngroups})")
        self.d_inner, self.nheads, self.headdim = d_inner, nheads, headdim
        self.d_state, self.ngroups, self.d_conv, self.chunk_size = d_state, ngroups, d_conv, chunk_size
        self.conv_dim = d_inner + 2 * ngroups * d_state
        self.norm_eps = norm_eps
        # one projection, laid out as mamba-ssm's [z, xBC, dt], so its weights load unchanged
        self.in_proj = nn.Linear(width, d_inner + self.conv_dim + nheads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, d_conv))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim))
        self.dt_bias = nn.Parameter(torch.empty(nheads))
        self.A_log = nn.Parameter(torch.empty(nheads))
        self.D = nn.Parameter(torch.empty(nheads))
        self.norm_weight = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, width, bias=False)
        self._dt_init = (dt_min, dt_max, dt_init_floor)
        self._A_init_range = A_init_range
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """mamba-ssm's init of everything but the projections: nn.Conv1d's default for the conv, dt
        log-uniform in [dt_min, dt_max] stored as softplus^-1 in dt_bias, A uniform in A_init_range,
        D = 1, norm weight 1."""
        bound = 1.0 / math.sqrt(self.d_conv)  # Conv1d's kaiming_uniform(a=sqrt(5)) with fan_in = d_conv
        self.conv_weight.uniform_(-bound, bound)
        self.conv_bias.uniform_(-bound, bound)
        dt_min, dt_max, floor = self._dt_init
        dt = torch.exp(torch.rand(self.nheads, device=self.dt_bias.device)
                       * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp_min(floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        lo, hi = self._A_init_range
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(lo, hi).log())
        self.D.fill_(1.0)
        self.norm_weight.fill_(1.0)

    def forward(self, u, impl, state=None, return_state=False):
        """u: (batch, length, width). impl: "reference" (PyTorch causal conv and chunked SSD) or
        "kernels" (hierkern's backends, impl=None). state: None (the sequence starts here) or the
        (conv_state, ssm_state) a previous call returned. Returns out, or (out, state)."""
        b, length, _ = u.shape
        op_impl = "reference" if impl == "reference" else None
        w_z, w_xbc, w_dt = self.in_proj.weight.split((self.d_inner, self.conv_dim, self.nheads))
        # separate products, so xBC is dense: the conv then returns it channel-last, and x / B / C
        # reach the scan as unit-stride slices
        z = F.linear(u, w_z).view(b, length, self.nheads, self.headdim)
        dt = F.linear(u, w_dt)
        conv_state, ssm_state = (None, None) if state is None else state
        xbc, conv_state = hierkern.causal_conv1d(
            F.linear(u, w_xbc).transpose(1, 2), self.conv_weight, self.conv_bias, initial_state=conv_state,
            return_final_state=True, activation="silu", impl=op_impl)
        x, B, C = xbc.transpose(1, 2).split((self.d_inner, self.ngroups * self.d_state,
                                             self.ngroups * self.d_state), dim=-1)
        # A, D and dt_bias stay in the scan's state precision even in a bf16 model
        sdt = torch.float64 if u.dtype == torch.float64 else torch.float32
        y = hierkern.ssd_scan(
            x.view(b, length, self.nheads, self.headdim), dt, -torch.exp(self.A_log.to(sdt)),
            B.view(b, length, self.ngroups, self.d_state), C.view(b, length, self.ngroups, self.d_state),
            chunk_size=self.chunk_size, D=self.D.to(sdt), z=z, dt_bias=self.dt_bias.to(sdt), dt_softplus=True,
            initial_states=ssm_state, return_final_states=return_state, impl=op_impl)
        if return_state:
            y, ssm_state = y
        y = F.rms_norm(y.reshape(b, length, self.d_inner), (self.d_inner,), self.norm_weight, eps=self.norm_eps)
        out = self.out_proj(y)
        return (out, (conv_state, ssm_state)) if return_state else out
