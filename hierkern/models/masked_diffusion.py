"""MaskedDiffusionLM: a LLaDA-style masked-diffusion language model (bidirectional transformer, RoPE,
GQA, random init) with semi-autoregressive confidence-threshold generation and four K/V strategies:

  "none"      every step runs the whole sequence (the exact definition).
  "prefix"    Fast-dLLM prefix cache: a full forward refreshes every layer's K/V; the other steps run
              only the current block and everything after it, attending the cached prefix K/V.
  "dual"      Fast-dLLM DualCache: the other steps run only the current block; its fresh K/V are
              scattered into the cache, whose prefix and suffix rows are reused.
  "adaptive"  dLLM-Cache: the other steps recompute V of every token per layer, pick the `ratio`
              least-similar tokens (cosine of new vs cached V), recompute only those rows (Q/K,
              attention over the whole cache, projection, MLP), scatter their K/V and outputs into the
              caches and reuse the cached attention / MLP outputs of every other row.

A full refresh happens at every block start and every `interval` steps inside a block (None: block
starts only), so interval=1 makes every strategy exact. dLLM-Cache keeps the prompt on a longer fixed
interval; here prompt rows are candidates of the same similarity test, so they are recomputed when
(and only when) their V drifts, and ratio=1.0 recomputes every row (exactly "none").

impl="reference": the PyTorch composition research code uses (cosine + sort + gather + index writes +
SDPA with repeated K/V heads); impl="kernels": hierkern.refresh_select, hierkern.scatter_kv (RoPE on
write) and hierkern.subset_attention (the last two through their op layer: the model's own tensors need
none of the public wrappers' checks), and in generate, row sets of at most _linear.ROWS_MAX rows run
their linear layers (with the pre-norms, GELU and residual adds) through hierkern::packed_linear.
"""
import math
import numbers
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import hierkern
from hierkern import _backend
from hierkern.ops.cached_attention.op import cached_attention_op
from hierkern.ops.kv_reuse.op import scatter_kv_op
from hierkern.ops.kv_reuse import reference as kv_ref

from . import _attention
from ._blocks import PreNormBlock
from ._checks import check_lm_config, check_token_ids
from ._linear import Linear
from ._next_scale import _check_positive_int

CACHES = ("none", "prefix", "dual", "adaptive")
_KERNEL_APIS = ("refresh_select", "scatter_kv", "subset_attention")


class _Rope:
    """Rotate-half RoPE at positions 0..L-1. cos / sin: the (L, D/2) half tables scatter_kv takes
    for K. Queries use full-width rows cat(cos, cos) and cat(-sin, sin), so a rotation is three ops,
    x * c + roll(x, D/2) * s in float32 (addcmul: within an ulp of rope_rows), rounded once to x's
    dtype; the rows of a step are taken once and shared by every layer."""

    def __init__(self, cos, sin):
        self.cos, self.sin = cos, sin
        acc = torch.float64 if cos.dtype == torch.float64 else torch.float32
        self._c = torch.cat((cos, cos), dim=-1).to(acc)
        self._s = torch.cat((-sin, sin), dim=-1).to(acc)
        self._slots = {}

    def span(self, a, n):
        """Rows of positions [a, a + n), shaped (1, n, 1, D) to broadcast over (B, n, H, D)."""
        return self._c[a:a + n, None], self._s[a:a + n, None]

    def slots(self, a, n, B):
        """(idx, rot) of the rows [a, a + n) of B sequences: their cache slots (B, n) and span(a, n).
        Memoised: the steps of a block ask for the same few row ranges (a step is ~100 small calls,
        and building these is five of them)."""
        key = (a, n, B)
        got = self._slots.get(key)
        if got is None:
            idx = torch.arange(a, a + n, device=self._c.device).expand(B, n)
            got = self._slots[key] = (idx, self.span(a, n))
        return got

    def rows(self, idx):
        """Rows of positions idx (B, n), shaped (B, n, 1, D)."""
        return self._c[idx][:, :, None], self._s[idx][:, :, None]

    def rotate(self, x, rot):
        c, s = rot
        xa = x if x.dtype == c.dtype else x.to(c.dtype)  # (a step is ~100 small calls: skip no-op ones)
        # the two halves swapped: one flip (roll along the last dimension is two narrows and a cat)
        out = torch.addcmul(xa * c, xa.unflatten(-1, (2, -1)).flip(-2).flatten(-2), s)
        return out if out.dtype == x.dtype else out.to(x.dtype)


