"""AxialTransformer: the Axial Transformer (Ho et al., 2019) for images, an autoregressive model over
pixels in raster order built from axial attention only.

    e        = channel embedding of the image (B, H, W, width): sum over channels c of Embed[c, x_c]
    context  = outer decoder(shift_down(e) + positions): blocks of unmasked row attention and causal
               column attention; the one-row shift makes row i's context depend on rows < i only
    h        = inner decoder(shift_right(e) + context): blocks of causal row attention; the one-pixel
               shift makes pixel (i, j) depend on pixels (i, < j) of its row
    logits   = head(h) (B, H, W, channels, levels)

Each pixel's channels are predicted jointly from the pixels before it (independent categoricals given
that context; the paper's channel ordering inside a pixel is not modelled). Sampling is semi-parallel:
the outer decoder runs once per row (on rows <= i: its column attention is causal, so the rows below
change nothing), and the inner decoder decodes the row pixel by pixel over a per-layer KV cache (one
new position per step) instead of re-running the row for every pixel, as the official code does.

impl="reference": permute + F.scaled_dot_product_attention for row and column attention, torch.cat KV
caches in sampling. impl="kernels": hierkern.axial_attention (strided, no permute copies) and
hierkern.KVCache + hierkern.cached_attention.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import hierkern
from . import _attention
from ._blocks import PreNormBlock, trunc_normal_init_
from ._next_scale import _INT_DTYPES, _check_positive_int
from ._sampling import sample as sample_ids

_APIS = ("axial_attention", "KVCache", "cached_attention")


def _sdpa_axial(q, k, v, axis, causal):
    """The eager baseline: permute the axis next to head_dim (copies for column attention), SDPA."""
    perm = (0, 2, 3, 1, 4) if axis == 1 else (0, 1, 3, 2, 4)
    group = q.shape[3] // k.shape[3]
    qs, ks, vs = (t.permute(perm) for t in (q, k, v))
    if group > 1:
        ks, vs = ks.repeat_interleave(group, 2), vs.repeat_interleave(group, 2)
    out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
    return out.permute((0, 3, 1, 2, 4) if axis == 1 else (0, 1, 3, 2, 4))


class AxialTransformer(nn.Module):
    """Axial Transformer with random weights.

    AxialTransformer(image_size=(8, 8), channels=3, levels=256, width=128, heads=4, kv_heads=2,
                     outer_depth=2, inner_depth=2, mlp_ratio=4.0, norm_eps=1e-5, impl="kernels")

    outer_depth counts (row, column) block pairs. Attention is GQA (heads q heads share kv_heads
    k / v heads); head_dim = width // heads must be a multiple of 8 and >= 32 (cached_attention's
    minimum, used in sampling).
    """

    def __init__(self, *, image_size=(8, 8), channels=3, levels=256, width=128, heads=4, kv_heads=2,
                 outer_depth=2, inner_depth=2, mlp_ratio=4.0, norm_eps=1e-5, impl="kernels"):
        super().__init__()
        name = type(self).__name__
        if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2):
            raise ValueError(f"{name}: image_size must be (H, W), got {image_size!r}")
        for arg, value in (("image_size[0]", image_size[0]), ("image_size[1]", image_size[1]),
                           ("channels", channels), ("levels", levels), ("width", width), ("heads", heads),
                           ("kv_heads", kv_heads), ("outer_depth", outer_depth), ("inner_depth", inner_depth)):
            _check_positive_int(name, arg, value)
        if width % heads or heads % kv_heads or (width // heads) % 8 or width // heads < 32:
            raise ValueError(f"{name}: width ({width}) must be heads ({heads}) x a head_dim that is a multiple "
                             f"of 8 and >= 32, and heads a multiple of kv_heads ({kv_heads})")
        self.impl = _attention.check_impl(name, impl, _APIS)
        self.H, self.W = int(image_size[0]), int(image_size[1])
        self.channels, self.levels, self.width = channels, levels, width
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, width // heads
        self.embed = nn.Embedding(channels * levels, width)  # row c * levels + value: channel c's table
        self.pos_h = nn.Parameter(torch.zeros(self.H, 1, width))
        self.pos_w = nn.Parameter(torch.zeros(1, self.W, width))
        block = lambda: PreNormBlock(width, heads, kv_heads, mlp_ratio, norm_eps)  # noqa: E731
        self.outer = nn.ModuleList(block() for _ in range(2 * outer_depth))  # row, column, row, column, ...
        self.inner = nn.ModuleList(block() for _ in range(inner_depth))
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.head = nn.Linear(width, channels * levels)
        trunc_normal_init_(self, std=0.02, embeddings=True)
        nn.init.trunc_normal_(self.pos_h, std=0.02)
        nn.init.trunc_normal_(self.pos_w, std=0.02)
        self.register_buffer("_channel_offset", torch.arange(channels) * levels, persistent=False)

    # ------------------------------------------------------------------------------------------------
    def _attend(self, axis, causal, H, W):
        """attend(q, k, v) for PreNormBlock on (B, H * W, C) tokens: unflatten to the image (free
        views) and run axial attention along `axis`."""
        def attend(q, k, v):
            q, k, v = (t.unflatten(1, (H, W)) for t in (q, k, v))
            if self.impl == "kernels":
                return hierkern.axial_attention(q, k, v, axis, causal=causal)
            return _sdpa_axial(q, k, v, axis, causal)
        return attend

    def _check_image(self, x, rows=None):
        name = type(self).__name__
        if not isinstance(x, torch.Tensor) or x.dtype not in _INT_DTYPES:
            raise TypeError(f"{name}: x must be an integer tensor of pixel values")
        H = self.H if rows is None else rows
        if x.dim() != 4 or tuple(x.shape[1:]) != (H, self.W, self.channels):
            raise ValueError(f"{name}: x must have shape (batch, {H}, {self.W}, {self.channels}), "
                             f"got {tuple(x.shape)}")

    def _embed(self, x):
        """(B, h, W, channels) pixel values -> (B, h, W, width): the channel embedding."""
        return self.embed(x.long() + self._channel_offset).sum(3)

    def _context(self, e):
        """Outer decoder on the embedded rows e (B, h, W, C), any h <= H: (B, h, W, C) context, row i
        a function of rows < i of e."""
        B, h, W, C = e.shape
        z = F.pad(e, (0, 0, 0, 0, 1, 0))[:, :h] + self.pos_h[:h] + self.pos_w
        z = z.reshape(B, h * W, C)
        row, col = self._attend(2, False, h, W), self._attend(1, True, h, W)
        for i, blk in enumerate(self.outer):
            z = blk(z, row if i % 2 == 0 else col)
        return z.view(B, h, W, C)

    def _logits(self, u):
        return self.head(self.norm(u)).unflatten(-1, (self.channels, self.levels))

    def forward(self, x):
        """Training forward: x (B, H, W, channels) integer pixel values in [0, levels). Returns
        (logits (B, H, W, channels, levels), NLL in nats per sub-pixel)."""
        self._check_image(x)
        B, H, W, C = x.shape[0], self.H, self.W, self.width
        e = self._embed(x)
        ctx = self._context(e)
        u = (F.pad(e, (0, 0, 1, 0))[:, :, :W] + ctx).reshape(B * H, W, C)  # one row per batch entry
        attend = self._attend(2, True, 1, W)
        for blk in self.inner:
            u = blk(u, attend)
        logits = self._logits(u.view(B, H, W, C))
        nll = F.cross_entropy(logits.reshape(-1, self.levels).float(), x.reshape(-1).long())
        return logits, nll

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, batch, *, generator=None, top_k=0, top_p=0.0, use_cache=True):
        """Sample `batch` images (B, H, W, channels) int64. use_cache=False recomputes the whole row
        through the inner decoder for every pixel (the naive way, the official code's); both give the
        same images for the same generator state."""
        _check_positive_int(type(self).__name__, "batch", batch)
        dev = self.embed.weight.device
        x = torch.zeros(batch, self.H, self.W, self.channels, dtype=torch.long, device=dev)
        for i in range(self.H):
            ctx = self._context(self._embed(x[:, :i + 1]))[:, i]  # (B, W, C): the outer decoder once per row
            step = self._row_cached(x, i, ctx) if use_cache else self._row_naive(x, i, ctx)
            for j in range(self.W):
                logits = step(j)  # (B, channels, levels)
                ids, _ = sample_ids(logits, top_k, top_p, generator)
                x[:, i, j] = ids
        return x

    def _row_naive(self, x, i, ctx):
        attend = self._attend(2, True, 1, self.W)

        def step(j):
            e = self._embed(x[:, i:i + 1])[:, 0]
            u = F.pad(e, (0, 0, 1, 0))[:, :self.W] + ctx
            for blk in self.inner:
                u = blk(u, attend)
            return self._logits(u[:, j])
        return step

    def _row_cached(self, x, i, ctx):
        """Decode row i one pixel at a time; each inner block appends the new position's k / v to its
        cache and attends over the cache (the row so far)."""
        B = x.shape[0]
        kernels = self.impl == "kernels"
        if kernels:
            caches = [hierkern.KVCache(B, self.W, self.kv_heads, self.head_dim, dtype=ctx.dtype, device=ctx.device)
                      for _ in self.inner]
        else:
            caches = [None] * len(self.inner)

        def attend_with(li):
            def attend(q, k, v):
                if kernels:
                    kc, vc = caches[li].append(k, v)
                    return hierkern.cached_attention(q, caches[li].k_cache, caches[li].v_cache, kc.shape[1])
                kc, vc = (k, v) if caches[li] is None else (torch.cat((caches[li][0], k), 1),
                                                             torch.cat((caches[li][1], v), 1))
                caches[li] = (kc, vc)
                group = self.heads // self.kv_heads
                qs, ks, vs = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
                if group > 1:
                    ks, vs = ks.repeat_interleave(group, 1), vs.repeat_interleave(group, 1)
                return F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)
            return attend

        attends = [attend_with(li) for li in range(len(self.inner))]

        def step(j):
            prev = self._embed(x[:, i:i + 1, j - 1:j])[:, 0] if j > 0 else ctx.new_zeros(B, 1, self.width)
            u = prev + ctx[:, j:j + 1]
            for blk, attend in zip(self.inner, attends):
                u = blk(u, attend)
            return self._logits(u[:, 0])
        return step
