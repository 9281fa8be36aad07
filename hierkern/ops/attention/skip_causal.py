"""skip_causal_attention and block_causal_attention: block-diffusion masks (BD3-LM, SDAR, Fast-dLLM v2,
ACDiT) as thin wrappers over the interval-attention kernels. No 2N x 2N mask is built outside the
reference: the kernels derive every row's (at most two) key ranges from the document offsets, a
pattern id and block_size."""
import numbers

import torch

from ... import _backend, _validate
from .op import interval_attention
from .patterns import BLOCK_CAUSAL, SKIP_CLEAN_FIRST, SKIP_NOISY_FIRST

ORDERS = {"noisy_first": SKIP_NOISY_FIRST, "clean_first": SKIP_CLEAN_FIRST}

# The warp-per-row CUDA C++ kernels have not been run on a GPU with these patterns (and their range
# code is the segment-only subset): refused rather than faked. The Triton kernels run them.
_UNSUPPORTED = ("cuda",)

_OFFSETS_CACHE = {}


def _offsets_tensor_fn(offsets):
    """offsets_tensor(device) for op.interval_attention: the int32 copy, cached per (offsets, device)
    so a training loop with a fixed packing builds it once."""
    def get(device):
        key = (offsets, str(device))
        t = _OFFSETS_CACHE.get(key)
        if t is None:
            if len(_OFFSETS_CACHE) > 256:
                _OFFSETS_CACHE.clear()
            t = _OFFSETS_CACHE[key] = torch.tensor(offsets, dtype=torch.int32, device=device)
        return t
    return get


def _check_block_size(opname, block_size):
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise TypeError(f"{opname}: block_size must be a positive int, got {type(block_size).__name__}")
    if block_size < 1:
        raise ValueError(f"{opname}: block_size must be >= 1, got {block_size}")
    return int(block_size)


def _document_offsets(opname, cu_seqlens, seqlen):
    """Host tuple of document offsets from cu_seqlens (None: one document of the whole sequence)."""
    if cu_seqlens is None:
        return (0, seqlen)
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{opname}: cu_seqlens must be a 1-D int32 or int64 tensor, got "
                             f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
        values = cu_seqlens.tolist()  # a CUDA tensor costs one host sync here
    elif isinstance(cu_seqlens, (list, tuple)):
        values = list(cu_seqlens)
        for x in values:
            if isinstance(x, bool) or not isinstance(x, numbers.Integral):
                raise TypeError(f"{opname}: cu_seqlens must hold ints, got {type(x).__name__}")
    else:
        raise TypeError(f"{opname}: cu_seqlens must be None, a 1-D int tensor or a list/tuple of ints, "
                        f"got {type(cu_seqlens).__name__}")
    values = [int(x) for x in values]
    if len(values) < 2 or values[0] != 0:
        raise ValueError(f"{opname}: cu_seqlens must start at 0 and hold at least two values, got {values[:8]}")
    for i in range(len(values) - 1):
        if values[i + 1] <= values[i]:
            raise ValueError(f"{opname}: cu_seqlens must be strictly increasing, got cu_seqlens[{i}] = "
                             f"{values[i]} >= cu_seqlens[{i + 1}] = {values[i + 1]}")
    if values[-1] != seqlen:
        raise ValueError(f"{opname}: cu_seqlens ends at {values[-1]} but the sequence length is {seqlen}")
    if seqlen >= 2 ** 31:
        raise ValueError(f"{opname}: sequence length {seqlen} does not fit int32")
    return tuple(values)


def _run(opname, q, k, v, offsets, pattern, block_size, scale, impl):
    if impl in _UNSUPPORTED:
        raise NotImplementedError(
            f"{opname}: impl={impl!r} has no kernel for this mask yet (the CUDA C++ interval kernels do "
            f"not handle two-range block-diffusion rows); use impl='triton' (GPU), 'cpu' or 'reference'")
    if impl is None and q.device.type == "cuda" and not _backend.has_triton():
        raise NotImplementedError(
            f"{opname}: the GPU kernel for this mask is Triton's and triton is not installed (the CUDA "
            f"C++ kernels do not handle it); install triton or pass impl='reference' to run the "
            f"dense-mask reference")
    scale = _validate.resolve_scale(opname, scale, q.shape[-1])
    # No cuda_op: impl=None on CUDA tensors must resolve to Triton, never to the CUDA C++ op.
    backend = _backend.select(opname, impl, q.device, dtype=q.dtype)
    return interval_attention(q, k, v, offsets, _offsets_tensor_fn(offsets), pattern, block_size, scale,
                              backend, opname)


