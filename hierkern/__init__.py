"""hierkern: kernels for hierarchical generative models."""
from .cpu_cache import empty_cpu_cache
from .kv_cache import KVCache
from .layouts import ScaleLayout
from .ops.axial.axial import axial_attention
from .ops.attention.next_scale import next_scale_attention
from .ops.cached_attention.cached import cached_attention
from .ops.attention.skip_causal import block_causal_attention, skip_causal_attention
from .ops.conv.causal_conv1d import causal_conv1d
from .ops.kv_reuse.refresh_select import refresh_select
from .ops.kv_reuse.scatter_kv import scatter_kv
from .ops.kv_reuse.subset_attention import subset_attention
from .ops.scan.selective_scan import selective_scan
from .ops.scan.ssd_scan import ssd_scan

__all__ = ["KVCache", "ScaleLayout", "axial_attention", "block_causal_attention", "cached_attention",
           "causal_conv1d", "empty_cpu_cache", "next_scale_attention", "refresh_select", "scatter_kv",
           "selective_scan", "skip_causal_attention", "ssd_scan", "subset_attention"]
__version__ = "0.1.0"
