"""ssd_scan's Triton kernels (hierkern/ops/scan/ssd_triton.py) against the float64 reference, forward and
backward in every argument, under the interpreter here (TRITON_INTERPRET=1, set by conftest.py without a
GPU; 16-step chunks there, so the short sequences below span several chunks and end mid-chunk) and
compiled on a GPU: the variants of the issue (groups, D (h,) / (h, p), z, dt_bias / softplus, initial
states, l = 1, l not a multiple of the chunk, n = 1 and n = 64, headdim not a power of two and wider than
one backward column block), NaN-poisoned outputs and NaN beyond the sequence end, continuation, backend
selection and opcheck."""
import pytest
import torch

import hierkern
from hierkern import _backend
from hierkern.ops.scan import ssd_reference
from hierkern.testing import assert_close_rel, poisoned_outputs
from scan_helpers import OpLog, cast_leaves
from test_ssd_scan import ARGS, SEQ, make_inputs, run

pytestmark = [
    pytest.mark.skipif(not _backend.has_compiled_ops(), reason="hierkern._C is not built"),
    pytest.mark.skipif(not _backend.has_triton(), reason="needs triton"),
    pytest.mark.skipif(not torch.cuda.is_available() and not _backend.triton_interpreted(),
                       reason="needs a GPU or TRITON_INTERPRET=1"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def to_device(x):
    return {k: None if v is None else v.detach().to(DEVICE).requires_grad_() for k, v in x.items()}


def check_case(x, softplus, chunk_size=16, floor_ulps=32.0):
    """Triton (outputs NaN-poisoned) vs the float64 chunked reference, with the eager chunked reference
    in the inputs' dtype setting the tolerance; out, final_states and every gradient."""
    b, _, h, p = x["x"].shape
    g = torch.randn(x["x"].shape, dtype=torch.float64)
    g_fin = torch.randn(b, h, p, x["B"].shape[3], dtype=torch.float64)
    xd = to_device(x)
    with poisoned_outputs():
        out, fin, grads = run(xd, softplus, "triton", g.to(x["x"].dtype).to(DEVICE), g_fin.float().to(DEVICE),
                              chunk_size)
    r64 = run(cast_leaves(x, torch.float64), softplus, "reference", g, g_fin)
    rlow = run(cast_leaves(x, None), softplus, "reference", g.to(x["x"].dtype), g_fin.float())
    assert out.dtype == x["x"].dtype and fin.dtype == torch.float32
    assert_close_rel("out", out.cpu(), r64[0], rlow[0], floor_ulps=floor_ulps)
    assert_close_rel("final_states", fin.cpu(), r64[1], rlow[1], floor_ulps=floor_ulps)
    assert set(grads) == set(r64[2])
    for k, got in grads.items():
        assert got.dtype == x[k].dtype and got.shape == x[k].shape, k
        assert_close_rel(f"d{k}", got.cpu(), r64[2][k], rlow[2][k], floor_ulps=floor_ulps)


CASES = {
    "full": dict(),                                                        # D (h,), z, bias, softplus, init
    "bare": dict(D=None, z=False, bias=False, softplus=False, init=False),
    "D_hp_no_z": dict(D="hp", z=False, init=False),
    "l1": dict(l=1, b=1),
    "l16_chunk_aligned": dict(l=16, g=1),
    "n1": dict(n=1, l=20),
    "n64": dict(n=64, l=18, h=2, g=1, p=4),
    "p20_gqa4": dict(p=20, h=4, g=1, l=19),                                # 2 backward column blocks
    "strided": dict(strided=True, D="hp"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(case):
    kw = dict(dict(b=2, l=37, h=4, p=6, g=2, n=8), **CASES[case])
    check_case(*make_inputs(**kw))


def test_matches_reference_fp16(monkeypatch):
    """The kernels take float16 operands in their products (float32 accumulation and state); the
    reference computes in float32 for float16 inputs, so the eager error the tolerance is made of is the
    chunked reference's computed in float16 throughout (the same computation done eagerly in the
    kernels' dtype); the float64 reference is unchanged."""
    prepare = ssd_reference._prepare

    def prepare_in_inputs_dtype(x, *args):
        out = prepare(x, *args)
        return tuple(t.to(x.dtype) for t in out) if x.dtype != torch.float64 else out

    monkeypatch.setattr(ssd_reference, "_prepare", prepare_in_inputs_dtype)
    # Floor: one float16 ulp of each result's magnitude (2^-10 = 8192 float32 ulps), the rounding of a
    # float16 output (dB / dC / dx / out) or product operand by itself.
    check_case(*make_inputs(b=1, l=21, h=2, p=5, g=1, n=4, dtype=torch.float16, D="hp"), floor_ulps=8192.0)


def test_nan_beyond_the_sequence_is_never_read():
    """Every sequence input (and grad_out) is a view of a buffer whose steps after seqlen are NaN: a
    kernel that reads the padded tail of its last chunk unmasked (or lets softplus(dt_bias) in there
    reach the state) turns the result NaN."""
    x, softplus = make_inputs(b=1, l=21, h=2, p=5, g=1, n=4)
    xd = to_device(x)
    pad = {}
    for k in SEQ:
        buf = torch.full((xd[k].shape[0], 32) + tuple(xd[k].shape[2:]), float("nan"), device=DEVICE,
                         dtype=xd[k].dtype)
        buf[:, :21] = xd[k].detach()
        pad[k] = buf[:, :21].requires_grad_()
    xd.update(pad)
    g = torch.full((1, 32, 2, 5), float("nan"), device=DEVICE)
    g[:, :21] = torch.randn(1, 21, 2, 5)
    out, fin, grads = run(xd, softplus, "triton", g[:, :21], torch.randn(1, 2, 5, 4, device=DEVICE))
    ref = run(cast_leaves(x, torch.float64), softplus, "reference", g[:, :21].double().cpu(),
              torch.zeros(1, 2, 5, 4, dtype=torch.float64))
    assert not torch.isnan(out).any() and not torch.isnan(fin).any()
    for k, v in grads.items():
        assert not torch.isnan(v).any(), f"d{k} has NaN"
    torch.testing.assert_close(out.double().cpu(), ref[0], rtol=1e-4, atol=1e-4)


def test_continuation_equals_whole():
    """Scanning in pieces (each from the previous piece's final states, cuts mid-chunk) equals scanning
    whole: outputs, final states and the gradients through the chain of states."""
    x, softplus = make_inputs(b=2, l=37, h=4, p=6, g=2, n=8)
    xd = to_device(x)
    g = torch.randn(xd["x"].shape, device=DEVICE)
    kw = {k: xd[k] for k in ("A", "D", "dt_bias")}
    whole, fin_whole = hierkern.ssd_scan(**{k: xd[k] for k in ARGS}, dt_softplus=softplus,
                                         return_final_states=True, impl="triton")
    state, outs = xd["initial_states"], []
    for lo, hi in ((0, 5), (5, 23), (23, 37)):
        piece = {k: xd[k][:, lo:hi] for k in SEQ}
        o, state = hierkern.ssd_scan(**piece, **kw, initial_states=state, dt_softplus=softplus,
                                     return_final_states=True, impl="triton")
        outs.append(o)
    pieces = torch.cat(outs, 1)
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, fin_whole, rtol=1e-5, atol=1e-5)
    leaves = [xd[k] for k in ARGS]
    g_whole = torch.autograd.grad((whole * g).sum() + fin_whole.sum(), leaves)
    g_pieces = torch.autograd.grad((pieces * g).sum() + state.sum(), leaves)
    for k, a, b in zip(ARGS, g_pieces, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"d{k}")


# ---------------------------------------------------------------------------------------------
# backend selection and limits
# ---------------------------------------------------------------------------------------------

def test_triton_impl_runs_the_triton_op():
    x, softplus = make_inputs(l=9)
    x = to_device(x)
    with OpLog() as log:
        hierkern.ssd_scan(**x, dt_softplus=softplus, impl="triton")
    assert any("hierkern.ssd_scan_fwd_triton" in op for op in log.ops), log.ops[:10]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_default_impl_on_cuda_is_triton_and_cuda_is_refused():
    x, softplus = make_inputs(l=4)
    x = to_device(x)
    with OpLog() as log:
        hierkern.ssd_scan(**x, dt_softplus=softplus)
    assert any("hierkern.ssd_scan_fwd_triton" in op for op in log.ops), log.ops[:10]
    with pytest.raises(NotImplementedError, match="ssd_scan: there is no CUDA C\\+\\+ kernel"):
        hierkern.ssd_scan(**x, impl="cuda")


def test_cuda_impl_on_cpu_tensors_is_refused():
    x, _ = make_inputs(l=4)
    with pytest.raises(ValueError, match="ssd_scan: impl='cuda' needs CUDA tensors"):
        hierkern.ssd_scan(**x, impl="cuda")


def test_wide_state_is_refused_by_triton():
    x, _ = make_inputs(l=3, p=130, n=2)
    with pytest.raises(NotImplementedError, match="ssd_scan: impl='triton' supports headdim and dstate up to 128"):
        hierkern.ssd_scan(**to_device(x), impl="triton")


@pytest.mark.parametrize("full", [False, True])
def test_opcheck(full):
    x, softplus = make_inputs(l=11, h=4, p=3, g=2, n=5, D="hp" if full else None, z=full, bias=full, init=full)
    x = to_device(x)
    args = tuple(x[k] for k in ARGS) + (softplus, 4)
    torch.library.opcheck(torch.ops.hierkern.ssd_scan_fwd_triton.default, args)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    out, fin = torch.ops.hierkern.ssd_scan_fwd_triton(*detached)
    g_fin = torch.randn_like(fin) if full else None
    torch.library.opcheck(torch.ops.hierkern.ssd_scan_bwd_triton.default, (torch.randn_like(out), g_fin) + detached)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels only (needs a GPU)")
def test_no_recompile_when_length_changes():
    """seqlen and the chunk count are not specialised: M-VAR's scale-by-scale calls (1, 4, 9, ... new
    tokens) reuse one compiled kernel per configuration."""
    from hierkern.ops.scan import ssd_triton as tk
    kernels = [tk._chunk_state_kernel, tk._state_pass_kernel, tk._chunk_out_kernel, tk._dstate_local_kernel,
               tk._dstate_pass_kernel, tk._chunk_bwd_kernel, tk._chunk_bwd_bc_kernel]

    def variants():
        caches = [getattr(k, "device_caches", None) for k in kernels]
        if any(c is None for c in caches):
            pytest.skip("this triton version does not expose JITFunction.device_caches")
        return [sum(len(entry[0]) for entry in c.values()) for c in caches]

    counts = None
    for l in (130, 37, 1, 64):
        x, softplus = make_inputs(b=1, l=l, h=4, p=64, g=1, n=64, dtype=torch.bfloat16)
        x = to_device(x)
        out, fin = hierkern.ssd_scan(**x, dt_softplus=softplus, return_final_states=True, impl="triton")
        (out.float().sum() + fin.sum()).backward()
        now = variants()
        if counts is None:
            counts = now
        assert now == counts, f"recompiled at l={l}: {now} vs {counts}"
