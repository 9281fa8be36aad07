"""Executable specification of interval attention: plain PyTorch with an explicit mask.

This is the only place in hierkern where an L x L tensor exists. Works on any device and in any
floating dtype (float64 for the ground truth the tests compare against).
"""
import torch

from .patterns import BLOCK_CAUSAL, SEGMENT_CAUSAL, SEGMENT_DIAGONAL, SKIP_NOISY_FIRST, SKIP_PATTERNS


def interval_mask(offsets, pattern, device=None, block_size=0):
    """(L, L) bool mask, True where query row r may see key j.

    Written from the semantics (segments; documents, halves and blocks), not from the per-row ranges
    of patterns.py, so the two definitions check each other."""
    sizes = torch.tensor([b - a for a, b in zip(offsets[:-1], offsets[1:])], device=device)
    seg = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)
    if pattern == SEGMENT_CAUSAL:
        return seg[None, :] <= seg[:, None]
    if pattern == SEGMENT_DIAGONAL:
        return seg[None, :] == seg[:, None]
    if pattern not in SKIP_PATTERNS and pattern != BLOCK_CAUSAL:
        raise ValueError(f"unknown interval pattern id {pattern}")
    if block_size < 1:
        raise ValueError(f"interval_mask: block_size must be >= 1 for pattern {pattern}, got {block_size}")
    starts = torch.tensor(list(offsets[:-1]), device=device)
    local = torch.arange(offsets[-1], device=device) - starts[seg]  # position inside its document
    same_doc = seg[None, :] == seg[:, None]
    if pattern == BLOCK_CAUSAL:
        blk = local // block_size
        return same_doc & (blk[None, :] <= blk[:, None])
    half = (sizes // 2)[seg]
    second = local >= half  # in the document's second half
    noisy = ~second if pattern == SKIP_NOISY_FIRST else second
    blk = torch.where(second, local - half, local) // block_size  # block index inside its half
    rn, rc, kn, kc = noisy[:, None], ~noisy[:, None], noisy[None, :], ~noisy[None, :]
    rb, kb = blk[:, None], blk[None, :]
    rule = (rn & kn & (kb == rb)) | (rn & kc & (kb < rb)) | (rc & kc & (kb <= rb))
    return same_doc & rule


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


def interval_attention_reference(q, k, v, offsets, pattern, scale, return_lse=False, block_size=0):
    mask = interval_mask(offsets, pattern, device=q.device, block_size=block_size)
    return masked_attention(q, k, v, mask, scale, return_lse=return_lse)
