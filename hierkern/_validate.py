"""Argument checks shared by the public ops. Errors name the argument and what was expected; nothing
is reshaped, cast or copied to make bad input fit."""
import torch

GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 32, 256


def check_tensor(opname, name, t, ndim, layout_doc):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{opname}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{opname}: {name} must be {ndim}-D {layout_doc}, got shape {tuple(t.shape)}")


def value_range(t):
    """(min, max) of a non-empty tensor as Python numbers, with one host sync on a GPU (int(t.min()),
    int(t.max()) is two)."""
    return tuple(torch.stack(torch.aminmax(t)).tolist())


def check_same(opname, tensors, what):
    """All named tensors share dtype (what='dtype') or device (what='device')."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        a, b = getattr(first, what), getattr(t, what)
        if a != b:
            raise ValueError(f"{opname}: {name} has {what} {b} but {first_name} has {what} {a}; "
                             f"they must match")


def check_attention_qkv(opname, q, k, v, doc="(batch, seq, heads, head_dim)", names=("q", "k", "v")):
    """BSHD q/k/v with GQA: k and v share shape, q heads a multiple of kv heads, one head_dim.
    `names` are the argument names the errors use (e.g. k_cache / v_cache)."""
    nq, nk, nv = names
    for name, t in zip(names, (q, k, v)):
        check_tensor(opname, name, t, 4, doc)
    check_same(opname, {nq: q, nk: k, nv: v}, "device")
    check_same(opname, {nq: q, nk: k, nv: v}, "dtype")
    allowed = CPU_DTYPES if q.device.type == "cpu" else GPU_DTYPES
    if q.dtype not in allowed and q.dtype != torch.float64:
        raise TypeError(f"{opname}: {nq} has dtype {q.dtype}; expected one of {allowed}")
    if k.shape != v.shape:
        raise ValueError(f"{opname}: {nk} and {nv} must have the same shape, got {nk} {tuple(k.shape)} "
                         f"and {nv} {tuple(v.shape)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"{opname}: {nk} has batch {k.shape[0]} but {nq} has batch {q.shape[0]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{opname}: head_dim mismatch: {nq} has {q.shape[3]}, {nk}/{nv} have {k.shape[3]}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"{opname}: {nq} heads ({q.shape[2]}) must be a multiple of {nk}/{nv} heads "
                         f"({k.shape[2]}) (GQA)")
    d = q.shape[3]
    if not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM and d % 8 == 0):
        raise ValueError(f"{opname}: head_dim {d} is not supported; expected a multiple of 8 in "
                         f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")


def resolve_scale(opname, scale, head_dim):
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{opname}: scale must be a float or None, got {type(scale).__name__}")
    return float(scale)
