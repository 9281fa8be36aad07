"""selective_scan's CUDA kernels (csrc/cuda/selective_scan_kernels.cuh) against the float64 reference,
forward and backward, on both routes that run them: compiled into hierkern._C ("compiled": the
hierkern.selective_scan(impl="cuda") path with autograd) and NVRTC through cupy ("nvrtc": the
functions of hierkern.ops.scan.cuda_nvrtc called directly, since with a CUDA build of _C they are not
what the dispatcher runs). Needs a GPU; the NVRTC route needs cupy, or else runs as "nvrtc-driver":
the same Python launcher with the header compiled by libnvrtc through ctypes and launched through
cuda-python's driver API. Outputs are poisoned (NaN) before every kernel call."""
import pytest
import torch

import hierkern
from hierkern import _backend
from hierkern.ops.scan import cuda_nvrtc, cuda_source
from hierkern.testing import assert_close_rel, poisoned_outputs
from scan_helpers import OpLog, cast_leaves
from test_selective_scan import ARGS, make_inputs

def _has_driver_bindings():
    try:
        from cuda.bindings import driver  # noqa: F401
    except ImportError:
        return False
    return cuda_source.find_libnvrtc() is not None


ROUTES = []
if torch.cuda.is_available() and _backend.has_compiled_ops():
    if cuda_nvrtc._LIB is None and _backend.has_kernel("selective_scan_fwd", "CUDA"):
        ROUTES.append("compiled")
    if cuda_nvrtc.has_cupy():
        ROUTES.append("nvrtc")
    elif _has_driver_bindings():
        # No cupy (the lent GPU has no network): the NVRTC route's Python launcher, with the header
        # compiled by libnvrtc (ctypes) and launched through the CUDA driver API (cuda-python).
        ROUTES.append("nvrtc-driver")

_DRIVER_MODULES = {}


def _driver_launch(kind, p, u, threads):
    import ctypes

    from cuda.bindings import driver

    def ok(res):
        err, *rest = res if isinstance(res, tuple) else (res,)
        assert err == driver.CUresult.CUDA_SUCCESS, f"CUDA driver call failed: {err}"
        return rest[0] if rest else None

    major, minor = torch.cuda.get_device_capability(u.device)
    key = (u.device.index, major, minor, u.dtype)
    if key not in _DRIVER_MODULES:
        cubin, _ = cuda_source.nvrtc_compile(f"sm_{major}{minor}", u.dtype)
        image = ctypes.create_string_buffer(cubin, len(cubin))
        _DRIVER_MODULES[key] = ok(driver.cuModuleLoadData(ctypes.addressof(image)))
    fn = ok(driver.cuModuleGetFunction(_DRIVER_MODULES[key], cuda_source.entry(kind, u.dtype).encode()))
    args = (ctypes.c_void_p * 1)(ctypes.addressof(p))
    stream = driver.CUstream(torch.cuda.current_stream(u.device).cuda_stream)
    ok(driver.cuLaunchKernel(fn, p.batch * p.dim, 1, 1, threads, 1, 1, 0, stream, ctypes.addressof(args), 0))


