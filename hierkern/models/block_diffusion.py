"""BlockDiffusionLM: a BD3-LM / SDAR-style block-diffusion language model trained with the noisy-first
skip-causal mask over [x_t ; x_0] and sampled block by block over a block KV cache with Fast-dLLM v2's
confidence-threshold parallel unmasking."""
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _attention
from . import _block_attention as ba
from ._blocks import PreNormBlock
from ._checks import check_lm_config, check_token_ids
from ._next_scale import _INT_DTYPES, _check_positive_int
from ._sampling import check_sampling_args, sample

T_MIN = 1e-3  # masking rates are drawn from [T_MIN, 1): the 1/t loss weight stays bounded


class BlockDiffusionLM(nn.Module):
    """Masked block-diffusion LM with random weights.

    BlockDiffusionLM(vocab_size=256, width=128, depth=4, heads=4, kv_heads=2, block_size=4,
                     mlp_ratio=4.0, rope_base=10000.0, norm_eps=1e-5, impl="kernels")

    Token id vocab_size is [MASK] (the embedding has vocab_size + 1 rows; logits cover the
    vocab_size real tokens only, so [MASK] is never predicted). Attention is GQA (heads q heads share
    kv_heads k/v heads) with RoPE; noisy token j and clean token j share position j.

    impl="reference": dense mask + SDPA (heads repeated for GQA) in training and prefill, torch.cat
    KV cache in sampling; impl="kernels": hierkern.skip_causal_attention / block_causal_attention and
    hierkern.KVCache + cached_attention.
    """

    def __init__(self, *, vocab_size=256, width=128, depth=4, heads=4, kv_heads=2, block_size=4, mlp_ratio=4.0,
                 rope_base=10000.0, norm_eps=1e-5, impl="kernels"):
        super().__init__()
        name = type(self).__name__
        check_lm_config(name, impl, vocab_size=vocab_size, width=width, depth=depth, heads=heads, kv_heads=kv_heads,
                        block_size=block_size)
        self.vocab_size, self.mask_id, self.block_size = vocab_size, vocab_size, block_size
        self.width, self.heads, self.kv_heads, self.rope_base, self.impl = width, heads, kv_heads, rope_base, impl
        self._masks = ba.MaskCache()
        self.embed = nn.Embedding(vocab_size + 1, width)
        self.blocks = nn.ModuleList(PreNormBlock(width, heads, kv_heads, mlp_ratio, norm_eps) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.out = nn.Linear(width, vocab_size)
        std = 0.02
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------------

    def _device(self):
        return self.embed.weight.device

    def _resolve_impl(self, owner, impl):
        return _attention.check_impl(owner, self.impl if impl is None else impl, ba.KERNEL_APIS)

    def _check_ids(self, owner, name, ids, high, batch_len=None):
        return check_token_ids(owner, name, ids, high, self._device(), batch_len)

    def _documents(self, owner, cu_seqlens, n):
        """Document offsets over the clean tokens, each document a whole number of blocks."""
        if cu_seqlens is None:
            cu = [0, n]
        elif isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1 and cu_seqlens.dtype in _INT_DTYPES:
            cu = cu_seqlens.tolist()
        elif isinstance(cu_seqlens, (list, tuple)) and all(isinstance(c, numbers.Integral) and not isinstance(c, bool)
                                                           for c in cu_seqlens):
            cu = [int(c) for c in cu_seqlens]
        else:
            raise TypeError(f"{owner}: cu_seqlens must be None, a 1-D int tensor or a list of ints, got {cu_seqlens!r}")
        if len(cu) < 2 or cu[0] != 0 or cu[-1] != n or any(b <= a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"{owner}: cu_seqlens must increase strictly from 0 to the sequence length {n}, got {cu}")
        bad = [b - a for a, b in zip(cu, cu[1:]) if (b - a) % self.block_size]
        if bad:
            raise ValueError(f"{owner}: every document length must be a multiple of block_size {self.block_size} "
                             f"(cu_seqlens {cu} has a document of {bad[0]} tokens)")
        return tuple(cu)

    def _head(self, h):
        return self.out(self.norm(h))

    def _run(self, ids, attend_for_layer):
        h = self.embed(ids)
        for i, block in enumerate(self.blocks):
            h = block(h, attend_for_layer(i))
        return h

    # ------------------------------------------------------------------------------------------

    def denoiser_logits(self, xt, x0, cu_seqlens=None, impl=None):
        """Logits (B, N, vocab_size) at every position of x_t, from one noisy-first skip-causal forward.

        xt: (B, N) ids in [0, vocab_size] ([MASK] allowed); x0: (B, N) clean ids. cu_seqlens: packed
        documents, offsets over the N tokens of a row (list, tuple or 1-D int tensor), each document
        a multiple of block_size tokens; the forward lays out [x_t(d) ; x_0(d)] per document (SDAR
        packing) with no attention across documents. None: one document per row."""
        owner = "BlockDiffusionLM.denoiser_logits"
        impl = self._resolve_impl(owner, impl)
        x0 = self._check_ids(owner, "x0", x0, self.vocab_size)
        xt = self._check_ids(owner, "xt", xt, self.vocab_size + 1, tuple(x0.shape))
        B, N = x0.shape
        if N % self.block_size:
            raise ValueError(f"{owner}: the sequence length {N} must be a multiple of block_size {self.block_size}")
        cu = self._documents(owner, cu_seqlens, N)
        # [x_t ; x_0] of the whole row, reordered into per-document halves
        order = [j for a, b in zip(cu, cu[1:]) for j in (*range(a, b), *range(N + a, N + b))]
        noisy = [2 * a + j for a, b in zip(cu, cu[1:]) for j in range(b - a)]
        dev = self._device()
        ids = torch.cat((xt, x0), dim=1)[:, torch.tensor(order, device=dev)]
        offsets = tuple(2 * c for c in cu)
        rope = ba.Rope(ba.doubled_positions(offsets, dev), self.width // self.heads, self.rope_base,
                       self.embed.weight.dtype)
        attend = ba.sequence_attend(rope, "noisy_first", self.block_size, offsets, impl, self._masks)
        h = self._run(ids, lambda i: attend)
        return self._head(h[:, torch.tensor(noisy, device=dev)])

    def forward(self, x0, t=None, mask=None, generator=None, cu_seqlens=None, impl=None):
        """Masked-diffusion training loss (a scalar), BD3-LM's: each block of each row has its own
        masking rate t (B, N // block_size); a token is replaced by [MASK] with its block's probability
        t; the loss is sum over masked tokens of cross-entropy(logits, x_0) / t, divided by B * N.

        t: default uniform in [1e-3, 1); mask: (B, N) bool, default drawn from t (with `generator`);
        passing mask needs t (the weights). cu_seqlens: packed documents, as denoiser_logits."""
        owner = "BlockDiffusionLM.forward"
        x0 = self._check_ids(owner, "x0", x0, self.vocab_size)
        B, N = x0.shape
        if N % self.block_size:
            raise ValueError(f"{owner}: the sequence length {N} must be a multiple of block_size {self.block_size}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{owner}: generator must be a torch.Generator or None, got {type(generator).__name__}")
        nb = N // self.block_size
        dtype = self.embed.weight.dtype
        if t is None:
            if mask is not None:
                raise ValueError(f"{owner}: a given mask needs its masking rates t (B, {nb}) for the 1/t weights")
            t = T_MIN + (1 - T_MIN) * torch.rand(B, nb, generator=generator, device=x0.device, dtype=dtype)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != (B, nb):
            raise ValueError(f"{owner}: t must be a floating tensor of shape (batch={B}, N // block_size={nb}), "
                             f"got {t if not isinstance(t, torch.Tensor) else (t.dtype, tuple(t.shape))}")
        if t.device != x0.device or t.min() <= 0 or t.max() > 1:
            raise ValueError(f"{owner}: t must lie in (0, 1] on {x0.device}")
        t_tok = t.repeat_interleave(self.block_size, dim=1)
        if mask is None:
            mask = torch.rand(B, N, generator=generator, device=x0.device) < t_tok
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (B, N):
            raise ValueError(f"{owner}: mask must be a bool tensor of shape {(B, N)}")
        xt = torch.where(mask, self.mask_id, x0)
        logits = self.denoiser_logits(xt, x0, cu_seqlens=cu_seqlens, impl=impl)
        ce = F.cross_entropy(logits.flatten(0, 1), x0.flatten(), reduction="none").view(B, N)
        return (ce * mask / t_tok.to(ce.dtype)).sum() / (B * N)

    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt, gen_length, block_size=None, steps=None, threshold=0.9, temperature=0.0,
                 top_k=0, top_p=0.0, generator=None, *, use_cache=True, impl=None):
        """Generate gen_length tokens after `prompt` (B, P), block by block; returns (B, P + gen_length).

        Blocks are aligned to multiples of block_size (default the model's) from position 0: the
        prompt's whole blocks are prefilled with block_causal_attention, and a prompt's partial last
        block is completed by the first generated tokens (SDAR's layout); the last block may be short.
        Each block starts as [MASK] and is denoised step by step: every step runs the block (attending
        the cache of everything before it and itself), predicts every masked token (greedy when
        temperature == 0, else sampled from softmax(logits / temperature) after top_k / top_p with
        `generator`) and reveals the ones whose probability exceeds `threshold` - at least the most
        confident one per row (Fast-dLLM v2's parallel decoding); with `steps`, at least
        ceil(masked / steps left) per step, so a block takes at most `steps` steps. A finished block
        runs once more with its final tokens, whose K/V stay in the cache for the next blocks.

        use_cache=False recomputes the whole sequence with the block-causal mask at every step (the
        cache-free definition, for tests).
        """
        owner = "BlockDiffusionLM.generate"
        impl = self._resolve_impl(owner, impl)
        prompt = self._check_ids(owner, "prompt", prompt, self.vocab_size)
        _check_positive_int(owner, "gen_length", gen_length)
        bs = self.block_size if block_size is None else block_size
        _check_positive_int(owner, "block_size", bs)
        if steps is not None:
            _check_positive_int(owner, "steps", steps)
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"{owner}: threshold must be in [0, 1], got {threshold!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or temperature < 0:
            raise ValueError(f"{owner}: temperature must be a non-negative number, got {temperature!r}")
        check_sampling_args(owner, 0.0, top_k, top_p, generator)

        B, P = prompt.shape
        total, dev = P + gen_length, self._device()
        ids = torch.cat((prompt, torch.full((B, gen_length), self.mask_id, dtype=torch.long, device=dev)), dim=1)
        head_dim = self.width // self.heads
        rope = lambda a, b: ba.Rope(torch.arange(a, b, device=dev), head_dim, self.rope_base,  # noqa: E731
                                    self.embed.weight.dtype)
        first = (P // bs) * bs
        if use_cache:
            caches = [ba.make_block_cache(impl, B, total, self.kv_heads, head_dim, self.embed.weight.dtype, dev)
                      for _ in self.blocks]
            if first:
                self._run(ids[:, :first], lambda i: ba.sequence_attend(
                    rope(0, first), "block_causal", bs, (0, first), impl, self._masks, store=caches[i].prefill))
        for start in range(first, total, bs):
            end = min(start + bs, total)
            block_rope = rope(start, end)
            for step in range(end - start):  # each step reveals at least one token per row
                masked = ids[:, start:end] == self.mask_id
                if not masked.any():
                    break
                if use_cache:
                    h = self._run(ids[:, start:end], lambda i: ba.block_attend(block_rope, caches[i], start, False))
                else:
                    h = self._run(ids[:, :end], lambda i: ba.sequence_attend(
                        rope(0, end), "block_causal", bs, (0, end), impl, self._masks))[:, start:]
                quota = 1 if steps is None else max(1, math.ceil(int(masked.sum(1).max()) / max(steps - step, 1)))
                ids[:, start:end] = self._unmask(ids[:, start:end], masked, self._head(h), threshold, quota,
                                                 temperature, top_k, top_p, generator)
            if use_cache and end < total:
                self._run(ids[:, start:end], lambda i: ba.block_attend(block_rope, caches[i], start, True))
        return ids

    def _unmask(self, blk, masked, logits, threshold, quota, temperature, top_k, top_p, generator):
        """Reveal, per row, the masked tokens whose confidence exceeds threshold, at least `quota`
        (the most confident), at most all of them."""
        if temperature > 0:
            tok, conf = sample(logits.float() / temperature, top_k, top_p, generator)
        else:
            conf, tok = logits.float().softmax(dim=-1).max(dim=-1)
        conf = conf.masked_fill(~masked, -1.0)
        n_masked = masked.sum(dim=1)
        count = torch.maximum((conf > threshold).sum(dim=1), torch.full_like(n_masked, quota)).minimum(n_masked)
        rank = conf.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        reveal = masked & (rank < count[:, None])
        return torch.where(reveal, tok, blk)