def _check_qkv(opname, q, k, v):
    _validate.check_attention_qkv(opname, q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"{opname}: k has sequence length {k.shape[1]} but q has {q.shape[1]}; "
                         f"they must match")


def skip_causal_attention(q, k, v, block_size, order="noisy_first", cu_seqlens=None, scale=None,
                          impl=None):
    """Skip-causal (block-diffusion training) attention over documents of noisy and clean tokens.

    Each document holds 2N tokens: N noisy x_t and N clean x_0, in blocks of block_size. Noisy block i
    sees itself (bidirectionally) and clean blocks < i; clean block i sees clean blocks <= i; nothing
    sees another block's noisy tokens and clean tokens never see noisy ones.

    Args:
        q: (batch, seq, heads, head_dim); k, v: (batch, seq, kv_heads, head_dim), heads % kv_heads == 0.
            Any strides (no copies are made). float32 / bfloat16 / float16 (Triton: head_dim <= 256).
        block_size: tokens per block; must divide every document's N.
        order: "noisy_first" - documents [x_t ; x_0] (BD3-LM, SDAR, Fast-dLLM v2);
            "clean_first" - documents [x_0 ; x_t] (ACDiT).
        cu_seqlens: packed documents: cumulative offsets (0, len_0, len_0 + len_1, ..., seq), each
            document laid out as its own pair of halves; no attention across documents. None: the
            whole sequence is one document. A CPU int32/int64 tensor or a list/tuple of ints; the
            values are needed on the host for validation and tiling, so a CUDA tensor costs one host
            sync (pass a list to avoid it).
        scale: softmax scale, default 1/sqrt(head_dim).
        impl: None (Triton on CUDA tensors, the C++ kernels on CPU tensors), "reference", "cpu" or
            "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1). "cuda" raises
            NotImplementedError: the CUDA C++ kernels do not handle these masks yet.

    Returns:
        (batch, seq, heads, head_dim) in q's dtype. Differentiable in q, k, v.
    """
    name = "skip_causal_attention"
    if order not in ORDERS:
        raise ValueError(f"{name}: order must be 'noisy_first' or 'clean_first', got {order!r}")
    _check_qkv(name, q, k, v)
    block_size = _check_block_size(name, block_size)
    offsets = _document_offsets(name, cu_seqlens, q.shape[1])
    for i in range(len(offsets) - 1):
        n = offsets[i + 1] - offsets[i]
        if n % 2:
            raise ValueError(f"{name}: document {i} has odd length {n}; a skip-causal document holds "
                             f"2N tokens (N noisy, N clean)")
        if (n // 2) % block_size:
            raise ValueError(f"{name}: block_size {block_size} does not divide document {i}'s N = {n // 2} "
                             f"(document length {n} = 2N)")
    return _run(name, q, k, v, offsets, ORDERS[order], block_size, scale, impl)


def block_causal_attention(q, k, v, block_size, cu_seqlens=None, scale=None, impl=None):
    """Block-causal ("staircase") attention, the block-diffusion prefill: row r of a document sees the
    document's keys < (r // block_size + 1) * block_size (bidirectional inside a block, causal across
    blocks). A document whose length is not a multiple of block_size ends with a partial block.

    Args as skip_causal_attention (cu_seqlens: packed documents of any lengths).
    """
    name = "block_causal_attention"
    _check_qkv(name, q, k, v)
    block_size = _check_block_size(name, block_size)
    offsets = _document_offsets(name, cu_seqlens, q.shape[1])
    return _run(name, q, k, v, offsets, BLOCK_CAUSAL, block_size, scale, impl)