@pytest.fixture(autouse=True)
def _nvrtc_driver_launcher(request, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("route") == "nvrtc-driver":
        monkeypatch.setattr(cuda_nvrtc, "_launcher", _driver_launch)
    yield

pytestmark = pytest.mark.skipif(not ROUTES, reason="needs a GPU and the CUDA selective_scan kernels "
                                "(hierkern._C built with CUDA, or cupy for the NVRTC route)")
route_param = pytest.mark.parametrize("route", ROUTES or ["compiled"])


def to_cuda(x):
    return {k: (v.detach().cuda().requires_grad_() if v is not None else None) for k, v in x.items()}


def run_route(route, x, softplus, g, g_last):
    """out, last_state and the gradients of <out, g> + <last, g_last> w.r.t. the present leaves."""
    if route == "compiled":  # the other routes call the NVRTC launcher's functions directly
        out, last = hierkern.selective_scan(**x, delta_softplus=softplus, return_last_state=True, impl="cuda")
        leaves = [x[k] for k in ARGS if x[k] is not None]
        loss = (out.to(g.dtype) * g).sum() + (last * g_last).sum()
        return out, last, dict(zip([k for k in ARGS if x[k] is not None], torch.autograd.grad(loss, leaves)))
    args = [None if x[k] is None else x[k].detach() for k in ARGS]
    out, last = cuda_nvrtc.selective_scan_fwd(*args, softplus)
    grads = cuda_nvrtc.selective_scan_bwd(g, g_last, *args, softplus)
    return out, last, {k: gr for k, gr in zip(ARGS, grads) if x[k] is not None}


def reference(x, dtype, softplus, g, g_last):
    xr = cast_leaves(x, dtype)
    out, last = hierkern.selective_scan(**xr, delta_softplus=softplus, return_last_state=True, impl="reference")
    leaves = [xr[k] for k in ARGS if xr[k] is not None]
    loss = (out.to(g.dtype) * g).sum() + (last.to(g_last.dtype) * g_last).sum()
    return out, last, dict(zip([k for k in ARGS if xr[k] is not None], torch.autograd.grad(loss, leaves)))


def check(route, floor_ulps=64.0, **kw):
    x, softplus = make_inputs(**kw)
    x = to_cuda(x)
    b, d, l = x["u"].shape
    g = torch.randn(b, d, l, dtype=torch.float64, device="cuda")
    g_last = torch.randn(b, d, x["A"].shape[1], dtype=torch.float64, device="cuda")
    with poisoned_outputs():
        out, last, grads = run_route(route, x, softplus, g.to(x["u"].dtype), g_last.float())
    r64 = reference(x, torch.float64, softplus, g, g_last)
    rlow = reference(x, None, softplus, g.to(x["u"].dtype), g_last.float())
    assert out.dtype == x["u"].dtype and last.dtype == torch.float32
    assert_close_rel("out", out, r64[0], rlow[0], floor_ulps=floor_ulps)
    assert_close_rel("last_state", last, r64[1], rlow[1], floor_ulps=floor_ulps)
    assert set(grads) == set(r64[2])
    for k, got in grads.items():
        assert got.dtype == x[k].dtype and got.shape == x[k].shape, k
        assert_close_rel(f"d{k}", got, r64[2][k], rlow[2][k], floor_ulps=floor_ulps)


@route_param
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kind", ["fixed", "var", "grouped"])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_against_reference(route, kind, dtype, options):
    full = options == "all"
    check(route, B_kind=kind, dtype=dtype, D=full, z=full, bias=full, softplus=full, init=full)


# 1: a single step; 7, 33: one partial chunk of 32 threads; 1000: 125 threads' worth in a 128-thread
# chunk; 1025, 2500: several chunks of 1024 (the checkpointed backward), the last one partial.
@route_param
@pytest.mark.parametrize("l", [1, 7, 33, 1000, 1025, 2500])
def test_lengths(route, l):
    check(route, l=l, b=1, d=3)


@route_param
@pytest.mark.parametrize("option", ["D", "z", "bias", "softplus", "init"])
def test_each_option_alone(route, option):
    check(route, **{k: k == option for k in ("D", "z", "bias", "softplus", "init")})


@route_param
@pytest.mark.parametrize("B_kind,C_kind", [("var", "fixed"), ("fixed", "grouped"), ("grouped", "grouped"),
                                           ("grouped", "var")])
def test_mixed_B_C(route, B_kind, C_kind):
    check(route, B_kind=B_kind, C_kind=C_kind, d=8, C_groups=4)


@route_param
@pytest.mark.parametrize("n", [1, 16, 64, 256])
def test_state_sizes(route, n):
    check(route, b=1, d=3, n=n, l=1100)


@route_param
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["fixed", "var", "grouped"])
def test_non_contiguous(route, kind, dtype):
    # Transposed (b, l, d) buffers for u / delta / z, (b, l, n) for B / C: read in place by strides.
    check(route, B_kind=kind, dtype=dtype, strided=True, l=1030)


