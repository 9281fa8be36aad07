"""next_scale_attention kernels against the float64 reference, forward and backward."""
import pytest
import torch

import hierkern
from hierkern.layouts import VAR_256
from hierkern.testing import kernel_backends, assert_close_rel, make_qkv, poisoned_outputs

BACKENDS = kernel_backends()
IRREGULAR = (1, 3, 7, 130, 257)
SCHEDULES = {
    "irregular": IRREGULAR,
    "var256": tuple(p * p for p in VAR_256),
    "single": (37,),
    "one_token": (1, 1, 1, 1, 1),
    "non_square": (2, 6, 12, 35, 70),
}


def _check(impl, device, sizes, pattern, dtype, B, H, Hkv, D, strides="contiguous"):
    lay = hierkern.ScaleLayout.from_sizes(sizes)
    q, k, v = make_qkv(B, lay.L, H, Hkv, D, dtype, device, strides, requires_grad=True)
    g = torch.randn(B, lay.L, H, D, device=device).to(dtype)
    with poisoned_outputs():
        out = hierkern.next_scale_attention(q, k, v, lay, pattern, impl=impl)
        grads = torch.autograd.grad(out, (q, k, v), g)
    assert_matches_reference(impl, (out, *grads), q, k, v, lay, pattern, g)


def assert_matches_reference(label, got, q, k, v, lay, pattern, g):
    """got = (out, dq, dk, dv) of next_scale_attention(q, k, v, lay, pattern) with output gradient g,
    against the reference in float64 and in q's dtype (precision-relative tolerances)."""
    def ref(dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o = hierkern.next_scale_attention(*leaves, lay, pattern, impl="reference")
        return (o, *torch.autograd.grad(o, leaves, g.to(dt)))

    for name, t, a, b in zip(("out", "dq", "dk", "dv"), got, ref(torch.float64), ref(q.dtype)):
        assert t.dtype == q.dtype
        assert_close_rel(f"{label}/{name}", t, a, b)


@pytest.mark.parametrize("impl,device", [b for b in BACKENDS if b[0] == "cpu"])
@pytest.mark.parametrize("D", [32, 48, 64, 80, 96])
def test_cpu_register_block_tails(impl, device, D):
    """Single scales of 1..40 tokens and a few longer ones: every query-tile height and key panel
    count the CPU GEMMs split into register blocks (6 rows x up to 4 panels of 16 keys, a 1-3
    remainder merged and split evenly); the head dims give the narrow GEMMs 2 to 6 panels."""
    for n in list(range(1, 41)) + [49, 65, 81, 97, 113, 127, 128, 129, 145]:
        _check(impl, device, (n,), "diagonal", torch.float32, B=1, H=2, Hkv=1, D=D)


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("pattern", ["causal", "diagonal"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_schedules(impl, device, pattern, schedule):
    sizes = SCHEDULES[schedule]
    if impl == "triton" and device == "cpu" and sum(sizes) > 400:
        pytest.skip("interpreter: long schedules are covered by the compiled GPU run")
    _check(impl, device, sizes, pattern, torch.float32, B=2, H=2, Hkv=2, D=32)


CPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TRITON_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", ["causal", "diagonal"])
def test_dtypes(impl, device, dtype, pattern):
    if impl == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 dot")
    _check(impl, device, (1, 4, 9, 50), pattern, dtype, B=1, H=2, Hkv=1, D=64)


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("D", [32, 64, 96, 128])
def test_gqa_and_head_dims(impl, device, H, Hkv, D):
    if impl == "triton" and device == "cpu" and D not in (32, 96):
        pytest.skip("interpreter: a power-of-two and a padded head_dim are enough")
    _check(impl, device, (1, 3, 7, 20), "causal", torch.float32, B=1, H=H, Hkv=Hkv, D=D)


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("strides", ["bhsd", "padded"])
@pytest.mark.parametrize("pattern", ["causal", "diagonal"])
def test_non_contiguous(impl, device, strides, pattern):
    _check(impl, device, (1, 4, 9, 16, 70), pattern, torch.float32, B=2, H=2, Hkv=1, D=64,
           strides=strides)


@pytest.mark.parametrize("impl,device", [b for b in BACKENDS if b[0] == "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [64, 128, 256])
def test_cpu_large(impl, device, dtype, D):
    """Tiles of every kind (full, partial, skipped) at VAR 256px sizes."""
    _check(impl, device, tuple(p * p for p in VAR_256), "causal", dtype, B=1, H=2, Hkv=1, D=D)


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_lse_matches_reference(impl, device):
    from hierkern.ops.attention.op import interval_attention
    lay = hierkern.ScaleLayout.from_sizes(IRREGULAR[:4])
    q, k, v = make_qkv(2, lay.L, 2, 2, 32, torch.float32, device)
    with poisoned_outputs():
        _, lse = interval_attention(q, k, v, lay.offsets, lay.offsets_tensor, 0, 0, 32 ** -0.5, impl,
                                    "test", return_lse=True)
    _, lse64 = interval_attention(q.double(), k.double(), v.double(), lay.offsets, None, 0, 0,
                                  32 ** -0.5, "reference", "test", return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, lay.L)
    assert (lse.double() - lse64).abs().max().item() < 1e-5


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_schedule_change_needs_no_new_layout_state(impl, device):
    """Schedules differing per call (FlexVAR) just work: nothing is built per shape but tiny metadata."""
    for sizes in ((1, 4, 9), (2, 3, 5, 8), (16,)):
        _check(impl, device, sizes, "causal", torch.float32, B=1, H=1, Hkv=1, D=32)
