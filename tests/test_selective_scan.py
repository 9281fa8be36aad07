"""selective_scan: the C++ CPU kernel against the float64 reference (forward and backward, every
argument), continuation from a state, backend selection, bad inputs and opcheck."""
import os
import subprocess
import sys

import pytest
import torch

import hierkern
from hierkern import _backend
from hierkern.testing import assert_close_rel, poisoned_outputs
from scan_helpers import OpLog, cast_leaves, check_broadcast_grad_out

pytestmark = pytest.mark.skipif(not _backend.has_compiled_ops(), reason="hierkern._C is not built")

ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(b=2, d=6, l=33, n=8, dtype=torch.float32, B_kind="var", C_kind=None, D=True, z=True,
                bias=True, softplus=True, init=True, strided=False, groups=2, C_groups=None):
    """Random inputs as a dict of leaves (requires_grad) in the kernel's dtypes. B_kind / C_kind:
    "fixed" (d, n), "var" (b, n, l) or "grouped" (b, g, n, l). strided: every (b, d, l) tensor a
    transposed (b, l, d) buffer, B / C transposed (b, [g,] l, n) buffers, A a transposed (n, d)
    buffer, initial_state a slice of a wider buffer; nothing is contiguous."""
    C_kind = C_kind or B_kind

    def bdl(scale=1.0, shift=0.0):
        if strided:
            t = torch.randn(b, l, d).transpose(1, 2)
        else:
            t = torch.randn(b, d, l)
        return (t * scale + shift).to(dtype)

    def bc(kind, g):
        if kind == "fixed":
            return torch.randn(d, n)
        shape = (b, n, l) if kind == "var" else (b, g, n, l)
        if strided:
            return torch.randn(*shape[:-2], l, n).transpose(-1, -2).to(dtype)
        return torch.randn(*shape).to(dtype)

    # delta near 0.3 after bias / softplus, and A in [-2.2, -0.2]: decays between 0.5 and 0.94 per
    # step, so the state carries information across tens of steps.
    x = {"u": bdl(), "delta": bdl(0.3, -1.0) if softplus else bdl(0.05, 0.25).abs()}
    x["A"] = -(0.2 + 2 * torch.rand(n, d)).t() if strided else -(0.2 + 2 * torch.rand(d, n))
    x["B"], x["C"] = bc(B_kind, groups), bc(C_kind, C_groups or groups)
    x["D"] = torch.randn(d) if D else None
    x["z"] = bdl() if z else None
    x["delta_bias"] = (0.2 * torch.randn(d) if softplus else 0.05 * torch.rand(d)) if bias else None
    x["initial_state"] = (torch.randn(b, d, n + 3)[..., :n] if strided else torch.randn(b, d, n)) if init else None
    return {k: (v.requires_grad_() if v is not None else None) for k, v in x.items()}, softplus


def run(x, softplus, impl, g, g_last):
    """out, last_state and the gradients of <out, g> + <last_state, g_last> w.r.t. the present leaves."""
    out, last = hierkern.selective_scan(**x, delta_softplus=softplus, return_last_state=True, impl=impl)
    leaves = [x[k] for k in ARGS if x[k] is not None]
    loss = (out.to(g.dtype) * g).sum() + (last.to(g_last.dtype) * g_last).sum()
    return out, last, dict(zip([k for k in ARGS if x[k] is not None], torch.autograd.grad(loss, leaves)))


def check_case(floor_ulps=32.0, **kw):
    check_inputs(*make_inputs(**kw), floor_ulps=floor_ulps)


