"""Backend selection shared by every public op: impl=None picks the fastest available backend for the
inputs' device; an explicit impl never falls back silently (it raises, saying why)."""
import os

import torch

IMPLS = (None, "reference", "cpu", "triton", "cuda")

_C_ERROR = None
try:
    from . import _C  # noqa: F401  (loads the TORCH_LIBRARY registrations)
except ImportError as e:  # pragma: no cover - exercised only on broken installs
    _C_ERROR = e


def has_compiled_ops() -> bool:
    return _C_ERROR is None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def has_kernel(op: str, dispatch_key: str) -> bool:
    return has_compiled_ops() and torch._C._dispatch_has_kernel_for_dispatch_key(f"hierkern::{op}", dispatch_key)


def select(opname: str, impl, device: torch.device, cuda_op: str | None = None, dtype=None,
           triton: bool = True) -> str:
    """Resolve `impl` for tensors on `device`; raise a clear error for an unusable explicit choice.
    With `dtype`, float64 inputs are refused by every backend but the reference (kernels run float32
    arithmetic at most). triton=False: the op has no Triton kernel (its GPU backend is CUDA C++ only)."""
    backend = _resolve(opname, impl, device, cuda_op, triton)
    if dtype == torch.float64 and backend != "reference":
        raise TypeError(f"{opname}: float64 is supported by impl='reference' only (backend {backend!r})")
    return backend


def _resolve(opname: str, impl, device: torch.device, cuda_op: str | None, triton: bool = True) -> str:
    if impl not in IMPLS:
        raise ValueError(f"{opname}: impl must be one of {IMPLS}, got {impl!r}")
    on_cuda = device.type == "cuda"
    if impl is None:
        if on_cuda:
            if triton and has_triton():
                return "triton"
            if cuda_op is not None and has_kernel(cuda_op, "CUDA"):
                return "cuda"
            return "reference"
        if device.type == "cpu" and has_compiled_ops():
            return "cpu"
        return "reference"
    if impl == "reference":
        return impl
    if impl == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{opname}: impl='cpu' needs CPU tensors, got tensors on {device}")
        if not has_compiled_ops():
            raise RuntimeError(f"{opname}: impl='cpu' needs the compiled extension hierkern._C, which "
                               f"failed to import: {_C_ERROR}")
        return impl
    if impl == "triton":
        if not triton:
            raise NotImplementedError(f"{opname}: impl='triton' has no Triton kernel for this op; use "
                                      f"impl='cuda' (CUDA tensors), impl='cpu' or impl='reference'")
        if not has_triton():
            raise RuntimeError(f"{opname}: impl='triton' needs the triton package (pip install triton)")
        if not on_cuda and not (device.type == "cpu" and triton_interpreted()):
            raise ValueError(f"{opname}: impl='triton' needs CUDA tensors (or CPU tensors with "
                             f"TRITON_INTERPRET=1), got tensors on {device}")
        return impl
    # impl == "cuda"
    if not on_cuda:
        raise ValueError(f"{opname}: impl='cuda' needs CUDA tensors, got tensors on {device}")
    if cuda_op is None or not has_kernel(cuda_op, "CUDA"):
        alt = "use impl='triton' or impl=None" if triton else "use impl='reference'"
        raise NotImplementedError(f"{opname}: there is no CUDA C++ kernel for this op in this build ({alt})")
    return impl
