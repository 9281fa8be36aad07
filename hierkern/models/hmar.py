"""HMAR: next-scale prediction where each scale attends only to itself (block-diagonal attention;
the previous scale enters through the input), generated without a KV cache and refined inside each
scale by masked multi-step prediction."""
import math
import numbers

import torch
import torch.nn as nn

from . import _attention
from ._next_scale import NextScaleTransformer
from ._sampling import check_sampling_args, sample


def default_steps(patch_nums):
    """Refinement steps per scale: 1 for scales of up to 2x2 tokens, 2 up to 4x4, 4 beyond."""
    return tuple(1 if pn <= 2 else 2 if pn <= 4 else 4 for pn in patch_nums)


class HMAR(NextScaleTransformer):
    """HMAR (Kumbong et al. 2025) with random weights and token ids in place of a VQ-VAE.

    HMAR(steps=None, **VAR's constructor arguments); HMAR.preset("d16", ...) as VAR.

    Input of a token = its scale's next-scale input (as VAR) + an embedding of the token itself:
    `mask_embed` while it is hidden, the embedding of its id once revealed. With every token hidden
    this is plain next-scale prediction. `steps` (one positive int per scale) is the default
    refinement schedule of generate().
    """

    pattern = "diagonal"

    def __init__(self, *, steps=None, **kwargs):
        super().__init__(**kwargs)
        self.mask_embed = nn.Parameter(torch.empty(1, 1, self.width))
        nn.init.trunc_normal_(self.mask_embed, std=math.sqrt(1.0 / self.width / 3))
        self.steps = default_steps(self.patch_nums) if steps is None else self._check_steps("HMAR", steps)

    def _check_steps(self, owner, steps):
        n = self.layout.num_scales
        if (not isinstance(steps, (list, tuple)) or len(steps) != n
                or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s <= 0 for s in steps)):
            raise ValueError(f"{owner}: steps must be {n} positive ints (one per scale of patch_nums "
                             f"{self.patch_nums}), got {steps!r}")
        return tuple(int(s) for s in steps)

    def _check_mask(self, owner, mask, shape):
        if isinstance(mask, (list, tuple)):
            if not all(isinstance(m, torch.Tensor) for m in mask):
                raise TypeError(f"{owner}: mask must be a (batch, L) bool tensor or a list of per-scale bool tensors")
            mask = torch.cat(mask, dim=1)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{owner}: mask must be a bool tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(shape) or mask.device != self._device():
            raise ValueError(f"{owner}: mask must be a bool tensor of shape {tuple(shape)} (the tokens' shape) "
                             f"on {self._device()}, got {mask.dtype} {tuple(mask.shape)} on {mask.device}")
        return mask

    def own_token_input(self, ids, hidden):
        """(B, n, C): mask_embed where hidden, else the embedding of the token id (hidden positions
        may hold the placeholder -1)."""
        revealed = self.word_embed(self.codebook(ids.clamp_min(0)))
        return torch.where(hidden.unsqueeze(-1), self.mask_embed, revealed)

    def forward(self, tokens, labels, mask=None, impl=None):
        """Teacher-forced logits (B, L, vocab_size).

        tokens, labels: as VAR.forward. mask: which tokens are hidden from their own input, a (B, L)
        bool tensor (True = hidden) or a list of per-scale (B, pn*pn) ones; None hides every token
        (plain next-scale prediction). Training masked refinement passes a random mask per scale.
        """
        owner = "HMAR.forward"
        impl = self._resolve_impl(owner, impl)
        tokens = self._check_tokens(owner, tokens)
        labels = self._check_labels(owner, labels, tokens.shape[0])
        cond, block_cond = self.condition(self.drop_labels(labels))
        x = self.teacher_forcing_input(tokens, cond)
        if mask is None:
            x = x + self.mask_embed
        else:
            x = x + self.own_token_input(tokens, self._check_mask(owner, mask, tokens.shape))
        return self.sequence_logits(x, cond, block_cond, self.layout, impl)

    @torch.no_grad()
    def generate(self, labels, cfg=1.5, top_k=0, top_p=0.0, generator=None, *, steps=None, cfg_ramp=True,
                 impl=None):
        """Sample every scale in turn; each scale is refined in steps[i] masked steps.

        Guidance, sampling and the generator are as VAR.generate. Each step is one forward over just
        this scale's tokens (no KV cache: nothing of earlier scales is attended to). At step t of T
        (T = min(steps[i], tokens in the scale)) every hidden token is sampled, and the most confident
        ones (probability of the sampled id) are revealed so that floor(n * cos(pi/2 * t/T)) stay
        hidden, with at least one revealed per step and none hidden after the last.
        Returns the list of per-scale (B, pn*pn) int64 token ids.
        """
        owner = "HMAR.generate"
        impl = self._resolve_impl(owner, impl)
        labels = self._check_labels(owner, labels)
        check_sampling_args(owner, cfg, top_k, top_p, generator)
        steps = self.steps if steps is None else self._check_steps(owner, steps)
        B = labels.shape[0]
        off, sizes = self.layout.offsets, self.layout.sizes
        cond, head_cond, block_cond = self.cfg_condition(labels)
        out = []
        for si, n in enumerate(sizes):
            if si == 0:
                base = self.start_input(cond)
            else:
                base = self.next_scale_input(out[-1], si).repeat(2, 1, 1)
            base = base + self.level_pos(off[si], off[si + 1])
            layout = _attention.single_scale_layout(n)
            ratio = self.cfg_ratio(cfg, si, cfg_ramp)
            ids = torch.full((B, n), -1, dtype=torch.long, device=base.device)  # -1: not yet sampled
            hidden = torch.ones(B, n, dtype=torch.bool, device=base.device)
            total = min(steps[si], n)
            for t in range(1, total + 1):
                x = base + self.own_token_input(ids, hidden).repeat(2, 1, 1)
                logits = self.sequence_logits(x, head_cond, block_cond, layout, impl)
                new_ids, conf = sample(logits, top_k, top_p, generator, cfg_ratio=ratio)
                n_hidden = int(hidden[0].sum())  # the same in every row: each step reveals equally many
                keep = 0 if t == total else max(min(math.floor(n * math.cos(math.pi / 2 * t / total)), n_hidden - 1),
                                                total - t)
                pick = conf.masked_fill(~hidden, -1.0).topk(n_hidden - keep, dim=1).indices
                reveal = torch.zeros_like(hidden).scatter(1, pick, True)
                ids = torch.where(reveal, new_ids, ids)
                hidden = hidden & ~reveal
            out.append(ids)
        return out