def check_inputs(x, softplus, floor_ulps=32.0):
    b, d, l = x["u"].shape
    g = torch.randn(b, d, l, dtype=torch.float64)
    g_last = torch.randn(b, d, x["A"].shape[1], dtype=torch.float64)
    with poisoned_outputs():
        out, last, grads = run(x, softplus, "cpu", g.to(x["u"].dtype), g_last.float())
    r64 = run(cast_leaves(x, torch.float64), softplus, "reference", g, g_last)
    rlow = run(cast_leaves(x, None), softplus, "reference", g.to(x["u"].dtype), g_last.float())
    assert out.dtype == x["u"].dtype and last.dtype == torch.float32
    assert_close_rel("out", out, r64[0], rlow[0], floor_ulps=floor_ulps)
    assert_close_rel("last_state", last, r64[1], rlow[1], floor_ulps=floor_ulps)
    assert set(grads) == set(r64[2])
    for k, got in grads.items():
        assert got.dtype == x[k].dtype and got.shape == x[k].shape, k
        assert_close_rel(f"d{k}", got, r64[2][k], rlow[2][k], floor_ulps=floor_ulps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["fixed", "var", "grouped"])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_against_reference(kind, dtype, options):
    full = options == "all"
    check_case(B_kind=kind, dtype=dtype, D=full, z=full, bias=full, softplus=full, init=full)


@pytest.mark.parametrize("l", [1, 7, 33, 130])
def test_lengths(l):
    check_case(l=l)


@pytest.mark.parametrize("option", ["D", "z", "bias", "softplus", "init"])
def test_each_option_alone(option):
    flags = {k: k == option for k in ("D", "z", "bias", "softplus", "init")}
    check_case(**flags)


@pytest.mark.parametrize("B_kind,C_kind", [("var", "fixed"), ("fixed", "grouped"), ("grouped", "grouped"),
                                           ("grouped", "var")])
def test_mixed_B_C(B_kind, C_kind):
    # ("grouped", "grouped") gives B 2 groups and C 4: the backward's channel chunks must respect both.
    check_case(B_kind=B_kind, C_kind=C_kind, d=8, C_groups=4)


@pytest.mark.parametrize("n", [1, 5, 64])  # n % 8 != 0: the portable (non-AVX2) step loops
def test_batch_one_and_state_sizes(n):
    check_case(b=1, d=3, n=n, l=19)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kind", ["var", "grouped"])
def test_non_contiguous(kind, dtype):
    check_case(B_kind=kind, dtype=dtype, strided=True)


def test_float32_B_C_with_bfloat16_u():
    """mamba-ssm keeps B / C in float32 under bf16 autocast in places: B / C may be float32 while u is
    bfloat16; their gradients come back in float32."""
    x, softplus = make_inputs(dtype=torch.bfloat16, B_kind="grouped", C_kind="var")
    for k in ("B", "C"):
        x[k] = x[k].detach().float().requires_grad_()
    out = hierkern.selective_scan(**x, delta_softplus=softplus, impl="cpu")
    dB, dC = torch.autograd.grad(out.float().sum(), (x["B"], x["C"]))
    assert out.dtype == torch.bfloat16 and dB.dtype == dC.dtype == torch.float32
    x64 = cast_leaves(x, torch.float64)
    x_low = cast_leaves(x, None)
    refs = []
    for xr in (x64, x_low):
        o = hierkern.selective_scan(**xr, delta_softplus=softplus, impl="reference")
        refs.append((o, *torch.autograd.grad(o.double().sum(), (xr["B"], xr["C"]))))
    for name, got, r64, rlow in zip(("out", "dB", "dC"), (out, dB, dC), *refs):
        assert_close_rel(name, got, r64, rlow)


def test_broadcast_grad_out():
    """out.sum().backward() hands the kernel an expanded (stride 0) grad_out."""
    x, softplus = make_inputs(l=17)
    check_broadcast_grad_out(hierkern.selective_scan, x, ARGS, delta_softplus=softplus)


def test_checkpointed_backward():
    """l * n beyond the states one backward task keeps (65536 floats: 256 steps at n = 256, mamba's
    largest dstate): the backward recomputes each chunk of steps from a checkpoint taken by a first
    forward sweep."""
    check_case(b=1, d=2, n=256, l=300, D=False, z=False)


