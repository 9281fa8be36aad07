"""hierkern.axial_attention: every kernel backend against the float64 reference, forward and backward
(dq, dk, dv) with poisoned outputs, both axes, causal and not, non-square and one-pixel-wide images,
GQA, strided views (no copies), opcheck."""
import pytest
import torch

import hierkern
from hierkern.ops.axial.op import axial_attention_op
from hierkern.testing import assert_close_rel, kernel_backends, poisoned_outputs

BACKENDS = [b for b in kernel_backends() if b[0] in ("cpu", "triton")]
INTERP = ("triton", "cpu")  # Triton under TRITON_INTERPRET=1: one program at a time, small shapes only
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make(shape, dtype, device, layout):
    """A (B, H, W, heads, D) tensor as a view: contiguous; "sliced" (an interior window of a bigger
    image with a wider head_dim, so every stride is irregular); "hw" (stored as (B, W, H, heads, D)
    and transposed: a column-major image, whose columns are the contiguous lines)."""
    B, H, W, n, D = shape
    if layout == "contiguous":
        t = torch.randn(shape)
    elif layout == "sliced":
        t = torch.randn(B, H + 3, W + 2, n + 1, D + 8)[:, 2:H + 2, 1:W + 1, 1:, 4:D + 4]
    elif layout == "hw":
        t = torch.randn(B, W, H, n, D).transpose(1, 2)
    else:
        raise ValueError(layout)
    return t.to(device=device, dtype=dtype)


def run_case(impl, device, B=2, H=5, W=7, heads=4, kv_heads=2, D=32, axis=1, causal=False,
             dtype=torch.float32, layout="contiguous"):
    q = make((B, H, W, heads, D), dtype, device, layout)
    k = make((B, H, W, kv_heads, D), dtype, device, layout)
    v = make((B, H, W, kv_heads, D), dtype, device, layout)
    g = make((B, H, W, heads, D), dtype, device, layout)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with poisoned_outputs():
        out = hierkern.axial_attention(q, k, v, axis, causal=causal, impl=impl)
        grads = torch.autograd.grad(out, (q, k, v), g)
    assert out.is_contiguous() and out.dtype == dtype

    def ref(dt):
        ls = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o = hierkern.axial_attention(*ls, axis, causal=causal, impl="reference")
        return (o, *torch.autograd.grad(o, ls, g.to(dt)))

    r64, rlow = ref(torch.float64), ref(dtype)
    for name, got, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), r64, rlow):
        assert_close_rel(f"{impl}/{name}/axis{axis}/causal={causal}", got, a, b)
    return out, grads


