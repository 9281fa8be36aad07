"""Helpers shared by the tests and the benchmarks: input factories, output poisoning and
precision-relative tolerances.

Tolerance rule (DESIGN.md §5): a kernel's error against the float64 reference must be at most
`factor` (2) times the error of the same computation done eagerly in the kernel's dtype, plus a small
floor relative to the magnitude of the result. There is no global atol.
"""
import contextlib

import torch

_EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7,
        torch.float64: 2.0 ** -52}


def make_qkv(batch, seqlen, heads, kv_heads, head_dim, dtype=torch.float32, device="cpu",
             strides="contiguous", requires_grad=False, generator=None):
    """Random BSHD q, k, v. strides: "contiguous"; "bhsd" (a (B, H, L, D) buffer viewed as BSHD,
    as a model that keeps heads outer produces); "padded" (head_dim sliced out of a wider buffer)."""
    def one(h):
        if strides == "contiguous":
            t = torch.randn(batch, seqlen, h, head_dim, generator=generator, dtype=torch.float32)
            t = t.to(device=device, dtype=dtype)
        elif strides == "bhsd":
            t = torch.randn(batch, h, seqlen, head_dim, generator=generator, dtype=torch.float32)
            t = t.to(device=device, dtype=dtype).transpose(1, 2)
        elif strides == "padded":
            t = torch.randn(batch, seqlen, h, head_dim + 8, generator=generator, dtype=torch.float32)
            t = t.to(device=device, dtype=dtype)[..., :head_dim]
        else:
            raise ValueError(f"make_qkv: unknown strides {strides!r}")
        return t.requires_grad_(requires_grad)
    return one(heads), one(kv_heads), one(kv_heads)


@contextlib.contextmanager
def poisoned_outputs():
    """Fill every uninitialised allocation (torch.empty, at::empty) with NaN while active, so an output
    element a kernel forgets to write makes the comparison fail."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)


def max_abs_err(a, b):
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def tolerance(ref64, ref_lowp, dtype, factor=2.0, floor_ulps=32.0):
    """Allowed max-abs error: factor * eager error in `dtype` + a floor of a few float32 ulps of the
    result's magnitude. The floor covers float32 accumulation-order noise (every kernel accumulates
    in float32), which matters only where the eager error is exactly zero (e.g. one-token scales)."""
    eager = max_abs_err(ref_lowp, ref64)
    scale = ref64.detach().abs().max().item() if ref64.numel() else 0.0
    return factor * eager + floor_ulps * _EPS[torch.float32] * max(scale, 1.0)


def assert_close_rel(name, out, ref64, ref_lowp, factor=2.0, floor_ulps=32.0):
    """Check a kernel result against the float64 reference, relative to the eager error."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    if torch.isnan(out).any():
        n = int(torch.isnan(out).sum())
        raise AssertionError(f"{name}: {n} NaN elements (unwritten output or overflow)")
    err = max_abs_err(out, ref64)
    tol = tolerance(ref64, ref_lowp, out.dtype, factor, floor_ulps)
    assert err <= tol, (f"{name}: max abs error {err:.3e} exceeds tolerance {tol:.3e} "
                        f"(eager {out.dtype} error {max_abs_err(ref_lowp, ref64):.3e})")
    return err, tol


def kernel_backends():
    """(impl, device) pairs that this machine can test: the C++ CPU kernels always; Triton on CUDA
    (compiled) or on CPU under TRITON_INTERPRET=1; the CUDA C++ kernels when built and a GPU exists."""
    from . import _backend
    pairs = [("cpu", "cpu")] if _backend.has_compiled_ops() else []
    if _backend.has_triton():
        if torch.cuda.is_available():
            pairs.append(("triton", "cuda"))
        elif _backend.triton_interpreted():
            pairs.append(("triton", "cpu"))
    if torch.cuda.is_available() and _backend.has_kernel("interval_attn_fwd", "CUDA"):
        pairs.append(("cuda", "cuda"))
    return pairs
