"""Executable specification of interval attention: plain PyTorch with an explicit mask.

This is the only place in hierkern where an L x L tensor exists. Works on any device and in any
floating dtype (float64 for the ground truth the tests compare against).
"""
import torch

from .patterns import SEGMENT_CAUSAL, SEGMENT_DIAGONAL


def interval_mask(offsets, pattern, device=None):
    """(L, L) bool mask, True where query row r may see key j."""
    sizes = torch.tensor([b - a for a, b in zip(offsets[:-1], offsets[1:])], device=device)
    seg = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)
    if pattern == SEGMENT_CAUSAL:
        return seg[None, :] <= seg[:, None]
    if pattern == SEGMENT_DIAGONAL:
        return seg[None, :] == seg[:, None]
    raise ValueError(f"unknown interval pattern id {pattern}")


def masked_attention(q, k, v, mask, scale, return_lse=False):
    """Softmax attention of BSHD q over BSHD k/v (GQA by head repetition) under a (Lq, Lk) bool mask.

    Computed in the inputs' dtype (the eager computation the tolerance is relative to)."""
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s.float(), dim=-1)
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows that see no key produce 0, as the kernels do
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return (out, lse) if return_lse else out


def interval_attention_reference(q, k, v, offsets, pattern, scale, return_lse=False):
    mask = interval_mask(offsets, pattern, device=q.device)
    return masked_attention(q, k, v, mask, scale, return_lse=return_lse)
