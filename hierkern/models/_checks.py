"""Argument checks shared by the language-model style reference models (token id tensors)."""
import torch

from ._next_scale import _INT_DTYPES


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
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= high:
        raise ValueError(f"{owner}: {name} must hold token ids in [0, {high}), got values in [{lo}, {hi}]")
    return ids.long()
