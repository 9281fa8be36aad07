"""Transformer pieces of the reference models: VAR's AdaLN self-attention block and AdaLN head norm
(also ACDiT's, with a plain GQA attention and per-block timestep conditioning), and the pre-norm GQA
block of BlockDiffusionLM.

A block does not know how its attention is computed: it gets an `attend` callable
(`attend(q, k, v, temperature)` for cos attention, `attend(q, k, v)` for GQASelfAttention), so the
same weights run whole-sequence training (any mask pattern, either impl) and cached generation.
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _fused


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
        return self.proj(self.heads_output(x, attend))

    def heads_output(self, x, attend):
        """The attention output (B, L, C) before the output projection."""
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).view(B, L, 3, self.heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # (B, L, H, D) strided views: the kernels take them without copies
        return attend(q, k, v, self.temperature).reshape(B, L, C)


class AdaLNBlock(nn.Module):
    """Pre-norm block whose LayerNorms have no affine parameters; the class condition supplies
    shift/scale/gate for both sub-layers. With shared AdaLN the 6-way modulation comes from one
    projection shared by all blocks, plus this block's learned offset `ada_gss`."""

    def __init__(self, width, heads, mlp_ratio, shared_aln, eps, attn=None):
        super().__init__()
        self.width = width
        self.norm = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.attn = CosSelfAttention(width, heads) if attn is None else attn
        hidden = round(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, width) / width ** 0.5)
            self.ada_lin = None
        else:
            self.ada_gss = None
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, cond, attend, fused=False):
        """x: (B, L, C). cond: the class embedding (B, C), or with shared AdaLN the shared projection
        (B, 6C); or (B, n, C) with n dividing L, row j conditioning tokens [jL/n, (j+1)L/n) (ACDiT's
        per-block timesteps). fused: the AdaLN norms, the MLP's bias + GELU and the gated residual adds
        through hierkern's fused ops (impl="kernels"; the attention must be a CosSelfAttention); else
        VAR's own PyTorch code."""
        if self.ada_lin is None:
            ada = cond.view(-1, 1, 6, self.width) + self.ada_gss
        else:
            ada = _modulation(project(self.ada_lin, cond), 6, self.width, x.shape[1])
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)
        if fused:  # the output projections' biases are added inside the gated residual adds
            h = self.attn.heads_output(_fused.adaln_norm(x, scale1, shift1, self.norm.eps), attend)
            x = _fused.gated_residual(x, F.linear(h, self.attn.proj.weight), self.attn.proj.bias, gamma1)
            h = _fused.mlp_without_bias(self.mlp, _fused.adaln_norm(x, scale2, shift2, self.norm.eps))
            return _fused.gated_residual(x, h, self.mlp[2].bias, gamma2)
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
        self._bias_deferred = False

    @contextlib.contextmanager
    def bias_deferred(self):
        """Inside, the fused forward returns the logits without self.out's bias: model.loss hands the
        bias to the fused cross-entropy, which adds it as it reads the logits (no broadcast copy of it
        into the (B*L, V) output, no separate sum of its gradient)."""
        self._bias_deferred = True
        try:
            yield
        finally:
            self._bias_deferred = False

    def forward(self, x, cond_emb, fused=False):
        """cond_emb: (B, C), or (B, n, C) per group of L/n tokens as in AdaLNBlock. fused: as there."""
        scale, shift = _modulation(project(self.ada_lin, cond_emb), 2, self.width, x.shape[1]).unbind(2)
        if fused:
            h = _fused.adaln_norm(x, scale, shift, self.norm.eps)
            return F.linear(h, self.out.weight) if self._bias_deferred else self.out(h)
        return self.out(self.norm(x) * (scale + 1) + shift)


def trunc_normal_init_(module, std, embeddings=False):
    """VAR/DiT-style init of every Linear (and, with embeddings, every Embedding) below `module`:
    truncated-normal weights of std `std`, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif embeddings and isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=std)


class ReusedCondition:
    """A condition shared by every call of a generation loop (the class embedding of all its scales and
    steps): each AdaLN projection of it runs once, on first use, instead of once per call. VAR's loop
    re-projects it at every scale; at a small scale those projections are ~1/5 of the weights a
    forward streams from memory. Blocks and heads take it wherever they take a condition tensor."""

    def __init__(self, cond):
        self.cond = cond
        self._projected = {}

    def project(self, ada_lin):
        out = self._projected.get(ada_lin)
        if out is None:
            out = self._projected[ada_lin] = ada_lin(self.cond)
        return out


def project(ada_lin, cond):
    """ada_lin(cond), reused across calls when cond is a ReusedCondition."""
    return cond.project(ada_lin) if isinstance(cond, ReusedCondition) else ada_lin(cond)


def _modulation(ada, parts, width, length):
    """(B, parts*C) -> (B, 1, parts, C), broadcast over the tokens; (B, n, parts*C) -> (B, L, parts, C)
    with row j of n repeated for the L/n tokens it conditions."""
    if ada.dim() == 2:
        return ada.view(-1, 1, parts, width)
    n = ada.shape[1]
    if length % n:
        raise ValueError(f"AdaLN: {n} conditioning rows do not divide {length} tokens")
    ada = ada.view(ada.shape[0], n, parts, width)
    return ada if n == length else ada.repeat_interleave(length // n, dim=1)


class GQASelfAttention(nn.Module):
    """Grouped-query self-attention projections (heads % kv_heads == 0). `attend(q, k, v)` gets
    (B, L, heads, D) and (B, L, kv_heads, D) tensors and applies positions (RoPE) itself, because
    positions belong to the call (training halves, a sampled block), not to the layer."""

    def __init__(self, width, heads, kv_heads, bias=False):
        super().__init__()
        if width % heads or heads % kv_heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads}, heads of kv_heads {kv_heads}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, width // heads
        self.q = nn.Linear(width, width, bias=bias)
        self.kv = nn.Linear(width, 2 * kv_heads * self.head_dim, bias=bias)
        self.proj = nn.Linear(width, width)

    def forward(self, x, attend):
        B, L, C = x.shape
        q = self.q(x).view(B, L, self.heads, self.head_dim)
        k, v = self.kv(x).view(B, L, 2, self.kv_heads, self.head_dim).unbind(2)
        return self.proj(attend(q, k, v).reshape(B, L, C))


class PreNormBlock(nn.Module):
    """Unconditioned pre-norm block (LayerNorm, GQA attention, GELU MLP), the LM backbone's."""

    def __init__(self, width, heads, kv_heads, mlp_ratio, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = GQASelfAttention(width, heads, kv_heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        hidden = round(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x, attend):
        x = x + self.attn(self.norm1(x), attend)
        return x + self.mlp(self.norm2(x))
