"""hierkern: kernels for hierarchical generative models."""
from .kv_cache import KVCache
from .layouts import ScaleLayout
from .ops.attention.next_scale import next_scale_attention
from .ops.cached_attention.cached import cached_attention

__all__ = ["KVCache", "ScaleLayout", "cached_attention", "next_scale_attention"]
__version__ = "0.1.0"
