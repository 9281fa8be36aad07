"""The backbone shared by VAR and HMAR: class conditioning, multi-scale token embedding, AdaLN blocks,
head, presets and argument checks. The subclasses differ in the attention pattern and in how they
generate.

Token embedding (no VQ-VAE: tokens are codebook ids). A learned `codebook` (vocab_size x code_dim)
stands in for the VQ codebook and `word_embed` (code_dim -> width) for VAR's projection of VQ
features. The input at scale 0 is VAR's start token: the class embedding plus `pos_start`. The input
at scale i > 0 is VAR's next-scale input built in code space: the code map of scale i-1's tokens
(pn_{i-1} x pn_{i-1} x code_dim) resized to pn_i x pn_i with bicubic interpolation
(align_corners=False, as VAR upsamples its residual maps), then `word_embed`. Every position also gets
its level embedding and its absolute position embedding. The last scale's tokens are targets only.
"""
import contextlib
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from hierkern._validate import value_range
from hierkern.layouts import VAR_256, ScaleLayout

from . import _attention, _fused
from ._blocks import AdaLNBlock, AdaLNHead, ReusedCondition, trunc_normal_init_
from ._sampling import sample

# VAR's own 256px token schedule (L = 680): at depth 4 a training step and a generation take about a
# second each on a 2-core CPU, and attention is as large a share of the work as in the real model.
DEFAULT_PATCH_NUMS = VAR_256
PRESET_DEPTHS = {"d16": 16, "d20": 20, "d24": 24, "d30": 30}
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class NextScaleTransformer(nn.Module):
    """Class-conditional transformer over a multi-scale token sequence (VAR's structure).

    Depth d gives width 64d and d heads (head_dim 64) unless width/heads are given. `impl` picks the
    attention implementation ("reference": VAR's eager code path, dense mask + SDPA; "kernels":
    hierkern ops) and can be overridden per call. Labels are class ids in [0, num_classes); the id
    num_classes is the null class used for classifier-free guidance (and label dropout in training).
    """

    pattern = None  # "causal" or "diagonal", set by the subclass

    def __init__(self, *, vocab_size=4096, num_classes=1000, depth=4, patch_nums=DEFAULT_PATCH_NUMS,
                 width=None, heads=None, mlp_ratio=4.0, shared_aln=False, code_dim=32, cond_drop_rate=0.1,
                 norm_eps=1e-6, impl="kernels"):
        super().__init__()
        name = type(self).__name__
        for arg, value in (("vocab_size", vocab_size), ("num_classes", num_classes), ("depth", depth),
                           ("code_dim", code_dim)):
            _check_positive_int(name, arg, value)
        width = 64 * depth if width is None else width
        heads = depth if heads is None else heads
        _check_positive_int(name, "width", width)
        _check_positive_int(name, "heads", heads)
        if width % heads:
            raise ValueError(f"{name}: width ({width}) must be a multiple of heads ({heads})")
        if not 0.0 <= cond_drop_rate < 1.0:
            raise ValueError(f"{name}: cond_drop_rate must be in [0, 1), got {cond_drop_rate}")
        if impl not in _attention.IMPLS:
            raise ValueError(f"{name}: impl must be 'reference' or 'kernels', got {impl!r}")
        self.layout = ScaleLayout(patch_nums)  # validates patch_nums
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.vocab_size, self.num_classes, self.depth = vocab_size, num_classes, depth
        self.width, self.heads, self.code_dim = width, heads, code_dim
        self.cond_drop_rate, self.impl = cond_drop_rate, impl
        self._masks = _attention.MaskCache()

        first_l = self.layout.sizes[0]
        self.class_emb = nn.Embedding(num_classes + 1, width)
        self.pos_start = nn.Parameter(torch.empty(1, first_l, width))
        self.codebook = nn.Embedding(vocab_size, code_dim)
        self.word_embed = nn.Linear(code_dim, width)
        self.lvl_embed = nn.Embedding(self.layout.num_scales, width)
        self.pos_embed = nn.Parameter(torch.empty(1, self.layout.L, width))
        ids = [i for i, n in enumerate(self.layout.sizes) for _ in range(n)]  # a list, so meta-device init works
        self.register_buffer("scale_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width)) if shared_aln else None
        self.blocks = nn.ModuleList(AdaLNBlock(width, heads, mlp_ratio, shared_aln, norm_eps) for _ in range(depth))
        self.head = AdaLNHead(width, vocab_size, norm_eps)
        self._init_weights()

    @classmethod
    def preset(cls, name, **overrides):
        """VAR's sizes: "d16" (~310M parameters), "d20", "d24", "d30"; 256px schedule and a 4096-token
        codebook unless overridden."""
        if name not in PRESET_DEPTHS:
            raise ValueError(f"{cls.__name__}.preset: name must be one of {sorted(PRESET_DEPTHS)}, got {name!r}")
        kwargs = dict(depth=PRESET_DEPTHS[name], patch_nums=VAR_256, vocab_size=4096, num_classes=1000)
        kwargs.update(overrides)
        return cls(**kwargs)

    def _init_weights(self, init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02):
        # VAR's init: truncated normal std sqrt(1/(3C)); residual projections shrunk with depth; AdaLN
        # gates start near zero so every block starts close to the identity.
        std = math.sqrt(1.0 / self.width / 3)
        trunc_normal_init_(self, std, embeddings=True)
        nn.init.trunc_normal_(self.pos_start, std=std)
        nn.init.trunc_normal_(self.pos_embed, std=std)
        with torch.no_grad():
            C = self.width
            adas = [b.ada_lin[-1] for b in self.blocks if b.ada_lin is not None]
            if self.shared_ada_lin is not None:
                adas.append(self.shared_ada_lin[-1])
            for lin in adas:
                lin.weight[2 * C:].mul_(init_adaln)
                lin.weight[:2 * C].mul_(init_adaln_gamma)
            for b in self.blocks:
                b.attn.proj.weight.div_(math.sqrt(2 * self.depth))
                b.mlp[-1].weight.div_(math.sqrt(2 * self.depth))
            self.head.ada_lin[-1].weight.mul_(init_adaln)
            self.head.out.weight.mul_(init_head)

    # ------------------------------------------------------------------------------------------
    # argument checks
    # ------------------------------------------------------------------------------------------

    def _resolve_impl(self, owner, impl):
        return _attention.check_impl(owner, self.impl if impl is None else impl)

    def _device(self):
        return self.pos_embed.device

    def _check_labels(self, owner, labels, batch=None):
        if not isinstance(labels, torch.Tensor):
            if isinstance(labels, (list, tuple)) and all(isinstance(x, numbers.Integral) for x in labels):
                labels = torch.tensor(labels, dtype=torch.long, device=self._device())
            else:
                raise TypeError(f"{owner}: labels must be a 1-D integer tensor (or a list of ints), "
                                f"got {type(labels).__name__}")
        if labels.dim() != 1 or labels.shape[0] == 0:
            raise ValueError(f"{owner}: labels must be a non-empty 1-D tensor of class ids, got shape "
                             f"{tuple(labels.shape)}")
        if labels.dtype not in _INT_DTYPES:
            raise TypeError(f"{owner}: labels must have an integer dtype, got {labels.dtype}")
        if labels.device != self._device():
            raise ValueError(f"{owner}: labels is on {labels.device} but the model is on {self._device()}")
        if batch is not None and labels.shape[0] != batch:
            raise ValueError(f"{owner}: labels has {labels.shape[0]} entries but tokens has batch {batch}")
        lo, hi = value_range(labels)
        if lo < 0 or hi > self.num_classes:
            raise ValueError(f"{owner}: labels must be class ids in [0, {self.num_classes}] ({self.num_classes} "
                             f"is the null class), got values in [{lo}, {hi}]")
        return labels.long()

    def _check_tokens(self, owner, tokens):
        """A list of per-scale (B, pn*pn) id tensors, or one (B, L) tensor -> (B, L) int64."""
        sizes, L = self.layout.sizes, self.layout.L
        if isinstance(tokens, (list, tuple)):
            if len(tokens) != len(sizes):
                raise ValueError(f"{owner}: tokens has {len(tokens)} scales but patch_nums {self.patch_nums} "
                                 f"has {len(sizes)}")
            for i, t in enumerate(tokens):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{owner}: tokens[{i}] must be a torch.Tensor, got {type(t).__name__}")
                batch = tokens[0].shape[0] if tokens[0].dim() else None
                if t.dim() != 2 or t.shape[1] != sizes[i] or t.shape[0] != batch:
                    raise ValueError(f"{owner}: tokens[{i}] must have shape (batch, {sizes[i]}) "
                                     f"(scale {i}, patch_num {self.patch_nums[i]}) with the batch of tokens[0], "
                                     f"got {tuple(t.shape)}")
                self._check_token_tensor(owner, f"tokens[{i}]", t)
            tokens = torch.cat(tokens, dim=1)
        elif isinstance(tokens, torch.Tensor):
            if tokens.dim() != 2 or tokens.shape[1] != L:
                raise ValueError(f"{owner}: tokens must have shape (batch, {L}) (all scales of patch_nums "
                                 f"{self.patch_nums}) or be a list of per-scale tensors, got {tuple(tokens.shape)}")
            self._check_token_tensor(owner, "tokens", tokens)
        else:
            raise TypeError(f"{owner}: tokens must be a (batch, L) tensor or a list of per-scale tensors, "
                            f"got {type(tokens).__name__}")
        if tokens.shape[0] == 0:
            raise ValueError(f"{owner}: tokens has batch size 0")
        return tokens.long()

    def _check_token_tensor(self, owner, name, t):
        if t.dtype not in _INT_DTYPES:
            raise TypeError(f"{owner}: {name} must have an integer dtype (token ids), got {t.dtype}")
        if t.device != self._device():
            raise ValueError(f"{owner}: {name} is on {t.device} but the model is on {self._device()}")
        if t.numel():
            lo, hi = value_range(t)
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"{owner}: {name} must hold token ids in [0, {self.vocab_size}), got values "
                                 f"in [{lo}, {hi}]")

    def loss(self, tokens, labels, impl=None, **forward_kwargs):
        """Training loss: the mean cross-entropy of forward(tokens, labels, impl=impl, **forward_kwargs)'s
        logits against the tokens (VAR's trainer with uniform weights, no label smoothing), every
        position. impl="reference" takes F.cross_entropy over float32 logits as VAR's trainer does;
        impl="kernels" hierkern's fused cross-entropy (no (B*L, V) log-probabilities) where it has a
        kernel (CPU float32), which also takes the head's bias (the head's GEMM runs without it), else
        the same F.cross_entropy."""
        owner = f"{type(self).__name__}.loss"
        impl = self._resolve_impl(owner, impl)
        target = self._check_tokens(owner, tokens).flatten()
        bias = self.head.out.bias if impl == "kernels" and _fused.takes_head_bias(self.head.out) else None
        with self.head.bias_deferred() if bias is not None else contextlib.nullcontext():
            logits = self(tokens, labels, impl=impl, **forward_kwargs).flatten(0, 1)
        if impl == "kernels":  # the logits are this call's own: their memory takes the gradient
            return _fused.cross_entropy(logits, target, bias=bias, overwrite_logits=True)
        return F.cross_entropy(logits.float(), target)

    # ------------------------------------------------------------------------------------------
    # embedding, blocks, head
    # ------------------------------------------------------------------------------------------

    def level_pos(self, start=0, end=None):
        """(1, end-start, C): level embedding + absolute position embedding of positions [start, end)."""
        end = self.layout.L if end is None else end
        return self.lvl_embed(self.scale_ids[start:end]).unsqueeze(0) + self.pos_embed[:, start:end]

    def condition(self, labels):
        """(class embedding (B, C), what the blocks are modulated by)."""
        cond = self.class_emb(labels)
        return cond, (cond if self.shared_ada_lin is None else self.shared_ada_lin(cond))

    def start_input(self, cond):
        """Scale-0 input without level/position embedding: VAR's class-conditional start token."""
        return cond.unsqueeze(1) + self.pos_start

    def upsampled_codes(self, ids, scale):
        """Code map of the tokens of scale-1 resized to scale's grid: (B, size_of(scale), code_dim)."""
        src, dst = self.patch_nums[scale - 1], self.patch_nums[scale]
        grid = self.codebook(ids).transpose(1, 2).reshape(ids.shape[0], self.code_dim, src, src)
        grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    def next_scale_input(self, ids, scale):
        """Input of scale `scale` (> 0) from the ids of scale-1, without level/position embedding."""
        return self.word_embed(self.upsampled_codes(ids, scale))

    def teacher_forcing_input(self, tokens, cond):
        """(B, L, C) inputs of every scale from ground-truth tokens (B, L)."""
        off = self.layout.offsets
        codes = [self.upsampled_codes(tokens[:, off[i - 1]:off[i]], i) for i in range(1, self.layout.num_scales)]
        parts = [self.start_input(cond)]
        if codes:
            parts.append(self.word_embed(torch.cat(codes, dim=1)))
        return torch.cat(parts, dim=1) + self.level_pos()

    def drop_labels(self, labels):
        """Label dropout for classifier-free guidance training (training mode only)."""
        if self.training and self.cond_drop_rate > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.cond_drop_rate
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return labels

    def run_blocks(self, x, block_cond, attend_for_layer, impl):
        fused = impl == "kernels"  # the AdaLN norms and MLP bias + GELU as hierkern's fused ops
        for i, block in enumerate(self.blocks):
            x = block(x, block_cond, attend_for_layer(i), fused=fused)
        return x

    def sequence_logits(self, x, cond, block_cond, layout, impl):
        """Logits of a whole sequence laid out as `layout`, attention pattern self.pattern."""
        def attend(q, k, v, temperature):
            return _attention.sequence_attention(q, k, v, temperature, layout, self.pattern, impl, self._masks)
        return self.head(self.run_blocks(x, block_cond, lambda i: attend, impl), cond, fused=impl == "kernels")

    def cfg_condition(self, labels):
        """Conditions of the 2B generation rows (the labels, then the null class): (the class embedding,
        the head's condition, the blocks' condition). Where a layer projects the embedding, the
        condition is a ReusedCondition, so one generation projects it once per layer, not per scale."""
        null = torch.full_like(labels, self.num_classes)
        cond, block_cond = self.condition(torch.cat((labels, null)))
        return (cond, *self.reused_conditions(cond, block_cond))

    def reused_conditions(self, cond, block_cond):
        """(the head's condition, the blocks' condition) for a series of calls sharing one class
        embedding (the scales of a generation or of a scale-by-scale forward): where a layer projects
        the embedding it gets a ReusedCondition, so each projection runs once for the series."""
        head_cond = ReusedCondition(cond)
        return head_cond, (head_cond if self.shared_ada_lin is None else block_cond)

    def cfg_ratio(self, cfg, scale, cfg_ramp):
        """VAR's guidance schedule: the ratio ramps linearly from 0 at the first scale to `cfg` at the
        last (cfg_ramp=True), or is `cfg` at every scale."""
        last = self.layout.num_scales - 1
        return cfg * scale / last if cfg_ramp and last > 0 else cfg

    def sample_scales(self, labels, cfg, top_k, top_p, generator, cfg_ramp, scale_logits):
        """The generation loop of VAR and M-VAR: scale by scale, scale_logits(si, x, cond, block_cond)
        gives the (2B, n, V) logits of scale si from its 2B-row input x; they are guided and sampled,
        and the sampled ids build the next scale's input. Returns the per-scale (B, pn*pn) ids."""
        off, n_scales = self.layout.offsets, self.layout.num_scales
        cond, head_cond, block_cond = self.cfg_condition(labels)
        x = self.start_input(cond) + self.level_pos(0, off[1])
        out = []
        for si in range(n_scales):
            logits = scale_logits(si, x, head_cond, block_cond)
            ids, _ = sample(logits, top_k, top_p, generator, cfg_ratio=self.cfg_ratio(cfg, si, cfg_ramp))
            out.append(ids)
            if si + 1 < n_scales:
                x = self.next_scale_input(ids, si + 1).repeat(2, 1, 1) + self.level_pos(off[si + 1], off[si + 2])
        return out

    def prefix_recompute(self, impl):
        """A scale_logits for sample_scales that reruns the whole prefix at every scale (no KV cache,
        no carried state: VAR without cache, M-VAR's own code)."""
        inputs = []

        def scale_logits(si, x, cond, block_cond):
            inputs.append(x)
            prefix = ScaleLayout.from_sizes(self.layout.sizes[:si + 1])
            logits = self.sequence_logits(torch.cat(inputs, dim=1), cond, block_cond, prefix, impl)
            return logits[:, self.layout.offsets[si]:]
        return scale_logits


def _check_positive_int(owner, name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
