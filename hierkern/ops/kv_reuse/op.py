"""Approximate KV reuse: torch.library registration (fake kernels, Triton kernels) and the backend
dispatch behind hierkern.refresh_select and hierkern.scatter_kv. subset_attention has no op of its
own: it is hierkern.cached_attention's op (hierkern/ops/cached_attention/op.py) with its lse output."""
import torch

from ... import _backend
from . import reference

_LIB = "hierkern"


def _fake_select(new, cached, k):
    return new.new_empty((new.shape[0], k), dtype=torch.int64)


def _fake_scatter(k_cache, v_cache, index, k, v, cos, sin):
    return None


def _register():
    if not _backend.has_compiled_ops():
        return
    for suffix in ("", "_triton"):
        torch.library.register_fake(f"{_LIB}::refresh_select{suffix}")(_fake_select)
        torch.library.register_fake(f"{_LIB}::scatter_kv{suffix}")(_fake_scatter)
    if _backend.has_triton():
        # CPU tensors reach the Triton kernels only under the interpreter (tests without a GPU).
        keys = ["cuda"] + (["cpu"] if _backend.triton_interpreted() else [])
        for key in keys:
            torch.library.register_kernel(f"{_LIB}::refresh_select_triton", key, _triton_select)
            torch.library.register_kernel(f"{_LIB}::scatter_kv_triton", key, _triton_scatter)


def _triton_select(new, cached, k):
    from . import triton as tk  # imported on first use: importing triton costs about a second
    return tk.refresh_select(new, cached, k)


def _triton_scatter(k_cache, v_cache, index, k, v, cos, sin):
    from . import triton as tk
    tk.scatter_kv(k_cache, v_cache, index, k, v, cos, sin)


_register()


def refresh_select_op(new, cached, k, impl):
    if impl == "reference":
        return reference.refresh_select_reference(new, cached, k)
    op = torch.ops.hierkern.refresh_select_triton if impl == "triton" else torch.ops.hierkern.refresh_select
    return op(new, cached, k)


def scatter_kv_op(k_cache, v_cache, index, k, v, cos, sin, impl):
    if impl == "reference":
        reference.scatter_kv_reference(k_cache, v_cache, index, k, v, cos, sin)
    elif impl == "triton":
        torch.ops.hierkern.scatter_kv_triton(k_cache, v_cache, index, k, v, cos, sin)
    else:
        torch.ops.hierkern.scatter_kv(k_cache, v_cache, index, k, v, cos, sin)