@pytest.mark.parametrize("kind,d,n,dtype,strided", [
    ("var", 19, 16, torch.float32, False),    # 16 lanes: one 16-channel tile (8: two), then 3 channels
    ("var", 27, 16, torch.float32, False),    # 16 lanes: a 16-channel tile, an 8-channel one, 3 channels
    ("fixed", 19, 5, torch.float32, True),    # n % 4 != 0: the state loop's tail
    ("grouped", 16, 16, torch.bfloat16, True),  # 8 channels per group: 8-channel tiles at either width
    ("grouped", 32, 16, torch.float32, False),  # 16 channels per group: 16-channel tiles
    ("var", 8, 1, torch.float16, False),
])
def test_channel_tiles(kind, d, n, dtype, strided):
    """The forward runs 16 channels per tile, one per AVX-512 lane (8 per AVX2 lane tile where 16 do
    not share a group of B and C, or with HIERKERN_CPU_SCAN_LANES=8), and the rest one channel at a
    time."""
    check_case(b=2, d=d, n=n, l=37, B_kind=kind, dtype=dtype, strided=strided)


@pytest.mark.parametrize("B_kind,C_kind", [("var", "fixed"), ("fixed", "var"), ("fixed", "fixed")])
def test_channel_tiles_sixteen_states(B_kind, C_kind):
    # n = 16 tiles keep their states in registers where the CPU has 32 vector registers (AVX-512VL),
    # a separate instantiation for each mix of fixed and variable B and C
    check_case(b=2, d=16, n=16, l=37, B_kind=B_kind, C_kind=C_kind)


@pytest.mark.parametrize("l", [134, 530])
def test_channel_tiles_over_time_blocks(l):
    # tiles across 64-step blocks (8 x 8 transposed loads and stores, then a 6- or 2-step tail), with
    # u, delta and z contiguous in time but at three different channel strides; l = 530 crosses the
    # 512-step unit of a tile's input prefetch (kStage) into a short last one
    x, softplus = make_inputs(b=1, d=16, n=16, l=l, B_kind="var")
    for name, pad in (("delta", 5), ("z", 12)):
        wide = torch.randn(1, 16, l + pad)
        wide[..., :l] = x[name].detach()
        x[name] = wide[..., :l].requires_grad_()
    assert len({x[k].stride(1) for k in ("u", "delta", "z")}) == 3
    check_inputs(x, softplus)


def test_channel_tiles_exp_out_of_range():
    # A tile's exp(dt * A) = 2^(dt * A log2 e) skips its range handling on steps whose exponents all
    # lie in [-125, 127] (dt * A in about [-86.6, 88]); steps with a huge dt put some of a tile's
    # products below (exp exactly 0, the state forgets) and some not, in one channel only or across
    # the tile.
    x, softplus = make_inputs(b=1, d=16, n=16, l=40, B_kind="var")
    with torch.no_grad():
        x["delta"][0, 3, 9] = 120.0      # dt * A in [-264, -24]: mixed within the channel
        x["delta"][0, :8, 21] = 400.0    # every channel of the first tile out of range
        x["delta"][0, 12, 30] = 45.0     # dt * A in [-99, -9]
        x["delta"][0, :, 33] = 400.0     # every channel of a 16-channel tile
    check_inputs(x, softplus)


AVX512 = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                            reason="16-lane tiles need AVX-512 (the build targets the build machine)")
HERE = os.path.dirname(os.path.abspath(__file__))


def _python(args, **env):
    """`python *args` from the repository root with `env` added to the environment."""
    return subprocess.run([sys.executable, *args], env=dict(os.environ, **env), capture_output=True,
                          text=True, timeout=600, cwd=os.path.dirname(HERE))


