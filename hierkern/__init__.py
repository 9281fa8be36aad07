"""hierkern: kernels for hierarchical generative models."""
from .layouts import ScaleLayout
from .ops.attention.next_scale import next_scale_attention

__all__ = ["ScaleLayout", "next_scale_attention"]
__version__ = "0.1.0"
