"""The no-build CUDA path of selective_scan (the `hierkern[cupy]` extra): when hierkern._C was built
without CUDA, the kernel header csrc/cuda/selective_scan_kernels.cuh is compiled at first use with
cupy's NVRTC, cached per (device architecture, dtype), and launched on torch tensors' memory on
torch's current stream. This mirrors the C++ launcher csrc/cuda/selective_scan.cu (keep them in step).
Registered as the CUDA kernels of hierkern::selective_scan_fwd / _bwd only when _C has none, so
autograd, fake tensors and impl selection are the same on both routes."""
import ctypes

import torch

from . import cuda_source as src

_MODULES = {}  # (device index, arch, dtype) -> cupy.RawModule

INSTALL_HINT = ("selective_scan: impl='cuda' needs either hierkern._C built with CUDA (pip install from "
                "source with nvcc present) or cupy for the no-build NVRTC path: pip install 'hierkern[cupy]' "
                "(or cupy-cuda12x / cupy-cuda13x matching your CUDA)")


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError(f"{INSTALL_HINT}; cupy is not importable: {e}") from e
    return cupy


def has_cupy() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def _function(kind, dtype, device):
    cupy = _cupy()
    major, minor = torch.cuda.get_device_capability(device)
    key = (device.index, f"{major}{minor}", dtype)
    mod = _MODULES.get(key)
    if mod is None:
        with cupy.cuda.Device(device.index):
            # cupy compiles for the current device's architecture (and caches the binary on disk too).
            mod = cupy.RawModule(code=src.header_text(), options=src.nvrtc_options(dtype), backend="nvrtc")
            mod.get_function(src.entry("fwd", dtype))  # compile now, not inside a timed launch
        _MODULES[key] = mod
    return mod.get_function(src.entry(kind, dtype))


def _cupy_launch(kind, p, u, threads):
    cupy = _cupy()
    fn = _function(kind, u.dtype, u.device)
    args = (ctypes.c_void_p * 1)(ctypes.addressof(p))
    stream = torch.cuda.current_stream(u.device).cuda_stream
    with cupy.cuda.Device(u.device.index):
        cupy.cuda.driver.launchKernel(fn.ptr, p.batch * p.dim, 1, 1, threads, 1, 1, 0, stream,
                                      ctypes.addressof(args), 0)


# (kind, ScanParams, u, threads) -> None. Tests on a GPU without cupy swap in a CUDA-driver-API launcher
# (tests/test_selective_scan_cuda.py) to exercise everything else here: params, buffers, reductions.
_launcher = _cupy_launch


def _launch(kind, p, u, threads):
    _launcher(kind, p, u, threads)


def _require():
    if _launcher is _cupy_launch:
        _cupy()


def _ptr(t):
    return None if t is None else t.data_ptr()


def _bc(p, name, X, d):
    pre = name
    setattr(p, f"{pre}_f32", int(X.dtype == torch.float32))
    if X.dim() == 2:
        vals = (0, d, 0, X.stride(0), X.stride(1), 0)
    elif X.dim() == 3:
        vals = (1, 1, X.stride(0), 0, X.stride(1), X.stride(2))
    else:
        vals = (1, X.shape[1], X.stride(0), X.stride(1), X.stride(2), X.stride(3))
    for f, v in zip(("var", "groups"), vals[:2]):
        setattr(p, f"{pre}_{f}", v)
    for f, v in zip(("b", "g", "n", "l"), vals[2:]):
        setattr(p, f"s{pre}_{f}", v)


