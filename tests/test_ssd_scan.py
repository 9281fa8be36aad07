"""ssd_scan: the two reference forms against each other, the C++ CPU kernel against the float64
reference (forward and backward, every argument), continuation from a state, backend selection, bad
inputs and opcheck."""
import pytest
import torch

import hierkern
from hierkern import _backend
from hierkern.ops.scan import ssd_reference
from hierkern.testing import assert_close_rel, poisoned_outputs
from scan_helpers import OpLog, cast_leaves, check_broadcast_grad_out

pytestmark = pytest.mark.skipif(not _backend.has_compiled_ops(), reason="hierkern._C is not built")

ARGS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
SEQ = ("x", "dt", "B", "C", "z")  # the arguments with a seqlen dimension (dim 1)


def make_inputs(b=2, l=33, h=4, p=6, g=2, n=8, dtype=torch.float32, D="h", z=True, bias=True, softplus=True,
                init=True, strided=False):
    """Random inputs as a dict of leaves (requires_grad). D: None, "h" ((h,)) or "hp" ((h, p)).
    strided: x / z / dt / B / C transposed (b, heads or groups, l, ...) buffers, D a transposed
    buffer and initial_states a slice of a wider one; nothing is contiguous."""
    def seq(*tail, scale=1.0, shift=0.0):
        shape = (b, tail[0], l) + tail[1:] if strided else (b, l) + tail
        t = torch.randn(*shape) * scale + shift
        return (t.transpose(1, 2) if strided else t).to(dtype)

    x = {"x": seq(h, p), "B": seq(g, n), "C": seq(g, n)}
    # dt near 0.3 after bias / softplus and A in [-1.2, -0.2]: decays between 0.7 and 0.94 per step,
    # so the state carries information across tens of steps.
    x["dt"] = seq(h, scale=0.3, shift=-1.0) if softplus else seq(h, scale=0.05, shift=0.25).abs()
    x["A"] = -(0.2 + torch.rand(h))
    x["D"] = None if D is None else (torch.randn(h) if D == "h" else
                                     (torch.randn(p, h).t() if strided else torch.randn(h, p)))
    x["z"] = seq(h, p) if z else None
    x["dt_bias"] = (0.2 * torch.randn(h) if softplus else 0.05 * torch.rand(h)) if bias else None
    x["initial_states"] = ((torch.randn(b, h, p, n + 3)[..., :n] if strided else torch.randn(b, h, p, n))
                           if init else None)
    return {k: (v.requires_grad_() if v is not None else None) for k, v in x.items()}, softplus


def run(x, softplus, impl, g, g_fin, chunk_size=16):
    """out, final_states and the gradients of <out, g> + <final, g_fin> w.r.t. the present leaves."""
    out, fin = hierkern.ssd_scan(**x, chunk_size=chunk_size, dt_softplus=softplus, return_final_states=True,
                                 impl=impl)
    names = [k for k in ARGS if x[k] is not None]
    loss = (out.to(g.dtype) * g).sum() + (fin.to(g_fin.dtype) * g_fin).sum()
    return out, fin, dict(zip(names, torch.autograd.grad(loss, [x[k] for k in names])))


def check_case(chunk_size=16, **kw):
    x, softplus = make_inputs(**kw)
    b, _, h, p = x["x"].shape
    g = torch.randn(x["x"].shape, dtype=torch.float64)
    g_fin = torch.randn(b, h, p, x["B"].shape[3], dtype=torch.float64)
    with poisoned_outputs():
        out, fin, grads = run(x, softplus, "cpu", g.to(x["x"].dtype), g_fin.float(), chunk_size)
    r64 = run(cast_leaves(x, torch.float64), softplus, "reference", g, g_fin)
    rlow = run(cast_leaves(x, None), softplus, "reference", g.to(x["x"].dtype), g_fin.float())
    assert out.dtype == x["x"].dtype and fin.dtype == torch.float32
    assert_close_rel("out", out, r64[0], rlow[0])
    assert_close_rel("final_states", fin, r64[1], rlow[1])
    assert set(grads) == set(r64[2])
    for k, got in grads.items():
        assert got.dtype == x[k].dtype and got.shape == x[k].shape, k
        assert_close_rel(f"d{k}", got, r64[2][k], rlow[2][k])


