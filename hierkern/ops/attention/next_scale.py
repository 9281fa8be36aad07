"""next_scale_attention: block-sparse attention over a multi-scale token sequence (VAR, HMAR, M-VAR,
Infinity, FlexVAR), a thin wrapper over the interval-attention kernels."""

from ... import _backend, _validate
from ...layouts import ScaleLayout
from . import cos_attention
from .op import interval_attention
from .patterns import SEGMENT_CAUSAL, SEGMENT_DIAGONAL

PATTERNS = {"causal": SEGMENT_CAUSAL, "diagonal": SEGMENT_DIAGONAL}
_NAME = "next_scale_attention"


def next_scale_attention(q, k, v, layout, pattern="causal", scale=None, impl=None, qk_norm=False,
                         temperature=None):
    """Attention over a sequence of scales laid out one after another.

    Args:
        q: (batch, L, heads, head_dim); k, v: (batch, L, kv_heads, head_dim), heads % kv_heads == 0.
            Any strides (no copies are made). float32 / float16 / bfloat16.
        layout: ScaleLayout whose total length L equals the sequence length.
        pattern: "causal" - a token of scale i sees every token of scales j <= i (VAR, Infinity);
            "diagonal" - a token sees only its own scale (HMAR, M-VAR intra-scale).
            Attention inside a scale is always bidirectional.
        scale: softmax scale, default 1/sqrt(head_dim) (1.0 with qk_norm).
        impl: None (fastest available), "reference", "cpu", "triton" or "cuda".
        qk_norm: VAR's cos attention (attn_l2_norm; Infinity's cos_attn), fused into the kernels:
            q and k are L2-normalised over head_dim and q is multiplied by exp(min(temperature, ln 100))
            per head. The CUDA C++ fallback (impl="cuda") has no such prologue and raises.
        temperature: (heads,) float32 tensor of per-head log multipliers; required with qk_norm.

    Returns:
        (batch, L, heads, head_dim) in q's dtype. Differentiable in q, k, v (and temperature).
    """
    if not isinstance(layout, ScaleLayout):
        raise TypeError(f"{_NAME}: layout must be a hierkern.ScaleLayout, got {type(layout).__name__}")
    if pattern not in PATTERNS:
        raise ValueError(f"{_NAME}: pattern must be 'causal' or 'diagonal', got {pattern!r}")
    _validate.check_attention_qkv(_NAME, q, k, v)
    for name, t in (("q", q), ("k", k)):
        if t.shape[1] != layout.L:
            raise ValueError(f"{_NAME}: {name} has sequence length {t.shape[1]} but layout.L is "
                             f"{layout.L} (sizes {list(layout.sizes)})")
    temperature = cos_attention.check(_NAME, qk_norm, temperature, q)
    if scale is None:
        scale = cos_attention.default_scale(qk_norm, q.shape[-1])
    scale = _validate.resolve_scale(_NAME, scale, q.shape[-1])
    backend = _backend.select(_NAME, impl, q.device, cuda_op="interval_attn_fwd", dtype=q.dtype)
    return interval_attention(q, k, v, layout.offsets, layout.offsets_tensor, PATTERNS[pattern], 0,
                              scale, backend, _NAME, temperature=temperature)