def _params(u, delta, A, B, C, D, z, delta_bias, init, softplus):
    if not u.is_cuda or u.dtype not in src.DTYPE_CODES:
        raise ValueError(f"selective_scan (cuda, NVRTC): u must be a float32 / float16 / bfloat16 CUDA tensor, "
                         f"got {u.dtype} on {u.device}")
    for name, t in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias), ("initial_state", init)):
        if t is not None and t.device != u.device:
            raise ValueError(f"selective_scan (cuda, NVRTC): {name} is on {t.device}, u on {u.device}")
    b, d, l = u.shape
    p = src.ScanParams()
    p.u, p.delta, p.A, p.B, p.C = (t.data_ptr() for t in (u, delta, A, B, C))
    p.D, p.z, p.delta_bias, p.init = _ptr(D), _ptr(z), _ptr(delta_bias), _ptr(init)
    p.batch, p.dim, p.seqlen, p.dstate = b, d, l, A.shape[1]
    p.softplus = int(softplus)
    p.su_b, p.su_d, p.su_l = u.stride()
    p.sdl_b, p.sdl_d, p.sdl_l = delta.stride()
    p.sA_d, p.sA_n = A.stride()
    _bc(p, "B", B, d)
    _bc(p, "C", C, d)
    if z is not None:
        p.sz_b, p.sz_d, p.sz_l = z.stride()
    if D is not None:
        p.sD = D.stride(0)
    if delta_bias is not None:
        p.sbias = delta_bias.stride(0)
    if init is not None:
        p.si_b, p.si_d, p.si_n = init.stride()
    return p


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    """hierkern::selective_scan_fwd through NVRTC: (out, last_state)."""
    _require()
    p = _params(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)
    out = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    last = torch.empty(p.batch, p.dim, p.dstate, dtype=torch.float32, device=u.device)
    p.out, p.last = out.data_ptr(), last.data_ptr()
    _launch("fwd", p, u, src.threads_for(p.seqlen))
    return out, last


def selective_scan_bwd(grad_out, grad_last_state, u, delta, A, B, C, D, z, delta_bias, initial_state,
                       delta_softplus):
    """hierkern::selective_scan_bwd through NVRTC: (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit)."""
    _require()
    p = _params(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)
    b, d, l, n = p.batch, p.dim, p.seqlen, p.dstate
    threads = src.threads_for(l)
    p.nchunks = -(-l // (threads * src.ITEMS))
    dev, f32 = u.device, torch.float32
    du, ddelta = torch.empty_like(u, memory_format=torch.contiguous_format), torch.empty(u.shape, dtype=u.dtype, device=dev)
    dz = torch.empty(u.shape, dtype=u.dtype, device=dev) if z is not None else u.new_empty((0,))
    dinit = torch.empty(b, d, n, dtype=f32, device=dev)
    dA_part = torch.empty(b, d, n, dtype=f32, device=dev)
    dD_part, dbias_part = torch.empty(b, d, dtype=f32, device=dev), torch.empty(b, d, dtype=f32, device=dev)
    ckpt = torch.empty(b, d, p.nchunks, n, dtype=f32, device=dev)
    dB_acc = torch.zeros(b, p.B_groups, n, l, dtype=f32, device=dev) if p.B_var else dA_part.new_empty(b, d, n)
    dC_acc = torch.zeros(b, p.C_groups, n, l, dtype=f32, device=dev) if p.C_var else dA_part.new_empty(b, d, n)
    p.gout = grad_out.data_ptr()
    p.sg_b, p.sg_d, p.sg_l = grad_out.stride()
    if grad_last_state is not None:
        p.glast = grad_last_state.data_ptr()
        p.sgl_b, p.sgl_d, p.sgl_n = grad_last_state.stride()
    p.du, p.ddelta, p.dz = du.data_ptr(), ddelta.data_ptr(), (dz.data_ptr() if z is not None else None)
    p.dA, p.dB, p.dC = dA_part.data_ptr(), dB_acc.data_ptr(), dC_acc.data_ptr()
    p.dD, p.dbias, p.dinit, p.ckpt = dD_part.data_ptr(), dbias_part.data_ptr(), dinit.data_ptr(), ckpt.data_ptr()
    _launch("bwd", p, u, threads)
    dB = (dB_acc.view(B.shape) if p.B_var else dB_acc.sum(0)).to(B.dtype)
    dC = (dC_acc.view(C.shape) if p.C_var else dC_acc.sum(0)).to(C.dtype)
    return du, ddelta, dA_part.sum(0), dB, dC, dD_part.sum(0), dz, dbias_part.sum(0), dinit


_LIB = None


def register_if_unbuilt():
    """Make the NVRTC route the CUDA kernels of the ops when hierkern._C has none (built without CUDA)."""
    global _LIB
    if _LIB is not None or torch._C._dispatch_has_kernel_for_dispatch_key("hierkern::selective_scan_fwd", "CUDA"):
        return
    _LIB = torch.library.Library("hierkern", "IMPL")
    _LIB.impl("selective_scan_fwd", selective_scan_fwd, "CUDA")
    _LIB.impl("selective_scan_bwd", selective_scan_bwd, "CUDA")
