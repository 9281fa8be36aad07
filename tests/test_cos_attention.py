"""The fused cos-attention prologue (qk_norm=True, temperature) of next_scale_attention against the
float64 reference (F.normalize + exp(min(t, ln 100)) in PyTorch), forward and backward in q, k, v and
temperature."""
import math
import re

import pytest
import torch

import hierkern
from hierkern.testing import assert_close_rel, kernel_backends, make_qkv, poisoned_outputs

BACKENDS = [b for b in kernel_backends() if b[0] != "cuda"]  # the CUDA C++ fallback has no prologue


def _temperature(H, device, clamped):
    t = torch.randn(H) * 0.3 + math.log(4.0)  # VAR initialises at ln 4
    if clamped:
        t[0] = math.log(100.0) + 0.5  # above the clamp: no gradient may flow there
    return t.to(device)


def _check(impl, device, sizes, pattern, dtype, B, H, Hkv, D, strides="contiguous", clamped=False):
    lay = hierkern.ScaleLayout.from_sizes(sizes)
    q, k, v = make_qkv(B, lay.L, H, Hkv, D, dtype, device, strides, requires_grad=True)
    temp = _temperature(H, device, clamped).requires_grad_()
    g = torch.randn(B, lay.L, H, D, device=device).to(dtype)
    with poisoned_outputs():
        out = hierkern.next_scale_attention(q, k, v, lay, pattern, impl=impl, qk_norm=True, temperature=temp)
        grads = torch.autograd.grad(out, (q, k, v, temp), g)

    def ref(dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        t = temp.detach().to(torch.float64 if dt == torch.float64 else torch.float32).requires_grad_()
        o = hierkern.next_scale_attention(*leaves, lay, pattern, impl="reference", qk_norm=True, temperature=t)
        return (o, *torch.autograd.grad(o, (*leaves, t), g.to(dt)))

    r64, rlow = ref(torch.float64), ref(dtype)
    # Logits scale with the multiplier (up to 100 at the clamp), and so does the float32 noise of a
    # backward that recomputes P = exp(s - lse): the floor grows with it.
    floor_ulps = 32.0 * (100.0 if clamped else 1.0)
    for name, got, a, b in zip(("out", "dq", "dk", "dv", "dtemperature"), (out, *grads), r64, rlow):
        assert_close_rel(f"{impl}/{name}", got, a, b, floor_ulps=floor_ulps)
    assert grads[3].dtype == torch.float32
    if clamped:
        assert grads[3][0].item() == 0.0


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("pattern", ["causal", "diagonal"])
@pytest.mark.parametrize("sizes", [(1, 3, 7, 40), (1, 1, 1), (37,)], ids=["irregular", "one_token", "single"])
def test_cos_attention_matches_reference(impl, device, pattern, sizes):
    _check(impl, device, sizes, pattern, torch.float32, B=2, H=2, Hkv=2, D=32)


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cos_attention_low_precision_gqa(impl, device, dtype):
    if impl == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 dot")
    _check(impl, device, (1, 4, 9, 30), "causal", dtype, B=1, H=4, Hkv=2, D=64, strides="bhsd")


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_cos_attention_clamped_temperature(impl, device):
    _check(impl, device, (1, 3, 7, 40), "causal", torch.float32, B=2, H=2, Hkv=1, D=32, clamped=True)


def test_cos_attention_equals_prenormalised_inputs():
    """The prologue is exactly 'normalise, scale q, attend with scale 1' (what VAR's code does)."""
    lay = hierkern.ScaleLayout((1, 2, 3))
    q, k, v = make_qkv(1, lay.L, 2, 2, 32)
    t = torch.tensor([0.3, 1.2])
    fused = hierkern.next_scale_attention(q, k, v, lay, qk_norm=True, temperature=t, impl="cpu")
    qn = torch.nn.functional.normalize(q, dim=-1) * t.exp()[:, None]
    kn = torch.nn.functional.normalize(k, dim=-1)
    plain = hierkern.next_scale_attention(qn, kn, v, lay, scale=1.0, impl="cpu")
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


def test_cos_attention_bad_arguments():
    lay = hierkern.ScaleLayout((1, 2))
    q, k, v = make_qkv(1, lay.L, 2, 2, 32)
    with pytest.raises(ValueError, match=r"qk_norm=True needs temperature, a \(2,\) float32 tensor"):
        hierkern.next_scale_attention(q, k, v, lay, qk_norm=True)
    with pytest.raises(ValueError, match=r"temperature must have shape \(heads,\) = \(2,\)"):
        hierkern.next_scale_attention(q, k, v, lay, qk_norm=True, temperature=torch.zeros(3))
    with pytest.raises(TypeError, match="temperature must be float32"):
        hierkern.next_scale_attention(q, k, v, lay, qk_norm=True, temperature=torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match="only used with qk_norm=True"):
        hierkern.next_scale_attention(q, k, v, lay, temperature=torch.zeros(2))
    with pytest.raises(TypeError, match="qk_norm must be a bool"):
        hierkern.next_scale_attention(q, k, v, lay, qk_norm=1, temperature=torch.zeros(2))


@pytest.mark.skipif(not hierkern._backend.has_compiled_ops(), reason="hierkern._C not built")
@pytest.mark.parametrize("B,L,H,Lk,Hk,D", [(1, 1, 1, 1, 1, 1), (2, 7, 3, 9, 1, 5), (2, 70, 4, 70, 4, 64),
                                          (1, 130, 2, 3, 2, 33)])
def test_cos_qk_bwd_matches_float64_chain_rule(B, L, H, Lk, Hk, D):
    # hierkern::cos_qk_bwd (the chain rule behind the CPU float32 backward) against autograd through the
    # float64 reference prologue: strided q / k / gradients, a zero q row and a zero k row (the 1e-12
    # norm clamp), one temperature above the ln 100 clamp and one exactly at it
    from hierkern.ops.attention import cos_attention
    g = torch.Generator().manual_seed(B * L * H + D)
    q = torch.randn(B, L, 2 * H, D, generator=g)[:, :, ::2]
    k = torch.randn(B, Lk, Hk, D + 3, generator=g)[..., 2:D + 2]
    q[0, 0, 0] = 0.0
    k[-1, -1, -1] = 0.0
    t = torch.randn(H, generator=g) * 0.3 + math.log(4.0)
    t[0] = math.log(100.0) + 0.5
    if H > 1:
        t[1] = math.log(100.0)
    dqh = torch.randn(B, L, H, D, generator=g).transpose(0, 1).contiguous().transpose(0, 1)
    dkh = torch.randn(B, Lk, Hk, D, generator=g)
    with poisoned_outputs():
        got = torch.ops.hierkern.cos_qk_bwd(q, k, t, dqh, dkh)
    # cos_attention.backward (the attention ops' autograd) takes the op for these float32 CPU tensors
    assert all(torch.equal(a, b) for a, b in zip(got, cos_attention.backward(q, k, t, dqh, dkh)))

    def chain(dt):
        leaves = [x.detach().to(dt).requires_grad_() for x in (q, k, t)]
        qh, kh = cos_attention.reference(*leaves)
        return torch.autograd.grad((qh, kh), leaves, (dqh.to(dt), dkh.to(dt)))
    r64, r32 = chain(torch.float64), cos_attention.backward_reference(q, k, t, dqh, dkh)
    for name, a, b64, b32 in zip(("dq", "dk", "dtemperature"), got, r64, r32):
        assert a.dtype == torch.float32 and a.shape == b64.shape
        assert_close_rel(f"cos_qk_bwd {name}", a, b64, b32)
    assert got[2][0] == 0.0


def test_cos_qk_bwd_bad_input():
    if not hierkern._backend.has_compiled_ops():
        pytest.skip("hierkern._C not built")
    q, k, t = torch.randn(1, 3, 2, 8), torch.randn(1, 4, 1, 8), torch.randn(2)
    op = torch.ops.hierkern.cos_qk_bwd
    cases = [
        (lambda: op(q.double(), k, t, q, k), "q must be float32"),
        (lambda: op(q, k, t, q[:, :2], k), "d_qhat must have q's shape"),
        (lambda: op(q, k[..., :4], t, q, k[..., :4]), "k must be (1, seq, heads, 8) like q"),
        (lambda: op(q, k, torch.randn(3), q, k), "temperature must be (heads,) = (2,)"),
        (lambda: op(q[0], k, t, q[0], k), "q must be (batch, seq, heads, head_dim)"),
    ]
    for call, msg in cases:
        with pytest.raises(RuntimeError, match=re.escape(msg)):
            call()
    torch.library.opcheck(op.default, (q, k, t, torch.randn(1, 3, 2, 8), torch.randn(1, 4, 1, 8)))
