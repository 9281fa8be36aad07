"""Axial attention, plain PyTorch: the executable specification (any device, any float dtype, autograd).

q (B, H, W, heads, D), k / v (B, H, W, kv_heads, D), heads a multiple of kv_heads (GQA: q head i reads
kv head i // (heads // kv_heads)). axis=1 attends along H inside each column, axis=2 along W inside
each row; causal lets position p see positions <= p along the axis only. The reference permutes the
axis next to head_dim (copies are fine here) and runs an explicit softmax.
"""
import torch


def axial_attention_reference(q, k, v, axis, causal=False, scale=None, return_lse=False):
    """Returns out (q's shape, computed eagerly in q's dtype: the tests' measure of that dtype's own
    error) and, with return_lse, the log-sum-exp (B, H, W, heads), float32 (float64 for float64 q)."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    group = q.shape[3] // k.shape[3]
    # (B, other, heads, S, D): the axis becomes the sequence dim of a batched attention.
    perm = (0, 2, 3, 1, 4) if axis == 1 else (0, 1, 3, 2, 4)
    qs, ks, vs = (t.permute(perm) for t in (q, k, v))
    if group > 1:
        ks = ks.repeat_interleave(group, dim=2)
        vs = vs.repeat_interleave(group, dim=2)
    s = torch.matmul(qs, ks.transpose(-1, -2)) * scale
    n = s.shape[-1]
    if causal:
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~mask, float("-inf"))
    out = torch.matmul(torch.softmax(s, dim=-1), vs)
    inv = (0, 3, 1, 2, 4) if axis == 1 else (0, 1, 3, 2, 4)
    out = out.permute(inv)
    if not return_lse:
        return out
    lse = torch.logsumexp(s if q.dtype == torch.float64 else s.float(), dim=-1)
    lse = lse.permute((0, 3, 1, 2) if axis == 1 else (0, 1, 3, 2))
    return out, lse