# ---------------------------------------------------------------------------------------------
# reference: the sequential recurrence and the chunked SSD form
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("l", [1, 13, 40])
@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64])  # 3 and 8 do not divide 13 or 40; 64 > l
def test_reference_forms_agree(l, chunk_size):
    x, softplus = make_inputs(l=l, D="hp")
    x = cast_leaves(x, torch.float64)
    seq = ssd_reference.ssd_scan_sequential(**x, dt_softplus=softplus)
    chk = ssd_reference.ssd_scan_chunked(**x, chunk_size=chunk_size, dt_softplus=softplus)
    torch.testing.assert_close(chk, seq, rtol=1e-12, atol=1e-12)
    leaves = [x[k] for k in ARGS]
    gs = torch.autograd.grad(seq[0].sum() + seq[1].sum(), leaves)
    gc = torch.autograd.grad(chk[0].sum() + chk[1].sum(), leaves)
    torch.testing.assert_close(gc, gs, rtol=1e-10, atol=1e-10)


def test_reference_forms_agree_in_float32_plain():
    x, softplus = make_inputs(l=20, D=None, z=False, bias=False, softplus=False, init=False, g=1)
    x = cast_leaves(x, torch.float64)
    seq = ssd_reference.ssd_scan_sequential(**x, dt_softplus=softplus)[0]
    chk = ssd_reference.ssd_scan_chunked(**x, chunk_size=6, dt_softplus=softplus)[0]
    torch.testing.assert_close(chk, seq, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# the CPU kernel against the float64 reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("g", [1, 2, 4])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_against_reference(g, dtype, options):
    full = options == "all"
    check_case(g=g, dtype=dtype, D="hp" if full else None, z=full, bias=full, softplus=full, init=full)


@pytest.mark.parametrize("l", [1, 7, 65, 130])
def test_lengths(l):
    check_case(l=l, p=4, n=8)


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_chunk_sizes(chunk_size):
    check_case(chunk_size=chunk_size, l=23)


def test_chunk_size_does_not_change_the_forward():
    """Every step does the same float32 arithmetic whatever the blocking: bit-identical outputs."""
    x, softplus = make_inputs(l=30)
    x = {k: v.detach() if v is not None else None for k, v in x.items()}
    ref = hierkern.ssd_scan(**x, chunk_size=64, dt_softplus=softplus, return_final_states=True, impl="cpu")
    for q in (1, 7, 30, 1 << 40):  # a chunk far beyond the sequence must not size buffers by it
        got = hierkern.ssd_scan(**x, chunk_size=q, dt_softplus=softplus, return_final_states=True, impl="cpu")
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("option", ["D", "Dhp", "z", "bias", "softplus", "init"])
def test_each_option_alone(option):
    flags = {k: option == k for k in ("z", "bias", "softplus", "init")}
    check_case(D={"D": "h", "Dhp": "hp"}.get(option), **flags)


@pytest.mark.parametrize("n", [1, 5, 64, 72])  # 1, 5: the portable loops; 72: two register blocks (64 + 8)
def test_batch_one_and_state_sizes(n):
    check_case(b=1, h=2, g=1, p=3, n=n, l=19)


@pytest.mark.parametrize("threads", [1, 2])
def test_backward_tasks_with_several_heads(threads):
    """Few threads and many heads per group: a backward task runs several heads of a group into one
    dB / dC panel (1 thread, b=1, g=2, h=8: 2 heads per task)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_case(b=1, h=8, g=2, p=3, l=19)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_non_contiguous(dtype):
    check_case(dtype=dtype, strided=True, D="hp")


def test_float32_B_C_with_bfloat16_x():
    x, softplus = make_inputs(dtype=torch.bfloat16, l=17)
    for k in ("B", "C"):
        x[k] = x[k].detach().float().requires_grad_()
    out = hierkern.ssd_scan(**x, dt_softplus=softplus, impl="cpu")
    dB, dC = torch.autograd.grad(out.float().sum(), (x["B"], x["C"]))
    assert out.dtype == torch.bfloat16 and dB.dtype == dC.dtype == torch.float32
    refs = []
    for xr in (cast_leaves(x, torch.float64), cast_leaves(x, None)):
        o = hierkern.ssd_scan(**xr, dt_softplus=softplus, impl="reference")
        refs.append((o, *torch.autograd.grad(o.double().sum(), (xr["B"], xr["C"]))))
    for name, got, r64, rlow in zip(("out", "dB", "dC"), (out, dB, dC), *refs):
        assert_close_rel(name, got, r64, rlow)


def test_broadcast_grad_out():
    """out.sum().backward() hands the kernel an expanded (stride 0) grad_out."""
    x, softplus = make_inputs(l=17)
    check_broadcast_grad_out(hierkern.ssd_scan, x, ARGS, dt_softplus=softplus)


# ---------------------------------------------------------------------------------------------
# continuation
# ---------------------------------------------------------------------------------------------

def _piecewise(x, softplus, impl, cuts, chunk_size=16):
    """The scan run piece by piece over [cuts[i], cuts[i + 1]), each piece from the previous state."""
    outs, state = [], x["initial_states"]
    for s, e in zip(cuts[:-1], cuts[1:]):
        piece = {k: (v[:, s:e] if k in SEQ and v is not None else v) for k, v in x.items()}
        piece["initial_states"] = state
        o, state = hierkern.ssd_scan(**piece, chunk_size=chunk_size, dt_softplus=softplus,
                                     return_final_states=True, impl=impl)
        outs.append(o)
    return torch.cat(outs, dim=1), state


def test_continuation_cpu():
    x, softplus = make_inputs(l=70)
    cuts = (0, 5, 40, 41, 70)
    g, g_fin = torch.randn(x["x"].shape), torch.randn(2, 4, 6, 8)
    whole = hierkern.ssd_scan(**x, dt_softplus=softplus, return_final_states=True, impl="cpu")
    with poisoned_outputs():
        parts = _piecewise(x, softplus, "cpu", cuts)
    assert torch.equal(parts[0], whole[0]) and torch.equal(parts[1], whole[1])
    leaves = [x[k] for k in ARGS]
    grads = torch.autograd.grad((parts[0] * g).sum() + (parts[1] * g_fin).sum(), leaves)
    r64 = run(cast_leaves(x, torch.float64), softplus, "reference", g.double(), g_fin.double())[2]
    r32 = run(cast_leaves(x, None), softplus, "reference", g, g_fin)[2]
    for k, got in zip(ARGS, grads):
        assert_close_rel(f"pieces d{k}", got, r64[k], r32[k])


def test_continuation_reference():
    x, softplus = make_inputs(l=40)
    x = cast_leaves(x, torch.float64)
    cuts = (0, 1, 17, 40)
    whole = hierkern.ssd_scan(**x, dt_softplus=softplus, return_final_states=True, impl="reference")
    parts = _piecewise(x, softplus, "reference", cuts, chunk_size=8)
    torch.testing.assert_close(parts, whole)
    leaves = [x[k] for k in ARGS]
    gw = torch.autograd.grad(whole[0].sum() + whole[1].sum(), leaves)
    gp = torch.autograd.grad(parts[0].sum() + parts[1].sum(), leaves)
    torch.testing.assert_close(gp, gw)


def test_state_carry_matters():
    """Guards the continuation tests: dropping the carried state changes the result."""
    x, softplus = make_inputs(l=20, init=False)
    whole = hierkern.ssd_scan(**x, dt_softplus=softplus, impl="cpu")
    second = {k: (v[:, 10:] if v is not None and k in SEQ else v) for k, v in x.items()}
    fresh = hierkern.ssd_scan(**second, dt_softplus=softplus, impl="cpu")
    assert not torch.allclose(fresh, whole[:, 10:])


# ---------------------------------------------------------------------------------------------
# backend selection
# ---------------------------------------------------------------------------------------------

def test_default_impl_is_the_cpu_kernel():
    x, softplus = make_inputs(l=9)
    with OpLog() as log:
        hierkern.ssd_scan(**x, dt_softplus=softplus)
    assert any("hierkern.ssd_scan_fwd" in op for op in log.ops), log.ops[:10]
    with OpLog() as log:
        hierkern.ssd_scan(**x, dt_softplus=softplus, impl="reference")
    assert not any("hierkern" in op for op in log.ops)


# impl="triton" / "cuda" and the CUDA default: tests/test_ssd_scan_triton.py


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------

def _bad(**changes):
    x, _ = make_inputs(b=2, l=5, h=4, p=3, g=2, n=3)
    x = {k: v.detach() if v is not None else None for k, v in x.items()}
    impl = changes.pop("impl", "cpu")
    chunk_size = changes.pop("chunk_size", 4)
    x.update(changes)
    return lambda: hierkern.ssd_scan(**x, chunk_size=chunk_size, impl=impl)


@pytest.mark.parametrize("changes,exc,match", [
    (dict(x=torch.randn(2, 5, 4)), ValueError, "x must be 4-D"),
    (dict(dt=torch.randn(2, 6, 4)), ValueError, r"dt must have shape \(batch, seqlen, nheads\)"),
    (dict(dt=torch.randn(2, 5, 4, dtype=torch.float64)), TypeError, "dt has dtype"),
    (dict(A=torch.randn(4, dtype=torch.float16)), TypeError, "A must be torch.float32"),
    (dict(A=torch.randn(5)), ValueError, r"A must have shape \(nheads,\)"),
    (dict(A=torch.randn(4, 1)), ValueError, "A must be 1-D"),
    (dict(B=torch.randn(2, 5, 3, 3), C=torch.randn(2, 5, 3, 3)), ValueError, "B has 3 groups .* nheads = 4"),
    (dict(C=torch.randn(2, 5, 2, 4)), ValueError, r"C must have shape \(batch, seqlen, ngroups, dstate\)"),
    (dict(B=torch.randn(2, 4, 2, 3)), ValueError, r"B must have shape"),
    (dict(C=torch.randn(2, 5, 2)), ValueError, "C must be 4-D"),
    (dict(B=torch.randn(2, 5, 2, 3, dtype=torch.float64)), TypeError, "B has dtype"),
    (dict(D=torch.randn(5)), ValueError, r"D must have shape \(4,\) or \(4, 3\)"),
    (dict(D=torch.randn(4, dtype=torch.float16)), TypeError, "D must be torch.float32"),
    (dict(dt_bias=torch.randn(4, 1)), ValueError, "dt_bias must have shape"),
    (dict(z=torch.randn(2, 5, 4, 4)), ValueError, "z must match x's shape"),
    (dict(initial_states=torch.randn(2, 4, 3, 4)), ValueError, r"initial_states must have shape \(2, 4, 3, 3\)"),
    (dict(initial_states=torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)), TypeError,
     "initial_states must be torch.float32"),
    (dict(x=torch.randn(2, 5, 4, 3, dtype=torch.float64), dt=torch.randn(2, 5, 4, dtype=torch.float64)),
     TypeError, "A must be torch.float64"),
    (dict(x=torch.randn(2, 0, 4, 3), dt=torch.randn(2, 0, 4)), ValueError, "seqlen, nheads and headdim >= 1"),
    (dict(x=torch.randn(2, 5, 4, 3).int(), dt=torch.randn(2, 5, 4).int()), TypeError, "x has dtype torch.int32"),
    (dict(chunk_size=0), ValueError, "chunk_size must be a positive int, got 0"),
    (dict(chunk_size=16.0), ValueError, "chunk_size must be a positive int, got 16.0"),
    (dict(chunk_size=True), ValueError, "chunk_size must be a positive int"),
    (dict(impl="fast"), ValueError, "impl must be one of"),
    (dict(impl="cpu", x=torch.randn(2, 5, 4, 3, device="meta"), dt=torch.randn(2, 5, 4, device="meta")),
     ValueError, "has device"),
])
def test_bad_inputs(changes, exc, match):
    with pytest.raises(exc, match=match) as info:
        _bad(**changes)()
    assert str(info.value).startswith("ssd_scan: ")


def test_float64_needs_reference():
    x, softplus = make_inputs(l=4)
    x = cast_leaves(x, torch.float64)
    with pytest.raises(TypeError, match="float64 is supported by impl='reference' only"):
        hierkern.ssd_scan(**x, dt_softplus=softplus, impl="cpu")


def test_flags_must_be_bool():
    x, _ = make_inputs(l=4)
    with pytest.raises(TypeError, match="dt_softplus must be a bool"):
        hierkern.ssd_scan(**x, dt_softplus=1, impl="cpu")


def test_op_checks_its_inputs():
    """The C++ op checks what the Python wrapper checks, for callers of torch.ops.hierkern directly."""
    x, _ = make_inputs(l=5, h=4, p=3, g=2, n=3)
    args = [x[k].detach() if x[k] is not None else None for k in ARGS]
    bad_B = torch.randn(2, 5, 3, 3)  # 3 groups do not divide 4 heads
    with pytest.raises(RuntimeError, match="B must be .* divisible by ngroups"):
        torch.ops.hierkern.ssd_scan_fwd(*args[:3], bad_B, *args[4:], True, 4)
    with pytest.raises(RuntimeError, match="A must be a float32"):
        torch.ops.hierkern.ssd_scan_fwd(*args[:2], args[2].double(), *args[3:], True, 4)
    with pytest.raises(RuntimeError, match="chunk_size must be >= 1"):
        torch.ops.hierkern.ssd_scan_fwd(*args, True, 0)


# ---------------------------------------------------------------------------------------------
# opcheck and torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("full", [False, True])
def test_opcheck(full):
    x, softplus = make_inputs(l=11, h=4, p=3, g=2, n=5, D="hp" if full else None, z=full, bias=full, init=full)
    args = tuple(x[k] for k in ARGS) + (softplus, 4)
    torch.library.opcheck(torch.ops.hierkern.ssd_scan_fwd.default, args)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    out, fin = torch.ops.hierkern.ssd_scan_fwd(*detached)
    g_fin = torch.randn_like(fin) if full else None
    torch.library.opcheck(torch.ops.hierkern.ssd_scan_bwd.default, (torch.randn_like(out), g_fin) + detached)


def test_compiles_without_graph_break():
    x, softplus = make_inputs(l=12)
    x = {k: v.detach() if v is not None else None for k, v in x.items()}
    f = torch.compile(lambda x: hierkern.ssd_scan(**x, dt_softplus=softplus, impl="cpu"),
                      fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x), hierkern.ssd_scan(**x, dt_softplus=softplus, impl="cpu"))
