"""The attention of the next-scale models, in both implementations, and nothing else.

Every call from the reference models into hierkern's attention ops is in this file, so wiring the
models to a changed op is a one-file job.

impl="reference" is VAR's public code path, kept as the eager baseline: q and k are L2-normalised in
PyTorch, q is multiplied by the per-head temperature, and F.scaled_dot_product_attention runs with a
dense (1, 1, L, L) additive mask (0 / -inf) and softmax scale 1; generation grows each layer's K/V with
torch.cat every scale and attends with no mask.

impl="kernels" hands the same math to hierkern: next_scale_attention(qk_norm=True, temperature=...)
for whole sequences, and a preallocated hierkern.KVCache (raw k stored; normalised as it is read)
with hierkern.cached_attention(qk_norm=True) for generation.
"""
import math

import torch
import torch.nn.functional as F

import hierkern
from hierkern.layouts import ScaleLayout

IMPLS = ("reference", "kernels")
MAX_LOG_TEMPERATURE = math.log(100.0)  # VAR clamps the learned log-temperature at ln 100
_KERNEL_APIS = ("next_scale_attention", "KVCache", "cached_attention")


def check_impl(owner, impl, apis=_KERNEL_APIS):
    """`apis`: the hierkern functions impl='kernels' calls (the next-scale ones by default)."""
    if impl not in IMPLS:
        raise ValueError(f"{owner}: impl must be 'reference' or 'kernels', got {impl!r}")
    if impl == "kernels":
        missing = [name for name in apis if not hasattr(hierkern, name)]
        if missing:
            raise RuntimeError(f"{owner}: impl='kernels' needs hierkern.{', hierkern.'.join(missing)}, "
                               f"which this build of hierkern does not provide; use impl='reference'")
    return impl


def cos_qk(q, k, temperature, heads_axis):
    """VAR's attn_l2_norm prologue in PyTorch: unit q and k, q times exp(min(t, ln 100)) per head.
    `heads_axis` is the axis of the heads in q (1 for BHSD, 2 for BSHD)."""
    shape = [1] * q.dim()
    shape[heads_axis] = -1
    mul = temperature.clamp_max(MAX_LOG_TEMPERATURE).exp().to(q.dtype).view(shape)
    return F.normalize(q, dim=-1) * mul, F.normalize(k, dim=-1)


class MaskCache:
    """Dense additive masks of the reference path, built once per (layout, pattern, device, dtype) as
    VAR keeps its attn_bias_for_masking buffer. A one-scale layout needs no mask at all."""

    def __init__(self):
        self._masks = {}

    def get(self, layout, pattern, device, dtype):
        if layout.num_scales == 1:
            return None
        key = (layout.sizes, pattern, str(device), dtype)
        bias = self._masks.get(key)
        if bias is None:
            ids = layout.scale_ids(device)
            allowed = ids[None, :] <= ids[:, None] if pattern == "causal" else ids[None, :] == ids[:, None]
            bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
            bias.masked_fill_(~allowed, float("-inf"))
            bias = bias[None, None]
            self._masks[key] = bias
        return bias


def sequence_attention(q, k, v, temperature, layout, pattern, impl, masks):
    """Cos attention over a whole multi-scale sequence. q, k, v: (B, L, H, D) (strided views of the
    fused qkv projection). Returns (B, L, H, D), possibly a strided view."""
    if impl == "kernels":
        return hierkern.next_scale_attention(q, k, v, layout, pattern=pattern, scale=1.0, qk_norm=True,
                                             temperature=temperature.float())
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q, k = cos_qk(q, k, temperature, 1)
    bias = masks.get(layout, pattern, q.device, q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    return out.transpose(1, 2)


def single_scale_layout(n):
    return ScaleLayout.from_sizes((n,))


class CatKVCache:
    """VAR's generation cache: normalised k and v of every scale so far, grown with torch.cat."""

    def __init__(self):
        self.k = self.v = None

    def attend(self, q, k, v, temperature):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = cos_qk(q, k, temperature, 1)
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return F.scaled_dot_product_attention(q, self.k, self.v, scale=1.0).transpose(1, 2)


class KernelKVCache:
    """A preallocated hierkern.KVCache for one layer; raw k is stored and normalised on read."""

    def __init__(self, batch, max_len, heads, head_dim, dtype, device):
        self.cache = hierkern.KVCache(batch, max_len, heads, head_dim, dtype=dtype, device=device)

    def attend(self, q, k, v, temperature):
        self.cache.append(k, v)
        return hierkern.cached_attention(q, self.cache.k_cache, self.cache.v_cache, self.cache.length,
                                         scale=1.0, qk_norm=True, temperature=temperature.float())


def make_kv_cache(impl, batch, max_len, heads, head_dim, dtype, device):
    if impl == "kernels":
        return KernelKVCache(batch, max_len, heads, head_dim, dtype, device)
    return CatKVCache()