class _LayerWeights(NamedTuple):
    """One PreNormBlock's tensors for the functional row path (see _layer_weights)."""
    norm1: tuple  # (weight, bias, eps)
    qkv: Linear  # the fused q / k / v projection (rows: q, k, v)
    qk: Linear  # its q and k rows ("adaptive": V is computed for every row first)
    v: Linear  # its v rows
    proj: Linear
    norm2: tuple
    fc1: Linear  # followed by the tanh GELU
    fc2: Linear


class _LayerCache:
    """One layer's K (rotated) / V (B, L, Hk, D) and, for "adaptive", its attention and MLP outputs
    (B, L, C), the residual-stream contributions reused for rows that are not recomputed."""

    def __init__(self, B, L, Hk, D, C, dtype, device, adaptive):
        self.k = torch.empty(B, L, Hk, D, dtype=dtype, device=device)
        self.v = torch.empty(B, L, Hk, D, dtype=dtype, device=device)
        self.attn = torch.empty(B, L, C, dtype=dtype, device=device) if adaptive else None
        self.mlp = torch.empty(B, L, C, dtype=dtype, device=device) if adaptive else None


class MaskedDiffusionLM(nn.Module):
    """LLaDA-style masked-diffusion LM with random weights.

    MaskedDiffusionLM(vocab_size=256, width=128, depth=4, heads=4, kv_heads=2, mlp_ratio=4.0,
                      rope_base=10000.0, norm_eps=1e-5, impl="kernels")

    Token id vocab_size is [MASK] (the embedding has vocab_size + 1 rows; logits cover the real
    tokens only). Every token attends to every token (no mask); RoPE on q and k at positions 0..L-1.
    """

    def __init__(self, *, vocab_size=256, width=128, depth=4, heads=4, kv_heads=2, mlp_ratio=4.0,
                 rope_base=10000.0, norm_eps=1e-5, impl="kernels"):
        super().__init__()
        name = type(self).__name__
        check_lm_config(name, impl, vocab_size=vocab_size, width=width, depth=depth, heads=heads, kv_heads=kv_heads)
        self.vocab_size, self.mask_id = vocab_size, vocab_size
        self.width, self.heads, self.kv_heads, self.head_dim = width, heads, kv_heads, width // heads
        self.rope_base, self.impl = rope_base, impl
        self.embed = nn.Embedding(vocab_size + 1, width)
        self.blocks = nn.ModuleList(PreNormBlock(width, heads, kv_heads, mlp_ratio, norm_eps) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.out = nn.Linear(width, vocab_size)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------------
    # Pieces shared by every strategy: one code path per row set, so the strategies differ only in
    # which rows they recompute (and "none" equals the others when they recompute everything).

    def _device(self):
        return self.embed.weight.device

    def _rope_tables(self, L):
        inv = self.rope_base ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=self._device())
                                 / self.head_dim)
        ang = torch.arange(L, dtype=torch.float64, device=self._device())[:, None] * inv
        dtype = self.embed.weight.dtype
        return _Rope(ang.cos().to(dtype), ang.sin().to(dtype))

    def _layer_weights(self, pack=False):
        """Per block, the tensors of its pre-norm layer, taken once per forward / generate call: a step
        is ~100 small ops, and module calls and attribute lookups are a visible share of each. q and
        k/v are one (C + 2 Hk D, C) projection (rows: q, k, v), so a row set costs one GEMM, not three.
        pack (generate): small row blocks run through prepacked weights (see _linear.py)."""
        out = []
        nqk = self.width + self.kv_heads * self.head_dim
        for block in self.blocks:
            q, kv = block.attn.q, block.attn.kv
            if q.bias is None and kv.bias is None:
                qkv_bias = None
            else:
                qkv_bias = torch.cat(tuple(m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                                           for m in (q, kv)))
            w = torch.cat((q.weight, kv.weight))
            fc1, _, fc2 = block.mlp  # PreNormBlock's activation is GELU(approximate="tanh")
            out.append(_LayerWeights(
                norm1=(block.norm1.weight, block.norm1.bias, block.norm1.eps),
                qkv=Linear(w, qkv_bias, pack),
                qk=Linear(w[:nqk], None if qkv_bias is None else qkv_bias[:nqk], pack),
                v=Linear(w[nqk:], None if qkv_bias is None else qkv_bias[nqk:], pack),
                proj=Linear(block.attn.proj.weight, block.attn.proj.bias, pack),
                norm2=(block.norm2.weight, block.norm2.bias, block.norm2.eps),
                fc1=Linear(fc1.weight, fc1.bias, pack),
                fc2=Linear(fc2.weight, fc2.bias, pack)))
        return out

    def _mlp(self, lw, x, residual=None):
        """The block's MLP sub-layer output for rows x (before its layer norm), plus residual when given."""
        return lw.fc2(lw.fc1(x, gelu=True, norm=lw.norm2), residual=residual)

    def _write(self, impl, cache, idx, k, v, rope):
        """K/V rows (B, n, Hk, D) into slots idx (B, n), k rotated at its slot."""
        if impl == "kernels":
            # The op layer under the public wrapper: these are the model's own caches, rows and slots
            # (distinct by construction), so the wrapper's per-call checks only cost time (~0.1-0.5 ms
            # of a dual-cache step's Python, with subset_attention's below).
            backend = _backend.select("scatter_kv", None, k.device, dtype=k.dtype)
            scatter_kv_op(cache.k, cache.v, idx, k, v, rope.cos, rope.sin, backend)
        else:
            kv_ref.scatter_kv_reference(cache.k, cache.v, idx, k, v, rope.cos, rope.sin)

    def _attend(self, impl, q, cache):
        if impl == "kernels":  # hierkern.subset_attention's op (see _write)
            backend = _backend.select("subset_attention", None, q.device, dtype=q.dtype)
            return cached_attention_op(q, cache.k, cache.v, cache.k.shape[1], self.head_dim ** -0.5, False, None,
                                       backend)
        group = self.heads // self.kv_heads
        k = cache.k.repeat_interleave(group, dim=2).transpose(1, 2)
        v = cache.v.repeat_interleave(group, dim=2).transpose(1, 2)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k, v).transpose(1, 2)

    def _select(self, impl, v_new, v_cached, n):
        if impl == "kernels":
            return hierkern.refresh_select(v_new, v_cached, n)
        return kv_ref.refresh_select_reference(v_new, v_cached, n)

    def _attention_rows(self, impl, lw, x, idx, cache, rope, rot, v=None, residual=None, norm=None):
        """Attention output (after the projection, plus residual when given) of rows x (B, n, C)
        sitting at slots idx, after writing their K/V; x is normalised by the projection when norm is
        given, else already; rot: rope.rows(idx); v: their V when already computed."""
        B, n, C = x.shape
        H, Hk, D = self.heads, self.kv_heads, self.head_dim
        if v is None:
            q, k, v = lw.qkv(x, norm=norm).view(B, n, H + 2 * Hk, D).split((H, Hk, Hk), dim=2)
        else:  # V is known: project q and k only
            q, k = lw.qk(x, norm=norm).view(B, n, H + Hk, D).split((H, Hk), dim=2)
        self._write(impl, cache, idx, k, v, rope)
        o = self._attend(impl, rope.rotate(q, rot), cache)
        return lw.proj(o.reshape(B, n, self.width), residual=residual)

    def _forward_rows(self, impl, ids, a, caches, rope, layers, store=False):
        """Hidden states of rows [a, L) given only their ids (B, L - a) or rows [a, a + n): their K/V
        go into `caches` and they attend every cached row. store: keep the attention / MLP outputs
        (the "adaptive" refresh)."""
        B, n = ids.shape
        idx, rot = rope.slots(a, n, B)
        x = F.embedding(ids, self.embed.weight)
        for lw, cache in zip(layers, caches):
            if store:
                ao = self._attention_rows(impl, lw, x, idx, cache, rope, rot, norm=lw.norm1)
                x = x + ao
                mo = self._mlp(lw, x)
                cache.attn[:, a:a + n] = ao
                cache.mlp[:, a:a + n] = mo
                x = x + mo
            else:  # the residual adds ride in the projections (the packed path's epilogue)
                x = self._attention_rows(impl, lw, x, idx, cache, rope, rot, residual=x, norm=lw.norm1)
                x = self._mlp(lw, x, residual=x)
        return x

    def _forward_adaptive(self, impl, ids, caches, rope, layers, n_refresh):
        """dLLM-Cache step over the whole sequence: V of every row, the n_refresh least-similar rows
        recomputed, cached attention / MLP outputs for the rest."""
        B, L = ids.shape
        bi = torch.arange(B, device=ids.device)[:, None]
        x = F.embedding(ids, self.embed.weight)
        for lw, cache in zip(layers, caches):
            xn = torch.layer_norm(x, (self.width,), *lw.norm1)
            v_all = lw.v(xn).view(B, L, self.kv_heads, self.head_dim)
            idx = self._select(impl, v_all, cache.v, n_refresh)
            if n_refresh:
                cache.attn[bi, idx] = self._attention_rows(impl, lw, xn[bi, idx], idx, cache, rope, rope.rows(idx),
                                                           v=v_all[bi, idx])
            x = x + cache.attn
            if n_refresh:
                cache.mlp[bi, idx] = self._mlp(lw, x[bi, idx])
            x = x + cache.mlp
        return x

    def _logits(self, h, head):
        norm = self.norm
        return head(h, norm=(norm.weight, norm.bias, norm.eps))

    def _new_caches(self, B, L, adaptive):
        return [_LayerCache(B, L, self.kv_heads, self.head_dim, self.width, self.embed.weight.dtype,
                            self._device(), adaptive) for _ in self.blocks]

    def _check_ids(self, owner, name, ids, high):
        return check_token_ids(owner, name, ids, high, self._device())

    # ------------------------------------------------------------------------------------------

    def forward(self, ids, impl=None):
        """Logits (B, L, vocab_size) of one bidirectional forward over ids (B, L) ([MASK] allowed)."""
        owner = "MaskedDiffusionLM.forward"
        impl = _attention.check_impl(owner, self.impl if impl is None else impl, _KERNEL_APIS)
        ids = self._check_ids(owner, "ids", ids, self.vocab_size + 1)
        B, L = ids.shape
        h = self._forward_rows(impl, ids, 0, self._new_caches(B, L, False), self._rope_tables(L),
                               self._layer_weights())
        return self._logits(h, Linear(self.out.weight, self.out.bias, pack=False))

    @staticmethod
    def unmask(blk, masked, logits, threshold, quota, n_masked=None):
        """Greedy parallel decoding of one step: per row, reveal the masked tokens whose confidence
        (max softmax probability) exceeds threshold, at least `quota` (the most confident first, ties
        lowest position first), at most all of them (n_masked: masked.sum(1) when the caller has it).
        Returns the new block ids."""
        conf, tok = (logits if logits.dtype == torch.float32 else logits.float()).softmax(dim=-1).max(dim=-1)
        conf = torch.where(masked, conf, -1.0)
        if n_masked is None:
            n_masked = masked.sum(dim=1)
        count = (conf > threshold).sum(dim=1).clamp_(min=quota).minimum(n_masked)
        rank = conf.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        # count <= n_masked and revealed tokens rank below every masked one (conf -1), so the first
        # `count` ranks are masked tokens
        return torch.where(rank < count[:, None], tok, blk)

    @torch.no_grad()
    def generate(self, prompt, gen_length, block_length, steps, threshold=0.9, cache="none", interval=None,
                 ratio=0.25, impl=None):
        """Generate gen_length tokens after prompt (B, P); returns (B, P + gen_length).

        Semi-autoregressive: the generated part is gen_length / block_length blocks, decoded left to
        right, each in at most steps / num_blocks steps. A step predicts every masked token of the
        current block (greedy) and reveals those with confidence > threshold - at least
        ceil(masked / steps left), so at least one and the block finishes in time (LLaDA's schedule
        with Fast-dLLM's threshold parallel decoding). Every token attends the whole sequence,
        including the masked future blocks.

        cache: "none" | "prefix" | "dual" | "adaptive" (see the module docstring); interval: full refresh
        every `interval` steps inside a block besides each block start (None: block starts only);
        ratio: "adaptive"'s fraction of the sequence recomputed per step (ceil(ratio * L) rows).
        """
        owner = "MaskedDiffusionLM.generate"
        impl = _attention.check_impl(owner, self.impl if impl is None else impl, _KERNEL_APIS)
        prompt = self._check_ids(owner, "prompt", prompt, self.vocab_size)
        for arg, value in (("gen_length", gen_length), ("block_length", block_length), ("steps", steps)):
            _check_positive_int(owner, arg, value)
        if gen_length % block_length:
            raise ValueError(f"{owner}: gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
        num_blocks = gen_length // block_length
        if steps % num_blocks:
            raise ValueError(f"{owner}: steps ({steps}) must be a multiple of the number of blocks ({num_blocks})")
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"{owner}: threshold must be in [0, 1], got {threshold!r}")
        if cache not in CACHES:
            raise ValueError(f"{owner}: cache must be one of {CACHES}, got {cache!r}")
        if interval is not None:
            _check_positive_int(owner, "interval", interval)
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"{owner}: ratio must be in [0, 1], got {ratio!r}")

        B, P = prompt.shape
        L, dev = P + gen_length, self._device()
        ids = torch.cat((prompt, torch.full((B, gen_length), self.mask_id, dtype=torch.long, device=dev)), dim=1)
        rope, layers = self._rope_tables(L), self._layer_weights(pack=True)
        head = Linear(self.out.weight, self.out.bias)
        caches = self._new_caches(B, L, cache == "adaptive")
        n_refresh = min(L, math.ceil(ratio * L))
        per_block = steps // num_blocks
        for nb in range(num_blocks):
            s, e = P + nb * block_length, P + (nb + 1) * block_length
            for step in range(per_block):
                blk = ids[:, s:e]
                masked = blk == self.mask_id
                n_masked = masked.sum(dim=1)
                most = int(n_masked.max())
                if most == 0:
                    break
                full = cache == "none" or step % (interval or per_block) == 0
                if full:
                    h = self._forward_rows(impl, ids, 0, caches, rope, layers, store=cache == "adaptive")[:, s:e]
                elif cache == "prefix":
                    h = self._forward_rows(impl, ids[:, s:], s, caches, rope, layers)[:, :e - s]
                elif cache == "dual":
                    h = self._forward_rows(impl, ids[:, s:e], s, caches, rope, layers)
                else:
                    h = self._forward_adaptive(impl, ids, caches, rope, layers, n_refresh)[:, s:e]
                quota = max(1, math.ceil(most / (per_block - step)))
                blk.copy_(self.unmask(blk, masked, self._logits(h, head), threshold, quota, n_masked))
        return ids