@AVX512
def test_narrow_tiles_forced():
    """The tile tests again with HIERKERN_CPU_SCAN_LANES=8 (the 8-lane tiles AVX2-only builds use)."""
    r = _python(["-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "channel_tiles or continuation_cpu"],
                HIERKERN_CPU_SCAN_LANES="8")
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


@AVX512
def test_tile_widths_agree_bit_for_bit(tmp_path):
    """16- and 8-channel tiles run the same float32 operations per lane and sum y in the same order."""
    code = f"""
import torch, hierkern
torch.manual_seed(0)
b, d, l, n = 2, 48, 150, 16
x = dict(u=torch.randn(b, d, l), delta=0.5 * torch.randn(b, d, l), A=-(0.2 + 2 * torch.rand(d, n)),
         B=torch.randn(b, n, l), C=torch.randn(b, 3, n, l), D=torch.randn(d), z=torch.randn(b, d, l),
         delta_bias=0.2 * torch.randn(d), initial_state=torch.randn(b, d, n))
out, last = hierkern.selective_scan(**x, delta_softplus=True, return_last_state=True, impl="cpu")
torch.save((out, last), r"{tmp_path}/" + __import__("os").environ["HIERKERN_CPU_SCAN_LANES"] + ".pt")
"""
    for lanes in ("8", "16"):
        r = _python(["-c", code], HIERKERN_CPU_SCAN_LANES=lanes)
        assert r.returncode == 0, r.stderr[-3000:]
    narrow, wide = torch.load(tmp_path / "8.pt"), torch.load(tmp_path / "16.pt")
    for a, c in zip(narrow, wide):
        assert torch.equal(a, c)


@AVX512
def test_bad_tile_width_is_named():
    code = "import torch, hierkern; x = torch.randn(1, 16, 5); hierkern.selective_scan(x, x, -torch.ones(16, 4), " \
           "torch.randn(16, 4), torch.randn(16, 4), impl='cpu')"
    r = _python(["-c", code], HIERKERN_CPU_SCAN_LANES="12")
    assert r.returncode != 0 and "HIERKERN_CPU_SCAN_LANES must be 8 or 16, got '12'" in r.stderr, r.stderr[-3000:]


def test_many_channels_split_into_chunks():
    # Enough channels for several backward tasks per group, so partial dB / dC panels are reduced.
    check_case(b=2, d=64, n=16, l=21, B_kind="grouped")


# ---------------------------------------------------------------------------------------------
# continuation
# ---------------------------------------------------------------------------------------------

def _piecewise(x, softplus, impl, cuts):
    """The scan run piece by piece over [cuts[i], cuts[i + 1]), each piece from the previous state."""
    outs, state = [], x["initial_state"]
    for s, e in zip(cuts[:-1], cuts[1:]):
        piece = {k: (v[..., s:e] if k in ("u", "delta", "z") and v is not None else v) for k, v in x.items()}
        for k in ("B", "C"):
            if x[k].dim() > 2:
                piece[k] = x[k][..., s:e]
        piece["initial_state"] = state
        o, state = hierkern.selective_scan(**piece, delta_softplus=softplus, return_last_state=True, impl=impl)
        outs.append(o)
    return torch.cat(outs, dim=-1), state


@pytest.mark.parametrize("kind,d", [("fixed", 6), ("var", 6), ("grouped", 6), ("var", 19), ("grouped", 16)])
def test_continuation_cpu(kind, d):
    x, softplus = make_inputs(l=70, d=d, B_kind=kind)
    cuts = (0, 5, 40, 41, 70)
    g, g_last = torch.randn(2, d, 70), torch.randn(2, d, 8)
    whole = hierkern.selective_scan(**x, delta_softplus=softplus, return_last_state=True, impl="cpu")
    with poisoned_outputs():
        parts = _piecewise(x, softplus, "cpu", cuts)
    # Every step does the same float32 arithmetic whichever piece it is in: bit-identical.
    assert torch.equal(parts[0], whole[0]) and torch.equal(parts[1], whole[1])
    leaves = [x[k] for k in ARGS]
    grads = torch.autograd.grad((parts[0] * g).sum() + (parts[1] * g_last).sum(), leaves)
    x64 = cast_leaves(x, torch.float64)
    x32 = cast_leaves(x, None)
    r64 = run(x64, softplus, "reference", g.double(), g_last.double())[2]
    r32 = run(x32, softplus, "reference", g, g_last)[2]
    for k, got in zip(ARGS, grads):
        assert_close_rel(f"pieces d{k}", got, r64[k], r32[k])


def test_continuation_reference():
    x, softplus = make_inputs(l=40, B_kind="grouped")
    x = cast_leaves(x, torch.float64)
    cuts = (0, 1, 17, 40)
    whole = hierkern.selective_scan(**x, delta_softplus=softplus, return_last_state=True, impl="reference")
    parts = _piecewise(x, softplus, "reference", cuts)
    torch.testing.assert_close(parts, whole)
    leaves = [x[k] for k in ARGS]
    gw = torch.autograd.grad(whole[0].sum() + whole[1].sum(), leaves)
    gp = torch.autograd.grad(parts[0].sum() + parts[1].sum(), leaves)
    torch.testing.assert_close(gp, gw)


def test_state_carry_matters():
    """Guards the continuation tests: dropping the carried state changes the result."""
    x, softplus = make_inputs(l=20, init=False)
    whole = hierkern.selective_scan(**x, delta_softplus=softplus, impl="cpu")
    second = {k: (v[..., 10:] if v is not None and k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}
    fresh = hierkern.selective_scan(**second, delta_softplus=softplus, impl="cpu")
    assert not torch.allclose(fresh, whole[..., 10:])


# ---------------------------------------------------------------------------------------------
# backend selection
# ---------------------------------------------------------------------------------------------

def test_default_impl_is_the_cpu_kernel():
    x, softplus = make_inputs(l=9)
    with OpLog() as log:
        hierkern.selective_scan(**x, delta_softplus=softplus)
    assert any("hierkern.selective_scan_fwd" in op for op in log.ops), log.ops[:10]
    with OpLog() as log:
        hierkern.selective_scan(**x, delta_softplus=softplus, impl="reference")
    assert not any("hierkern" in op for op in log.ops)


def test_triton_is_refused():
    # There is no Triton selective scan: the GPU backend is CUDA C++ (tests/test_selective_scan_cuda.py).
    x, _ = make_inputs(l=4)
    with pytest.raises(NotImplementedError, match=r"selective_scan: impl='triton' has no Triton kernel"):
        hierkern.selective_scan(**x, impl="triton")


def test_cuda_impl_needs_cuda_tensors():
    x, _ = make_inputs(l=4)
    with pytest.raises(ValueError, match=r"selective_scan: impl='cuda' needs CUDA tensors"):
        hierkern.selective_scan(**x, impl="cuda")


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------

def _bad(**changes):
    x, _ = make_inputs(l=5, d=4, n=3)
    x = {k: v.detach() if v is not None else None for k, v in x.items()}
    impl = changes.pop("impl", "cpu")
    x.update(changes)
    return lambda: hierkern.selective_scan(**x, impl=impl)


@pytest.mark.parametrize("changes,exc,match", [
    (dict(u=torch.randn(2, 4)), ValueError, "u must be 3-D"),
    (dict(delta=torch.randn(2, 4, 6)), ValueError, "delta must have u's shape"),
    (dict(delta=torch.randn(2, 4, 5, dtype=torch.float64)), TypeError, "delta has dtype"),
    (dict(A=torch.randn(4, 3, dtype=torch.float16)), TypeError, "A must be torch.float32"),
    (dict(A=torch.randn(5, 3)), ValueError, r"A must be \(dim, dstate\)"),
    (dict(A=torch.randn(4)), ValueError, "A must be 2-D"),
    (dict(B=torch.randn(2, 3, 3, 5)), ValueError, "B has 3 groups .* does not divide dim = 4"),
    (dict(C=torch.randn(2, 3, 6)), ValueError, r"variable \(batch, dstate, seqlen\) C must have shape"),
    (dict(B=torch.randn(4, 2)), ValueError, "time-invariant .* B must have shape"),
    (dict(B=torch.randn(2, 3)), ValueError, "time-invariant .* B must have shape"),
    (dict(C=torch.randn(1, 2, 2, 3, 5)), ValueError, "C must be 2-D"),
    (dict(B=torch.randn(2, 3, 5, dtype=torch.float64)), TypeError, "B has dtype"),
    (dict(D=torch.randn(5)), ValueError, r"D must have shape \(4,\)"),
    (dict(D=torch.randn(4, dtype=torch.float16)), TypeError, "D must be torch.float32"),
    (dict(delta_bias=torch.randn(4, 1)), ValueError, "delta_bias must have shape"),
    (dict(z=torch.randn(2, 4, 4)), ValueError, "z must match u's shape"),
    (dict(initial_state=torch.randn(2, 4, 4)), ValueError, r"initial_state must have shape \(2, 4, 3\)"),
    (dict(initial_state=torch.randn(2, 4, 3, dtype=torch.bfloat16)), TypeError,
     "initial_state must be torch.float32"),
    (dict(u=torch.randn(2, 4, 5, dtype=torch.float64), delta=torch.randn(2, 4, 5, dtype=torch.float64)),
     TypeError, "A must be torch.float64"),
    (dict(u=torch.randn(2, 4, 0), delta=torch.randn(2, 4, 0)), ValueError, "seqlen >= 1"),
    (dict(u=torch.randn(2, 4, 5).int(), delta=torch.randn(2, 4, 5).int()), TypeError, "u has dtype torch.int32"),
    (dict(impl="fast"), ValueError, "impl must be one of"),
    (dict(impl="cpu", u=torch.randn(2, 4, 5, device="meta"), delta=torch.randn(2, 4, 5, device="meta")),
     ValueError, "has device"),
])
def test_bad_inputs(changes, exc, match):
    with pytest.raises(exc, match=match) as info:
        _bad(**changes)()
    assert str(info.value).startswith("selective_scan: ")


def test_float64_needs_reference():
    x, softplus = make_inputs(l=4)
    x = cast_leaves(x, torch.float64)
    with pytest.raises(TypeError, match="float64 is supported by impl='reference' only"):
        hierkern.selective_scan(**x, delta_softplus=softplus, impl="cpu")


def test_flags_must_be_bool():
    with pytest.raises(TypeError, match="delta_softplus must be a bool"):
        x, _ = make_inputs(l=4)
        hierkern.selective_scan(**x, delta_softplus=1, impl="cpu")


def test_op_checks_its_inputs():
    """The C++ op checks what the Python wrapper checks, for callers of torch.ops.hierkern directly."""
    x, _ = make_inputs(l=5, d=4, n=3, B_kind="grouped")
    args = [x[k].detach() if x[k] is not None else None for k in ARGS]
    bad_B = torch.randn(2, 3, 3, 5)  # 3 groups do not divide 4 channels
    with pytest.raises(RuntimeError, match="grouped B must be"):
        torch.ops.hierkern.selective_scan_fwd(*args[:3], bad_B, *args[4:], True)
    with pytest.raises(RuntimeError, match="A must be a float32"):
        torch.ops.hierkern.selective_scan_fwd(*args[:2], args[2].double(), *args[3:], True)


# ---------------------------------------------------------------------------------------------
# opcheck and torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,full", [("fixed", False), ("var", True), ("grouped", True)])
def test_opcheck(kind, full):
    x, softplus = make_inputs(l=11, d=4, n=5, B_kind=kind, D=full, z=full, bias=full, init=full)
    args = tuple(x[k] for k in ARGS) + (softplus,)
    torch.library.opcheck(torch.ops.hierkern.selective_scan_fwd.default, args)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    out, last = torch.ops.hierkern.selective_scan_fwd(*detached)
    g_last = torch.randn_like(last) if full else None
    torch.library.opcheck(torch.ops.hierkern.selective_scan_bwd.default,
                          (torch.randn_like(out), g_last) + detached)


def test_compiles_without_graph_break():
    x, softplus = make_inputs(l=12)
    x = {k: v.detach() if v is not None else None for k, v in x.items()}
    f = torch.compile(lambda x: hierkern.selective_scan(**x, delta_softplus=softplus, impl="cpu"),
                      fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x), hierkern.selective_scan(**x, delta_softplus=softplus, impl="cpu"))
