"""The selective-scan CUDA kernel source as NVRTC sees it: where the header is (source checkout or
install), the ctypes mirror of its ScanParams struct, the entry-point names and compile options, and
an NVRTC compile through ctypes (no device, no cupy: what CI uses to show the header compiles)."""
import ctypes
import glob
import os
import re

import torch

HEADER = "selective_scan_kernels.cuh"
_PKG = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # .../hierkern
# Installed: hierkern/_csrc/ (package data; in a checkout a symlink to csrc/cuda). Checkout fallback.
_CANDIDATES = (os.path.join(_PKG, "_csrc", HEADER), os.path.join(os.path.dirname(_PKG), "csrc", "cuda", HEADER))

# HK_SS_DTYPE values and entry-point suffixes of the header.
DTYPE_CODES = {torch.float32: (0, "f32"), torch.float16: (1, "f16"), torch.bfloat16: (2, "bf16")}
ITEMS, MAX_THREADS = 8, 128  # hk_ss::kItems, hk_ss::kMaxThreads

_PTRS = ("u delta A B C D z delta_bias init out last gout glast du ddelta dz dA dB dC dD dbias dinit "
         "ckpt").split()
_INTS = ("batch dim seqlen dstate nchunks B_var B_groups B_f32 C_var C_groups C_f32 softplus "
         "su_b su_d su_l sdl_b sdl_d sdl_l sz_b sz_d sz_l sA_d sA_n sB_b sB_g sB_n sB_l sC_b sC_g sC_n sC_l "
         "sD sbias si_b si_d si_n sg_b sg_d sg_l sgl_b sgl_d sgl_n").split()


class ScanParams(ctypes.Structure):
    """Mirror of the header's ScanParams (every field 8 bytes, so no padding on either side)."""
    _fields_ = [(f, ctypes.c_void_p) for f in _PTRS] + [(f, ctypes.c_longlong) for f in _INTS]


def header_path() -> str:
    for p in _CANDIDATES:
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"hierkern: the CUDA kernel header {HEADER} is missing (looked in {_CANDIDATES})")


def header_text() -> str:
    with open(header_path()) as f:
        return f.read()


def header_fields(text: str | None = None) -> list[str]:
    """ScanParams' field names in declaration order, parsed from the header (for the mirror test)."""
    body = re.search(r"struct ScanParams \{(.*?)\n\};", text or header_text(), re.S).group(1)
    body = re.sub(r"//[^\n]*", "", body)
    names = []
    for decl in body.split(";"):
        decl = decl.replace("const void", "").replace("void", "").replace("hk_i64", "")
        names += [n.strip(" *\n") for n in decl.split(",") if n.strip(" *\n")]
    return names


def entry(kind: str, dtype: torch.dtype) -> str:
    return f"hk_selective_scan_{kind}_{DTYPE_CODES[dtype][1]}"


def nvrtc_options(dtype: torch.dtype) -> tuple[str, ...]:
    """One dtype's entry points per module (HK_SS_DTYPE); fast math as setup.py's nvcc flags."""
    return ("--use_fast_math", f"-DHK_SS_DTYPE={DTYPE_CODES[dtype][0]}")  # NVRTC defaults to C++17


def threads_for(seqlen: int) -> int:
    """Block size as the C++ launcher picks it: 32..128 threads, enough to cover short sequences."""
    want = -(-seqlen // ITEMS)
    return min(MAX_THREADS, max(32, -(-want // 32) * 32))


# ----------------------------------------------------------------------------------------------------
# NVRTC through ctypes (needs only libnvrtc: from the CUDA toolkit or the nvidia-cuda-nvrtc wheel)
# ----------------------------------------------------------------------------------------------------

def find_libnvrtc() -> str | None:
    cands = []
    try:
        import nvidia
        for root in nvidia.__path__:
            cands += sorted(glob.glob(os.path.join(root, "cu*", "lib", "libnvrtc.so*")))
            cands += sorted(glob.glob(os.path.join(root, "cuda_nvrtc", "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    for home in filter(None, (os.environ.get("CUDA_HOME"), "/usr/local/cuda")):
        cands += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")))
    cands = [c for c in cands if "builtins" not in c and ".alt." not in c]
    return cands[0] if cands else None


def nvrtc_compile(arch: str, dtype: torch.dtype, lib_path: str | None = None) -> tuple[bytes, str]:
    """Compile the header with NVRTC for `arch` ("compute_80": PTX, "sm_90": cubin). Returns (image,
    log); raises RuntimeError with NVRTC's log on failure."""
    lib = ctypes.CDLL(lib_path or find_libnvrtc())
    prog = ctypes.c_void_p()
    src = header_text().encode()
    check = _nvrtc_checker(lib)
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), src, HEADER.encode(), 0, None, None), "create")
    try:
        opts = [o.encode() for o in (*nvrtc_options(dtype), f"--gpu-architecture={arch}")]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        log = log.value.decode(errors="replace")
        if rc:
            raise RuntimeError(f"NVRTC failed for {arch} ({dtype}):\n{log}")
        kind = "PTX" if arch.startswith("compute_") else "CUBIN"
        check(getattr(lib, f"nvrtcGet{kind}Size")(prog, ctypes.byref(size)), f"get {kind} size")
        image = ctypes.create_string_buffer(size.value)
        check(getattr(lib, f"nvrtcGet{kind}")(prog, image), f"get {kind}")
        return image.raw, log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _nvrtc_checker(lib):
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def check(rc, what):
        if rc:
            raise RuntimeError(f"NVRTC {what}: {lib.nvrtcGetErrorString(rc).decode()}")
    return check
