"""Preallocated per-layer K/V caches.

VAR's public inference code grows its cache with torch.cat every scale, which copies the whole prefix
each step (quadratic traffic over a generation) and reallocates. KVCache allocates (batch, max_len,
kv_heads, head_dim) once and writes new rows in place; the filled part is handed out as views, which
hierkern.cached_attention can also take directly (it reads only the first kv_len rows of the buffers).
"""
import torch

_NAME = "KVCache"


class KVCache:
    """One layer's K and V buffers of shape (batch, max_len, kv_heads, head_dim).

    `length` (a host int, so no device sync) counts the filled rows. `append` and `overwrite` copy into
    the buffers in place and return views of the filled part; the buffers are never reallocated.
    """

    def __init__(self, batch, max_len, kv_heads, head_dim, *, dtype=torch.float32, device=None):
        for name, val in (("batch", batch), ("max_len", max_len), ("kv_heads", kv_heads),
                          ("head_dim", head_dim)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{_NAME}: {name} must be a positive int, got {val!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"{_NAME}: dtype must be a floating torch.dtype, got {dtype!r}")
        shape = (batch, max_len, kv_heads, head_dim)
        self.k_cache = torch.empty(shape, dtype=dtype, device=device)
        self.v_cache = torch.empty(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    @property
    def dtype(self):
        return self.k_cache.dtype

    @property
    def device(self):
        return self.k_cache.device

    def __repr__(self):
        b, _, hk, d = self.k_cache.shape
        return (f"KVCache(batch={b}, max_len={self.max_len}, kv_heads={hk}, head_dim={d}, "
                f"length={self._length}, dtype={self.dtype}, device={self.device})")

    def view(self):
        """(k, v) views of the filled rows, (batch, length, kv_heads, head_dim)."""
        return self.k_cache[:, :self._length], self.v_cache[:, :self._length]

    def _check_rows(self, method, k, v):
        b, _, hk, d = self.k_cache.shape
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{_NAME}.{method}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4 or t.shape[0] != b or t.shape[2] != hk or t.shape[3] != d:
                raise ValueError(f"{_NAME}.{method}: {name} must have shape (batch={b}, n, kv_heads={hk}, "
                                 f"head_dim={d}), got {tuple(t.shape)}")
            if t.dtype != self.dtype:
                raise TypeError(f"{_NAME}.{method}: {name} has dtype {t.dtype} but the cache holds "
                                f"{self.dtype}")
            if t.device != self.device:
                raise ValueError(f"{_NAME}.{method}: {name} is on {t.device} but the cache is on "
                                 f"{self.device}")
        if k.shape[1] != v.shape[1]:
            raise ValueError(f"{_NAME}.{method}: k has {k.shape[1]} rows but v has {v.shape[1]}")
        return k.shape[1]

    def append(self, k, v):
        """Write (batch, n, kv_heads, head_dim) rows at `length` and advance it; returns view()."""
        n = self._check_rows("append", k, v)
        end = self._length + n
        if end > self.max_len:
            raise ValueError(f"{_NAME}.append: k/v with {n} rows would fill the cache to length {end}, "
                             f"beyond max_len={self.max_len} (length is {self._length})")
        self.k_cache[:, self._length:end].copy_(k)
        self.v_cache[:, self._length:end].copy_(v)
        self._length = end
        return self.view()

    def overwrite(self, start, k, v):
        """Rewrite rows [start, start + n) of the filled part in place (a block re-written every
        denoising step, Fast-dLLM v2 style); returns view()."""
        n = self._check_rows("overwrite", k, v)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"{_NAME}.overwrite: start must be a non-negative int, got {start!r}")
        if start + n > self._length:
            raise ValueError(f"{_NAME}.overwrite: rows [start={start}, {start + n}) reach beyond the filled "
                             f"length {self._length} (max_len={self.max_len}); use append to grow the cache")
        self.k_cache[:, start:start + n].copy_(k)
        self.v_cache[:, start:start + n].copy_(v)
        return self.view()

    def truncate(self, length):
        """Forget rows from `length` on (their memory is kept and rewritten by later appends)."""
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= self._length:
            raise ValueError(f"{_NAME}.truncate: length must be an int in [0, {self._length}] (the filled "
                             f"length), got {length!r}")
        self._length = length

    def reset(self):
        self._length = 0
