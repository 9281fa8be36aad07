"""Executable specification of the approximate-KV-reuse primitives: plain PyTorch, any device, any
floating dtype (float64 for the ground truth the tests compare against).

Conventions shared by every backend:
- Similarity of token s: cos = <new_s, cached_s> / max(|new_s| * |cached_s|, COS_EPS) over the whole
  (heads, head_dim) slab of the token, accumulated in float32 (float64 for float64 inputs). A NaN
  similarity counts as -inf (the most changed: a token whose K/V went bad is refreshed first).
- Selection: the k tokens of lowest similarity; equal similarities are taken lowest index first;
  the indices come back sorted ascending.
- Rotary embedding on write ("rotate-half", as LLaMA / LLaDA / hierkern's models): with half tables
  cos, sin of shape (max_len, head_dim // 2), the row written to slot p is
  cat(x1 * cos[p] - x2 * sin[p], x2 * cos[p] + x1 * sin[p]) where x1, x2 = x[..., :D/2], x[..., D/2:]
  (LLaMA's full tables are cat(cos, cos) of these), computed in float32 and rounded once to the cache
  dtype. The position of a row is its cache slot index[b, i].
"""
import torch

COS_EPS = 1e-8


def _acc_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def token_similarity(new, cached):
    """(batch, seq) cosine similarity per token over heads x head_dim, NaN replaced by -inf."""
    a = new.flatten(2).to(_acc_dtype(new))
    b = cached.flatten(2).to(_acc_dtype(new))
    dot = (a * b).sum(-1)
    norm = (a * a).sum(-1).sqrt() * (b * b).sum(-1).sqrt()
    sim = dot / norm.clamp_min(COS_EPS)
    return sim.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))


def refresh_select_reference(new, cached, k):
    """(batch, k) int64: the k least similar tokens per batch row, ascending."""
    sim = token_similarity(new, cached)
    order = torch.sort(sim, dim=1, stable=True).indices  # stable: equal values keep index order
    return order[:, :k].sort(dim=1).values


def rope_rows(x, cos, sin, index):
    """Rotate-half RoPE of rows x (B, n, H, D) at positions index (B, n), in float32 (float64 for
    float64 x), rounded to x.dtype."""
    acc = _acc_dtype(x)
    c = cos.to(acc)[index][:, :, None, :]  # (B, n, 1, D/2)
    s = sin.to(acc)[index][:, :, None, :]
    x1, x2 = x.to(acc).chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def scatter_kv_reference(k_cache, v_cache, index, k, v, cos=None, sin=None):
    """In place: k_cache[b, index[b, i]] = rope(k[b, i]) (or k[b, i]), v_cache[b, index[b, i]] = v[b, i].
    Indices are assumed valid and distinct (the public wrapper checks them)."""
    if cos is not None:
        k = rope_rows(k, cos, sin, index)
    b = torch.arange(index.shape[0], device=index.device)[:, None].expand_as(index)
    k_cache[b, index] = k
    v_cache[b, index] = v