def _small(impl, device):
    return (impl, device) == INTERP


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("axis", [1, 2])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("hw", [(5, 7), (7, 5), (1, 9), (9, 1), (1, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_axes_shapes(impl, device, axis, causal, hw):
    run_case(impl, device, H=hw[0], W=hw[1], axis=axis, causal=causal)


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("axis", [1, 2])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_long_axis(impl, device, axis, causal):
    """Lines longer than one tile (the CPU kernel's 64-row query tiles and 256-key tiles, the
    interpreter's 16-row tiles): several query and key tiles per line, causal cuts inside a tile."""
    n = 37 if _small(impl, device) else 300
    hw = (n, 3) if axis == 1 else (3, n)
    run_case(impl, device, B=1, H=hw[0], W=hw[1], heads=2, kv_heads=1, axis=axis, causal=causal)


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("heads,kv_heads,D", [(1, 1, 16), (3, 3, 48), (4, 1, 64), (2, 2, 128)])
def test_heads_head_dim(impl, device, heads, kv_heads, D):
    run_case(impl, device, B=1, H=4, W=6, heads=heads, kv_heads=kv_heads, D=D, axis=1 + D % 3 % 2, causal=D > 32)


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("layout", ["sliced", "hw"])
@pytest.mark.parametrize("axis", [1, 2])
def test_strided_views(impl, device, layout, axis):
    run_case(impl, device, H=6, W=5, axis=axis, causal=axis == 1, layout=layout)


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("axis", [1, 2])
def test_low_precision(impl, device, dtype, axis):
    if _small(impl, device) and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 dots")
    run_case(impl, device, H=9, W=6, D=64, axis=axis, causal=True, dtype=dtype)


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_scale_and_lse(impl, device):
    """An explicit scale, and the saved log-sum-exp against the reference's."""
    q = make((2, 5, 6, 2, 32), torch.float32, device, "sliced")
    k = make((2, 5, 6, 2, 32), torch.float32, device, "contiguous")
    v = make((2, 5, 6, 2, 32), torch.float32, device, "hw")
    op = torch.ops.hierkern.axial_attn_fwd_triton if impl == "triton" else torch.ops.hierkern.axial_attn_fwd
    for axis in (1, 2):
        with poisoned_outputs():
            out, lse = op(q, k, v, axis, True, 0.3)
        ro, rl = hierkern.ops.axial.reference.axial_attention_reference(
            q.double(), k.double(), v.double(), axis, True, 0.3, return_lse=True)
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:4]
        torch.testing.assert_close(lse.double(), rl, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.double(), ro, rtol=0, atol=1e-5)


def test_gqa_matches_repeated_heads():
    """GQA reads kv head i // group: the same as repeating k / v heads."""
    q = torch.randn(1, 4, 5, 6, 32)
    k, v = torch.randn(1, 4, 5, 2, 32), torch.randn(1, 4, 5, 2, 32)
    a = hierkern.axial_attention(q, k, v, 1, causal=True)
    b = hierkern.axial_attention(q, k.repeat_interleave(3, 3), v.repeat_interleave(3, 3), 1, causal=True)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_no_input_copies():
    """The CPU kernels read strided views in place: no allocation of an input-sized buffer (the only
    allocations are out / lse and dq / dk / dv), checked through the profiler's memory records."""
    q = make((2, 16, 16, 4, 32), torch.float32, "cpu", "sliced").requires_grad_()
    k = make((2, 16, 16, 4, 32), torch.float32, "cpu", "sliced").requires_grad_()
    v = make((2, 16, 16, 4, 32), torch.float32, "cpu", "sliced").requires_grad_()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        out = hierkern.axial_attention(q, k, v, 1, impl="cpu")
    names = {e.key for e in prof.key_averages()}
    assert not any(n in names for n in ("aten::contiguous", "aten::clone", "aten::permute", "aten::copy_")), names
    assert out.is_contiguous()


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_opcheck(impl, device):
    suffix = "_triton" if impl == "triton" else ""
    fwd = getattr(torch.ops.hierkern, f"axial_attn_fwd{suffix}").default
    bwd = getattr(torch.ops.hierkern, f"axial_attn_bwd{suffix}").default
    q = make((1, 3, 4, 2, 16), torch.float32, device, "sliced").requires_grad_()
    k = make((1, 3, 4, 1, 16), torch.float32, device, "hw").requires_grad_()
    v = make((1, 3, 4, 1, 16), torch.float32, device, "contiguous").requires_grad_()
    # The interpreted Triton ops are slow: skip the autograd-registration retest there (shared with the
    # C++ op pair, which runs every test utility).
    kwargs = {"test_utils": ("test_schema", "test_faketensor")} if impl == "triton" else {}
    for axis, causal in ((1, False), (2, True)):
        torch.library.opcheck(fwd, (q, k, v, axis, causal, 0.25), **kwargs)
        out, lse = fwd(q, k, v, axis, causal, 0.25)
        args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, axis, causal, 0.25)
        torch.library.opcheck(bwd, args, **kwargs)


def test_compiles_without_graph_break():
    q, k, v = (torch.randn(1, 4, 6, 2, 32) for _ in range(3))
    f = torch.compile(lambda q, k, v: hierkern.axial_attention(q, k, v, 1, causal=True), fullgraph=True,
                      backend="eager")
    torch.testing.assert_close(f(q, k, v), hierkern.axial_attention(q, k, v, 1, causal=True), rtol=0, atol=0)


def test_op_entry_matches_public():
    q, k, v = (torch.randn(1, 3, 3, 2, 16) for _ in range(3))
    torch.testing.assert_close(axial_attention_op(q, k, v, 2, False, 0.25, "cpu"),
                               hierkern.axial_attention(q, k, v, 2, scale=0.25, impl="cpu"), rtol=0, atol=0)