@route_param
def test_float32_B_C_with_bfloat16_u(route):
    x, softplus = make_inputs(dtype=torch.bfloat16, B_kind="grouped", C_kind="var")
    for k in ("B", "C"):
        x[k] = x[k].detach().float()
    x = to_cuda(x)
    b, d, l = x["u"].shape
    g = torch.randn(b, d, l, dtype=torch.float64, device="cuda")
    g_last = torch.randn(b, d, x["A"].shape[1], dtype=torch.float64, device="cuda")
    with poisoned_outputs():
        out, last, grads = run_route(route, x, softplus, g.bfloat16(), g_last.float())
    r64 = reference(x, torch.float64, softplus, g, g_last)
    rlow = reference(x, None, softplus, g.bfloat16(), g_last.float())
    assert grads["B"].dtype == grads["C"].dtype == torch.float32
    assert_close_rel("out", out, r64[0], rlow[0], floor_ulps=64.0)
    for k in ARGS:
        assert_close_rel(f"d{k}", grads[k], r64[2][k], rlow[2][k], floor_ulps=64.0)


@route_param
@pytest.mark.parametrize("kind", ["fixed", "var", "grouped"])
def test_continuation(route, kind):
    """Scanning in pieces, each from the previous piece's last state, equals scanning whole (to float32
    rounding: the chunk boundaries of the block scan fall elsewhere), forward and backward."""
    x, softplus = make_inputs(l=1500, B_kind=kind)
    x = to_cuda(x)
    cuts = (0, 5, 1030, 1031, 1500)
    g = torch.randn(2, 6, 1500, device="cuda")
    g_last = torch.randn(2, 6, 8, device="cuda")

    def piecewise(xx):
        outs, state = [], xx["initial_state"]
        for s, e in zip(cuts[:-1], cuts[1:]):
            piece = dict(xx)
            for k in ("u", "delta", "z"):
                piece[k] = xx[k][..., s:e]
            for k in ("B", "C"):
                if xx[k].dim() > 2:
                    piece[k] = xx[k][..., s:e]
            piece["initial_state"] = state
            o, state = hierkern.selective_scan(**piece, delta_softplus=softplus, return_last_state=True,
                                               impl="cuda" if route == "compiled" else "reference")
            outs.append(o)
        return torch.cat(outs, -1), state

    if route != "compiled":  # the NVRTC route is not the dispatcher's here: compare its whole-sequence run
        args = [None if x[k] is None else x[k].detach() for k in ARGS]
        whole = cuda_nvrtc.selective_scan_fwd(*args, softplus)
        parts = piecewise(cast_leaves(x, torch.float64))
        torch.testing.assert_close(whole[0].double(), parts[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(whole[1].double(), parts[1], rtol=1e-4, atol=1e-4)
        return
    with poisoned_outputs():
        parts = piecewise(x)
    whole = hierkern.selective_scan(**x, delta_softplus=softplus, return_last_state=True, impl="cuda")
    torch.testing.assert_close(parts[0], whole[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(parts[1], whole[1], rtol=1e-4, atol=1e-4)
    leaves = [x[k] for k in ARGS]
    gp = torch.autograd.grad((parts[0] * g).sum() + (parts[1] * g_last).sum(), leaves)
    gw = torch.autograd.grad((whole[0] * g).sum() + (whole[1] * g_last).sum(), leaves)
    for k, a, b in zip(ARGS, gp, gw):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"d{k}")


@pytest.mark.skipif("compiled" not in ROUTES and "nvrtc" not in ROUTES, reason="no CUDA kernel route")
def test_default_impl_on_cuda_is_the_cuda_kernel():
    x, softplus = make_inputs(l=9)
    x = to_cuda(x)
    with OpLog() as log:
        out = hierkern.selective_scan(**x, delta_softplus=softplus)
    assert any("hierkern.selective_scan_fwd" in op for op in log.ops), log.ops[:10]
    torch.testing.assert_close(out, hierkern.selective_scan(**x, delta_softplus=softplus, impl="cuda"))
    with pytest.raises(NotImplementedError, match="impl='triton' has no Triton kernel"):
        hierkern.selective_scan(**x, impl="triton")


@pytest.mark.skipif("compiled" not in ROUTES, reason="needs hierkern._C built with CUDA")
def test_opcheck_cuda():
    x, softplus = make_inputs(l=40, B_kind="grouped")
    x = to_cuda(x)
    args = tuple(x[k] for k in ARGS) + (softplus,)
    torch.library.opcheck(torch.ops.hierkern.selective_scan_fwd.default, args)
