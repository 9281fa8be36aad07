"""The attention of the block-diffusion models (ACDiT, BlockDiffusionLM), in both implementations.

impl="reference" is what block-diffusion code runs today: the dense skip-causal / block-causal mask
(hierkern's semantic reference mask, built once per layout and kept) with torch SDPA, GQA by repeating
the k/v heads (HF's repeat_kv), and a sampling cache grown with torch.cat (the block being denoised is
concatenated onto the committed prefix at every step and kept once it is finished).

impl="kernels" runs hierkern.skip_causal_attention / block_causal_attention for whole sequences and a
preallocated hierkern.KVCache per layer with hierkern.cached_attention for sampling: the block's K/V
are written in place at the block's position every step (append, then overwrite).

Positions are rotary (rotate-half RoPE, as LLaMA/Qwen) and are passed per call, so the clean and the
noisy copy of token j can share position j.
"""
import torch
import torch.nn.functional as F

import hierkern
from hierkern.ops.attention.patterns import BLOCK_CAUSAL, SKIP_CLEAN_FIRST, SKIP_NOISY_FIRST
from hierkern.ops.attention.reference import interval_mask

KERNEL_APIS = ("skip_causal_attention", "block_causal_attention", "KVCache", "cached_attention")
_PATTERNS = {"noisy_first": SKIP_NOISY_FIRST, "clean_first": SKIP_CLEAN_FIRST, "block_causal": BLOCK_CAUSAL}


class Rope:
    """cos/sin tables for integer positions (L,); angles in float64 so a float64 model copy gets
    exact tables, cast to the model's dtype."""

    def __init__(self, positions, head_dim, base, dtype):
        inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
        ang = positions.to(torch.float64)[:, None] * inv
        self.cos = ang.cos().to(dtype)[:, None, :]  # (L, 1, D/2): broadcast over heads
        self.sin = ang.sin().to(dtype)[:, None, :]

    def __call__(self, x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * self.cos - x2 * self.sin, x2 * self.cos + x1 * self.sin), dim=-1)


def doubled_positions(offsets, device):
    """Positions of a sequence of documents each laid out as two copies of N_d tokens: 0..N_d-1
    twice per document (token j of both halves shares position j). `offsets` over the doubled
    sequence."""
    parts = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        half = torch.arange((b - a) // 2, device=device)
        parts += [half, half]
    return torch.cat(parts)


class MaskCache:
    """Dense bool masks of the reference path, one per (offsets, pattern, block_size, device), as
    training code keeps its mask buffer."""

    def __init__(self):
        self._masks = {}

    def get(self, offsets, kind, block_size, device):
        key = (offsets, kind, block_size, str(device))
        mask = self._masks.get(key)
        if mask is None:
            if len(self._masks) > 64:  # a sampler without cache makes one per prefix length
                self._masks.clear()
            mask = self._masks[key] = interval_mask(offsets, _PATTERNS[kind], device=device, block_size=block_size)
        return mask


def sdpa(q, k, v, mask=None):
    """Eager attention of BSHD q over BSHD k/v: kv heads repeated for GQA, SDPA, BSHD out."""
    group = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def sequence_attention(q, k, v, kind, block_size, offsets, impl, masks):
    """Whole-sequence attention. kind: "noisy_first" / "clean_first" (skip-causal training over
    documents [x_t ; x_0] / [x_0 ; x_t]) or "block_causal" (prefill, cache-free sampling).
    offsets: document offsets over the sequence, (0, L) for one document."""
    if impl == "kernels":
        cu = None if len(offsets) == 2 else list(offsets)
        if kind == "block_causal":
            return hierkern.block_causal_attention(q, k, v, block_size, cu_seqlens=cu)
        return hierkern.skip_causal_attention(q, k, v, block_size, order=kind, cu_seqlens=cu)
    return sdpa(q, k, v, masks.get(offsets, kind, block_size, q.device))


class CatBlockCache:
    """The eager baseline's sampling cache: committed K/V grown with torch.cat."""

    def __init__(self):
        self.k = self.v = None

    @property
    def length(self):
        return 0 if self.k is None else self.k.shape[1]

    def prefill(self, k, v):
        self.k, self.v = k, v

    def attend_block(self, q, k, v, start, commit):
        """Attention of the block's queries over [committed prefix ; the block]; with commit the
        block's K/V join the prefix."""
        if start != self.length:
            raise RuntimeError(f"block starts at {start} but the cache holds {self.length} rows")
        keys = k if self.k is None else torch.cat((self.k, k), dim=1)
        vals = v if self.v is None else torch.cat((self.v, v), dim=1)
        if commit:
            self.k, self.v = keys, vals
        return sdpa(q, keys, vals)


class KernelBlockCache:
    """A preallocated hierkern.KVCache for one layer. The block's rows are appended at its first step
    and rewritten in place at every later one, so committing needs no copy: the next block starts
    after them."""

    def __init__(self, batch, max_len, kv_heads, head_dim, dtype, device):
        self.cache = hierkern.KVCache(batch, max_len, kv_heads, head_dim, dtype=dtype, device=device)

    @property
    def length(self):
        return self.cache.length

    def prefill(self, k, v):
        self.cache.append(k, v)

    def attend_block(self, q, k, v, start, commit):
        if self.cache.length == start:
            self.cache.append(k, v)
        else:
            self.cache.overwrite(start, k, v)
        return hierkern.cached_attention(q, self.cache.k_cache, self.cache.v_cache, start + k.shape[1])


def make_block_cache(impl, batch, max_len, kv_heads, head_dim, dtype, device):
    if impl == "kernels":
        return KernelBlockCache(batch, max_len, kv_heads, head_dim, dtype, device)
    return CatBlockCache()


def sequence_attend(rope, kind, block_size, offsets, impl, masks, store=None):
    """attend(q, k, v) for whole-sequence attention with RoPE; `store(k, v)` receives the rotated
    K/V (a prefill filling a sampling cache)."""
    def attend(q, k, v):
        q, k = rope(q), rope(k)
        if store is not None:
            store(k, v)
        return sequence_attention(q, k, v, kind, block_size, offsets, impl, masks)
    return attend


def block_attend(rope, cache, start, commit):
    """attend(q, k, v) for one block at `start` over a sampling cache."""
    def attend(q, k, v):
        return cache.attend_block(rope(q), rope(k), v, start, commit)
    return attend
