"""ACDiT: autoregressive blockwise conditional diffusion over continuous latents (Hu et al. 2024),
trained with the skip-causal attention mask (SCAM) over [x_0 ; x_t] and sampled block by block over a
KV cache of the clean blocks."""
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _attention
from . import _block_attention as ba
from ._blocks import AdaLNBlock, AdaLNHead, GQASelfAttention, trunc_normal_init_
from ._next_scale import _check_positive_int


class TimestepEmbedder(nn.Module):
    """DiT's timestep embedding: sinusoids of 1000 t, then a two-layer MLP."""

    def __init__(self, width, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
        ang = 1000.0 * t.to(torch.float64)[..., None] * freqs
        emb = torch.cat((ang.cos(), ang.sin()), dim=-1).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)


class ACDiT(nn.Module):
    """ACDiT with random weights: ar_len blocks, each one latent image of H x W tokens with `channels`
    channels (a token is one latent pixel).

    ACDiT(channels=4, latent_size=8, ar_len=4, width=128, depth=4, heads=4, mlp_ratio=4.0,
          rope_base=10000.0, norm_eps=1e-6, impl="kernels")

    Training (forward) runs the sequence [x_0 ; x_t] (2 * ar_len * H * W tokens) through
    skip_causal_attention(order="clean_first", block_size=H*W): noisy block i sees clean blocks < i and
    itself, clean block i sees clean blocks <= i. Clean token j and noisy token j share RoPE position j
    (1-D, over the block-major token order). Every block has its own timestep; the AdaLN modulation of
    a noisy block comes from its timestep, that of every clean block from the timestep t = 0 (a clean
    latent is the flow at t = 0, so the clean half is "fully denoised" rather than unconditioned).

    Flow matching (rectified flow): x_t = (1 - t) x_0 + t * noise, the model predicts the velocity
    noise - x_0, the loss is its MSE over the noisy half.

    impl="reference": dense mask + SDPA in training, torch.cat KV cache in sampling; impl="kernels":
    hierkern.skip_causal_attention / block_causal_attention and hierkern.KVCache + cached_attention.
    """

    def __init__(self, *, channels=4, latent_size=8, ar_len=4, width=128, depth=4, heads=4, mlp_ratio=4.0,
                 rope_base=10000.0, norm_eps=1e-6, impl="kernels"):
        super().__init__()
        name = type(self).__name__
        for arg, value in (("channels", channels), ("ar_len", ar_len), ("width", width), ("depth", depth),
                           ("heads", heads)):
            _check_positive_int(name, arg, value)
        size = (latent_size, latent_size) if isinstance(latent_size, numbers.Integral) else latent_size
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s <= 0 for s in size)):
            raise ValueError(f"{name}: latent_size must be a positive int or a pair (H, W) of them, got {latent_size!r}")
        if width % heads or (width // heads) % 2:
            raise ValueError(f"{name}: width ({width}) must be a multiple of heads ({heads}) with an even head_dim")
        if impl not in _attention.IMPLS:
            raise ValueError(f"{name}: impl must be 'reference' or 'kernels', got {impl!r}")
        self.channels, self.latent_size, self.ar_len = channels, tuple(int(s) for s in size), ar_len
        self.block_tokens = self.latent_size[0] * self.latent_size[1]
        self.width, self.depth, self.heads, self.rope_base, self.impl = width, depth, heads, rope_base, impl
        self._masks = ba.MaskCache()
        self.x_embed = nn.Linear(channels, width)
        self.t_embed = TimestepEmbedder(width)
        self.blocks = nn.ModuleList(AdaLNBlock(width, heads, mlp_ratio, False, norm_eps,
                                               attn=GQASelfAttention(width, heads, heads, bias=True))
                                    for _ in range(depth))
        self.head = AdaLNHead(width, channels, norm_eps)
        self._init_weights()

    def _init_weights(self):
        # DiT-like: small uniform-scale weights, zero biases; the AdaLN gates start small (not zero,
        # so a fresh model's output still depends on its attention).
        std = math.sqrt(1.0 / self.width / 3)
        trunc_normal_init_(self, std)
        with torch.no_grad():
            for b in self.blocks:
                b.ada_lin[-1].weight[:2 * self.width].mul_(0.1)

    # ------------------------------------------------------------------------------------------

    def _device(self):
        return self.x_embed.weight.device

    def _dtype(self):
        return self.x_embed.weight.dtype

    def _resolve_impl(self, owner, impl):
        return _attention.check_impl(owner, self.impl if impl is None else impl, ba.KERNEL_APIS)

    def _check_latents(self, owner, name, x, batch=None):
        shape = (self.ar_len, self.channels, *self.latent_size)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{owner}: {name} must be a tensor of shape (batch, {', '.join(map(str, shape))}), "
                            f"got {type(x).__name__}")
        if x.dim() != 5 or tuple(x.shape[1:]) != shape or x.shape[0] == 0 or (batch is not None and x.shape[0] != batch):
            want = "batch" if batch is None else str(batch)
            raise ValueError(f"{owner}: {name} must have shape ({want}, ar_len={shape[0]}, channels={shape[1]}, "
                             f"H={shape[2]}, W={shape[3]}), got {tuple(x.shape)}")
        if x.dtype != self._dtype() or x.device != self._device():
            raise TypeError(f"{owner}: {name} must be {self._dtype()} on {self._device()} (the model's), got "
                            f"{x.dtype} on {x.device}")
        return x

    def _check_t(self, owner, t, batch):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{owner}: t must be a floating tensor of shape ({batch}, {self.ar_len}), got "
                            f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
        if tuple(t.shape) != (batch, self.ar_len) or t.device != self._device():
            raise ValueError(f"{owner}: t must have shape (batch={batch}, ar_len={self.ar_len}) (one timestep per "
                             f"block) on {self._device()}, got {tuple(t.shape)} on {t.device}")
        if t.numel() and (t.min() < 0 or t.max() > 1):
            raise ValueError(f"{owner}: t must lie in [0, 1], got values in [{t.min().item()}, {t.max().item()}]")
        return t

    def tokens(self, latents):
        """(B, A, C, H, W) -> (B, A*H*W, C), block-major then row-major."""
        return latents.flatten(3).transpose(2, 3).flatten(1, 2)

    def latents(self, tokens):
        """Inverse of tokens() for any whole number of blocks."""
        B, n, C = tokens.shape
        return tokens.view(B, n // self.block_tokens, *self.latent_size, C).permute(0, 1, 4, 2, 3)

    def _rope(self, start, end):
        return ba.Rope(torch.arange(start, end, device=self._device()), self.width // self.heads,
                       self.rope_base, self._dtype())

    def _run(self, h, cond, attend_for_layer):
        for i, block in enumerate(self.blocks):
            h = block(h, cond, attend_for_layer(i))
        return self.head(h, cond)

    # ------------------------------------------------------------------------------------------

    def velocity(self, x0, xt, t, impl=None):
        """Predicted velocity of every noisy block, (B, A, C, H, W): one skip-causal forward over
        [x_0 ; x_t]. x0, xt: (B, A, C, H, W); t: (B, A) timesteps of the noisy blocks."""
        owner = "ACDiT.velocity"
        impl = self._resolve_impl(owner, impl)
        x0 = self._check_latents(owner, "x0", x0)
        xt = self._check_latents(owner, "xt", xt, x0.shape[0])
        t = self._check_t(owner, t, x0.shape[0])
        n = self.ar_len * self.block_tokens
        h = self.x_embed(torch.cat((self.tokens(x0), self.tokens(xt)), dim=1))
        cond = self.t_embed(torch.cat((torch.zeros_like(t), t), dim=1))  # (B, 2A, C): clean blocks at t = 0
        offsets = (0, 2 * n)
        rope = ba.Rope(ba.doubled_positions(offsets, self._device()), self.width // self.heads, self.rope_base,
                       self._dtype())
        attend = ba.sequence_attend(rope, "clean_first", self.block_tokens, offsets, impl, self._masks)
        return self.latents(self._run(h, cond, lambda i: attend)[:, n:])

    def forward(self, x0, t=None, noise=None, generator=None, impl=None):
        """Rectified-flow training loss (a scalar): MSE between velocity(x0, x_t, t) and noise - x0.

        t: (B, ar_len) per-block timesteps in [0, 1], default uniform; noise: like x0, default standard
        normal; both drawn with `generator` when not given."""
        owner = "ACDiT.forward"
        x0 = self._check_latents(owner, "x0", x0)
        B = x0.shape[0]
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{owner}: generator must be a torch.Generator or None, got {type(generator).__name__}")
        if t is None:
            t = torch.rand(B, self.ar_len, generator=generator, device=x0.device, dtype=x0.dtype)
        t = self._check_t(owner, t, B)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        noise = self._check_latents(owner, "noise", noise, B)
        tb = t.to(x0.dtype)[:, :, None, None, None]
        xt = (1 - tb) * x0 + tb * noise
        return F.mse_loss(self.velocity(x0, xt, t, impl=impl), noise - x0)

    @torch.no_grad()
    def generate(self, batch, steps=8, generator=None, *, use_cache=True, impl=None):
        """Sample (batch, ar_len, C, H, W) latents block by block.

        Each block starts from standard normal noise (drawn with `generator`, which must be on the
        model's device) and takes `steps` Euler steps of the flow from t = 1 to t = 0, each step one
        forward of the block's tokens attending [clean blocks before it ; the block]. use_cache=True:
        the clean blocks' K/V come from a per-layer cache; the finished block then runs once more as
        clean (t = 0), which writes its clean K/V into the cache for the later blocks (cached K/V are
        never recomputed). use_cache=False recomputes the clean prefix with the block-causal mask at
        every step (the cache-free definition, for tests).
        """
        owner = "ACDiT.generate"
        impl = self._resolve_impl(owner, impl)
        _check_positive_int(owner, "batch", batch)
        _check_positive_int(owner, "steps", steps)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{owner}: generator must be a torch.Generator or None, got {type(generator).__name__}")
        n, dev, dtype = self.block_tokens, self._device(), self._dtype()
        times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
        if use_cache:
            caches = [ba.make_block_cache(impl, batch, self.ar_len * n, self.heads, self.width // self.heads,
                                          dtype, dev) for _ in self.blocks]
        done = []
        for blk in range(self.ar_len):
            x = torch.randn(batch, n, self.channels, generator=generator, device=dev, dtype=dtype)
            start = blk * n
            rope = self._rope(start, start + n)
            for s in range(steps):
                t_now = torch.full((batch, 1), times[s], device=dev, dtype=dtype)
                if use_cache:
                    v = self._run(self.x_embed(x), self.t_embed(t_now),
                                  lambda i: ba.block_attend(rope, caches[i], start, commit=False))
                else:
                    v = self._uncached_velocity(done, x, t_now, impl)
                x = x + (times[s + 1] - times[s]) * v
            if use_cache and blk + 1 < self.ar_len:
                zero = torch.zeros(batch, 1, device=dev, dtype=dtype)
                h, cond = self.x_embed(x), self.t_embed(zero)
                for i, block in enumerate(self.blocks):  # the head's output is not needed
                    h = block(h, cond, ba.block_attend(rope, caches[i], start, commit=True))
            done.append(x)
        return self.latents(torch.cat(done, dim=1))

    def _uncached_velocity(self, done, x, t_now, impl):
        """Velocity of the current block from one block-causal forward over [clean blocks ; x]."""
        k = len(done)
        seq = torch.cat(done + [x], dim=1)
        t = torch.cat((torch.zeros(x.shape[0], k, device=x.device, dtype=x.dtype), t_now), dim=1)
        attend = ba.sequence_attend(self._rope(0, seq.shape[1]), "block_causal", self.block_tokens,
                                    (0, seq.shape[1]), impl, self._masks)
        return self._run(self.x_embed(seq), self.t_embed(t), lambda i: attend)[:, k * self.block_tokens:]
