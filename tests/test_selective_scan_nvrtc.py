"""The no-build CUDA route of selective_scan without a GPU: the kernel header compiles with NVRTC on its
own (PTX for compute_80, a cubin for sm_90; NVRTC needs no device), the Python launcher's mirror of
ScanParams and of the launch constants matches the header, the header ships with the package, and
impl='cuda' without cupy says what to install."""
import ctypes
import os
import re

import pytest
import torch

from hierkern.ops.scan import cuda_nvrtc, cuda_source

LIBNVRTC = cuda_source.find_libnvrtc()
needs_nvrtc = pytest.mark.skipif(LIBNVRTC is None, reason="no libnvrtc found (CUDA toolkit lib64 or the "
                                 "nvidia-cuda-nvrtc wheel)")


@needs_nvrtc
@pytest.mark.parametrize("arch,dtype", [("compute_80", torch.float32), ("compute_80", torch.float16),
                                        ("sm_90", torch.bfloat16)])
def test_header_compiles_with_nvrtc(arch, dtype):
    image, log = cuda_source.nvrtc_compile(arch, dtype, LIBNVRTC)
    assert "warning" not in log.lower(), log
    if arch.startswith("compute_"):
        ptx = image.decode(errors="replace")
        entries = set(re.findall(r"\.visible \.entry (\w+)\(", ptx))
        assert entries == {cuda_source.entry("fwd", dtype), cuda_source.entry("bwd", dtype)}, entries
        assert ".target sm_80" in ptx
    else:
        assert image[:4] == b"\x7fELF", "NVRTC did not return a cubin"
        for kind in ("fwd", "bwd"):
            assert cuda_source.entry(kind, dtype).encode() in image


def test_nvrtc_compile_reports_errors(monkeypatch):
    if LIBNVRTC is None:
        pytest.skip("no libnvrtc found")
    monkeypatch.setattr(cuda_source, "header_text", lambda: "extern \"C\" __global__ void k() { undefined_fn(); }")
    with pytest.raises(RuntimeError, match="NVRTC failed for compute_80"):
        cuda_source.nvrtc_compile("compute_80", torch.float32, LIBNVRTC)


def test_params_mirror_matches_header():
    names = [f for f, _ in cuda_source.ScanParams._fields_]
    assert cuda_source.header_fields() == names
    assert ctypes.sizeof(cuda_source.ScanParams) == 8 * len(names)


def test_launch_constants_match_header():
    text = cuda_source.header_text()
    assert int(re.search(r"constexpr int kItems = (\d+);", text).group(1)) == cuda_source.ITEMS
    assert int(re.search(r"constexpr int kMaxThreads = (\d+);", text).group(1)) == cuda_source.MAX_THREADS
    assert [cuda_source.threads_for(l) for l in (1, 256, 257, 680, 1024, 5000)] == [32, 32, 64, 96, 128, 128]


def test_header_is_self_contained_and_packaged():
    assert "#include" not in cuda_source.header_text()  # NVRTC compiles it with no include path
    # Installed copies find it as package data in hierkern/_csrc (a symlink to csrc/cuda in a checkout).
    pkg = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(cuda_source.__file__))))
    packaged = os.path.join(pkg, "_csrc", cuda_source.HEADER)
    repo = os.path.dirname(pkg)
    assert os.path.isfile(packaged)
    assert os.path.samefile(packaged, os.path.join(repo, "csrc", "cuda", cuda_source.HEADER))
    with open(os.path.join(repo, "setup.py")) as f:
        assert '"_csrc/*.cuh"' in f.read()


@pytest.mark.skipif(cuda_nvrtc.has_cupy(), reason="cupy is installed")
def test_without_cupy_the_error_says_what_to_install():
    u = torch.zeros(1, 2, 3)
    with pytest.raises(RuntimeError, match=r"built with CUDA.*hierkern\[cupy\]"):
        cuda_nvrtc.selective_scan_fwd(u, u, torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4), None, None,
                                      None, None, False)


@pytest.mark.parametrize("kind", ["fixed", "var", "grouped"])
@pytest.mark.parametrize("strided", [False, True])
def test_bc_fields_address_the_right_elements(kind, strided):
    """The B / C fields the NVRTC launcher packs (csrc/cuda/selective_scan.cu's set_bc does the same)
    locate element (batch b, channel c, state k, step t) at b*s_b + (c / (d / groups))*s_g + k*s_n +
    t*s_l, for every layout and stride pattern."""
    b, d, n, l, g = 2, 6, 3, 5, 3
    if kind == "fixed":
        X = torch.randn(n, d).t() if strided else torch.randn(d, n)
    elif kind == "var":
        X = torch.randn(b, l, n).transpose(1, 2) if strided else torch.randn(b, n, l)
    else:
        X = torch.randn(b, g, l, n).transpose(2, 3) if strided else torch.randn(b, g, n, l)
    p = cuda_source.ScanParams()
    cuda_nvrtc._bc(p, "B", X, d)
    assert p.B_var == (kind != "fixed") and p.B_f32 == 1
    flat = X.as_strided((X.untyped_storage().nbytes() // 4,), (1,), 0)
    for bi in range(b):
        for c in range(d):
            for k in range(n):
                for t in range(l):
                    off = X.storage_offset() + bi * p.sB_b + (c // (d // p.B_groups)) * p.sB_g + k * p.sB_n + t * p.sB_l
                    want = X[c, k] if kind == "fixed" else X[bi, k, t] if kind == "var" else X[bi, c // (d // g), k, t]
                    assert flat[off] == want


def test_backend_selection_on_cuda_devices():
    """No GPU is needed to resolve a backend for a device: selective_scan (CUDA C++ only, compiled or
    through NVRTC) gets 'cuda' for impl=None; ops with Triton kernels still get 'triton'."""
    from hierkern import _backend
    cuda = torch.device("cuda")
    if not _backend.has_compiled_ops():
        pytest.skip("hierkern._C is not built")
    assert _backend.has_kernel("selective_scan_fwd", "CUDA")  # compiled, or the NVRTC registration
    assert _backend.select("selective_scan", None, cuda, cuda_op="selective_scan_fwd", triton=False) == "cuda"
    assert _backend.select("selective_scan", "cuda", cuda, cuda_op="selective_scan_fwd", triton=False) == "cuda"
    with pytest.raises(NotImplementedError, match="selective_scan: impl='triton' has no Triton kernel"):
        _backend.select("selective_scan", "triton", cuda, cuda_op="selective_scan_fwd", triton=False)
    if _backend.has_triton():
        assert _backend.select("next_scale_attention", None, cuda, cuda_op="interval_attn_fwd") == "triton"
