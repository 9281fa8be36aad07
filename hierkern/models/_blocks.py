"""VAR's transformer pieces: the AdaLN self-attention block and the AdaLN head norm.

A block does not know how its attention is computed: it gets an `attend(q, k, v, temperature)`
callable, so the same weights run whole-sequence training (any mask pattern, either impl) and
scale-by-scale cached generation.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class CosSelfAttention(nn.Module):
    """Fused qkv projection with q and v biases (k has none, as in VAR) and a learned per-head
    log-temperature initialised to log(4) (VAR's scale_mul_1H11), for cos attention."""

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads}")
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.temperature = nn.Parameter(torch.full((heads,), math.log(4.0)))
        self.proj = nn.Linear(width, width)

    def forward(self, x, attend):
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).view(B, L, 3, self.heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # (B, L, H, D) strided views: the kernels take them without copies
        out = attend(q, k, v, self.temperature)
        return self.proj(out.reshape(B, L, C))


class AdaLNBlock(nn.Module):
    """Pre-norm block whose LayerNorms have no affine parameters; the class condition supplies
    shift/scale/gate for both sub-layers. With shared AdaLN the 6-way modulation comes from one
    projection shared by all blocks, plus this block's learned offset `ada_gss`."""

    def __init__(self, width, heads, mlp_ratio, shared_aln, eps):
        super().__init__()
        self.width = width
        self.norm = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.attn = CosSelfAttention(width, heads)
        hidden = round(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, width) / width ** 0.5)
            self.ada_lin = None
        else:
            self.ada_gss = None
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, cond, attend):
        """x: (B, L, C). cond: the class embedding (B, C), or with shared AdaLN the shared projection
        (B, 6C)."""
        if self.ada_lin is None:
            ada = cond.view(-1, 1, 6, self.width) + self.ada_gss
        else:
            ada = self.ada_lin(cond).view(-1, 1, 6, self.width)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)
        x = x + self.attn(self.norm(x) * (scale1 + 1) + shift1, attend) * gamma1
        return x + self.mlp(self.norm(x) * (scale2 + 1) + shift2) * gamma2


class AdaLNHead(nn.Module):
    """Final AdaLN (shift/scale from the class embedding) and the projection to vocabulary logits."""

    def __init__(self, width, vocab_size, eps):
        super().__init__()
        self.width = width
        self.norm = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, vocab_size)

    def forward(self, x, cond_emb):
        scale, shift = self.ada_lin(cond_emb).view(-1, 1, 2, self.width).unbind(2)
        return self.out(self.norm(x) * (scale + 1) + shift)
