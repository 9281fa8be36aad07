"""Argument checks shared by the language-model style reference models (token id tensors)."""
import torch

from hierkern._validate import value_range

from . import _attention
from ._next_scale import _INT_DTYPES, _check_positive_int


def check_token_ids(owner, name, ids, high, device, shape=None):
    """ids: a (batch, length) integer tensor on `device` (of exactly `shape` if given) holding values in
    [0, high); returned as int64."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a (batch, length) integer tensor, got {type(ids).__name__}")
    if ids.dtype not in _INT_DTYPES:
        raise TypeError(f"{owner}: {name} must have an integer dtype (token ids), got {ids.dtype}")
    if ids.dim() != 2 or 0 in ids.shape or (shape is not None and tuple(ids.shape) != shape):
        want = "(batch, length)" if shape is None else str(shape)
        raise ValueError(f"{owner}: {name} must have shape {want}, got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{owner}: {name} is on {ids.device} but the model is on {device}")
    lo, hi = value_range(ids)
    if lo < 0 or hi >= high:
        raise ValueError(f"{owner}: {name} must hold token ids in [0, {high}), got values in [{lo}, {hi}]")
    return ids.long()


def check_lm_config(owner, impl, **sizes):
    """Constructor arguments of the RoPE / GQA language models: every size (in the order given) an
    int >= 1, width = heads x an even head_dim, heads a multiple of kv_heads, a known impl."""
    for arg, value in sizes.items():
        _check_positive_int(owner, arg, value)
    width, heads, kv_heads = sizes["width"], sizes["heads"], sizes["kv_heads"]
    if width % heads or (width // heads) % 2 or heads % kv_heads:
        raise ValueError(f"{owner}: width ({width}) must be a multiple of heads ({heads}) with an even head_dim, "
                         f"and heads a multiple of kv_heads ({kv_heads})")
    if impl not in _attention.IMPLS:
        raise ValueError(f"{owner}: impl must be 'reference' or 'kernels', got {impl!r}")
