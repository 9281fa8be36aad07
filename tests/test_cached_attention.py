"""cached_attention kernels against the float64 reference, forward and backward (q, k_cache, v_cache,
temperature), on every backend this machine can run."""
import math

import pytest
import torch

import hierkern
from hierkern.ops.cached_attention.op import cached_attention_op
from hierkern.testing import assert_close_rel, kernel_backends, make_qkv, poisoned_outputs

BACKENDS = [b for b in kernel_backends() if b[0] in ("cpu", "triton")]
INTERP = ("triton", "cpu")  # the Triton interpreter: tiny shapes only


def make_inputs(B, Lq, H, Hk, D, max_len, kv_len, dtype, device, strides="contiguous"):
    """q (B, Lq, H, D) with the given strides; caches (B, max_len, Hk, D) whose rows from kv_len on are
    NaN (a kernel that reads them fails); a temperature giving multipliers in [1, 7.4] (VAR initialises
    them to 4). The ln 100 cap has its own test."""
    q = make_qkv(B, Lq, H, Hk, D, dtype, device, strides)[0]
    _, k, v = make_qkv(B, max_len, H, Hk, D, dtype, device)
    for t in (k, v):
        t[:, kv_len:] = float("nan")
    temperature = (torch.rand(H) * 2.0).to(device)
    return [t.requires_grad_() for t in (q, k, v, temperature)]


def run_case(impl, device, B=2, Lq=7, H=4, Hk=2, D=32, max_len=90, kv_len=77, dtype=torch.float32,
             qk_norm=False, strides="contiguous", num_splits=0, temperature=None, floor_ulps=32.0):
    q, k, v, temp = make_inputs(B, Lq, H, Hk, D, max_len, kv_len, dtype, device, strides)
    if temperature is not None:
        temp = temperature.to(device).requires_grad_()
    temp_arg = temp if qk_norm else None
    scale = 1.0 if qk_norm else D ** -0.5
    g = torch.randn(B, Lq, H, D).to(device=device, dtype=dtype)
    leaves = (q, k, v, temp) if qk_norm else (q, k, v)
    with poisoned_outputs():
        out = cached_attention_op(q, k, v, kv_len, scale, qk_norm, temp_arg, impl, num_splits=num_splits)
        grads = torch.autograd.grad(out, leaves, g)

    def ref(dt):
        ls = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        t = temp.detach().to(torch.float64 if dt == torch.float64 else torch.float32).requires_grad_()
        o = hierkern.cached_attention(*ls, kv_len, impl="reference", qk_norm=qk_norm,
                                      temperature=t if qk_norm else None)
        return (o, *torch.autograd.grad(o, ls + [t] if qk_norm else ls, g.to(dt)))

    r64, rlow = ref(torch.float64), ref(dtype)
    names = ("out", "dq", "dk_cache", "dv_cache", "dtemperature")
    for name, got, a, b in zip(names, (out, *grads), r64, rlow):
        assert got.shape == a.shape
        assert_close_rel(f"{impl}/{name}", got, a, b, floor_ulps=floor_ulps)
    # Cache gradients are dense and exactly zero beyond kv_len.
    for dc in grads[1:3]:
        assert (dc[:, kv_len:] == 0).all()
    return out, grads


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
@pytest.mark.parametrize("q_len", [1, 7, 256])
def test_q_lengths(impl, device, q_len, qk_norm):
    if (impl, device) == INTERP and q_len > 64:  # the interpreter: one small head pair for the tiled path
        run_case(impl, device, B=1, Lq=q_len, H=2, Hk=2, kv_len=40, max_len=48, qk_norm=qk_norm)
    else:
        run_case(impl, device, B=2, Lq=q_len, qk_norm=qk_norm)


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_temperature_cap(impl, device):
    """Heads above ln 100 are capped (zero temperature gradient), heads below are not.

    A capped head has logits up to 100. The backward recomputes P = exp(s - lse) with s from a dot in
    another order than the forward's and lse stored in float32, so P carries ~|s| * eps of rounding
    (the conditioning of softmax at that logit scale), which eager softmax avoids for the dominant key
    by subtracting the exact row max. Hence a floor of 8 float32 ulps per unit of logit (800 here)
    instead of the default 32 ulps; an uncapped multiplier (164) would still fail by orders of magnitude."""
    cap = math.log(100.0)
    t = torch.tensor([cap + 0.5, 1.5, 1.0, 0.0])
    _, grads = run_case(impl, device, B=1, Lq=3, H=4, Hk=2, kv_len=40, max_len=48, qk_norm=True,
                        temperature=t, floor_ulps=800.0)
    dt = grads[3]
    assert dt[0].item() == 0.0 and (dt[1:] != 0).all()


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("num_splits", [1, 3, 100])
@pytest.mark.parametrize("q_len", [1, 7, 70])
def test_split_kv_paths(impl, device, q_len, num_splits):
    """Forced split counts on both the decode and the tiled path (100: more than the key blocks)."""
    run_case(impl, device, B=1, Lq=q_len, H=2, Hk=1, kv_len=83, max_len=83, num_splits=num_splits,
             qk_norm=num_splits == 3)


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("kv_len", [1, 16, 129, 300])
def test_kv_lengths(impl, device, kv_len):
    if (impl, device) == INTERP and kv_len == 300:
        pytest.skip("interpreter: tiny shapes")
    run_case(impl, device, B=1, Lq=3, H=2, Hk=2, kv_len=kv_len, max_len=kv_len + 5)


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_dtypes(impl, device, dtype, qk_norm):
    if (impl, device) == INTERP and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 dot")
    run_case(impl, device, B=1, Lq=5, H=2, Hk=1, D=64, kv_len=70, max_len=80, dtype=dtype, qk_norm=qk_norm)


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("H,Hk", [(4, 4), (4, 1), (6, 2)])
@pytest.mark.parametrize("strides", ["contiguous", "bhsd", "padded"])
def test_gqa_batch1_strides(impl, device, H, Hk, strides):
    run_case(impl, device, B=1, Lq=5, H=H, Hk=Hk, kv_len=40, max_len=48, strides=strides, qk_norm=Hk == 1)


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("D", [64, 96, 128, 256])
def test_head_dims(impl, device, D):
    if (impl, device) == INTERP and D not in (96,):
        pytest.skip("interpreter: the padded head_dim is the interesting one")
    run_case(impl, device, B=1, Lq=3, H=2, Hk=1, D=D, kv_len=45, max_len=50, qk_norm=True)


@pytest.mark.parametrize("impl,device", [b for b in BACKENDS if b[0] == "cpu"])
@pytest.mark.parametrize("q_len", [1, 36, 256])
def test_cpu_var_sizes(impl, device, q_len):
    """VAR-like decode/scale steps: many key tiles, bf16, GQA, automatic split count."""
    run_case(impl, device, B=2, Lq=q_len, H=4, Hk=2, D=64, kv_len=1100, max_len=1200,
             dtype=torch.bfloat16, qk_norm=True)


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("num_splits", [1, 2])
def test_lse_matches_reference(impl, device, num_splits):
    q, k, v, _ = make_inputs(1, 3, 2, 1, 32, 50, 41, torch.float32, device)
    with poisoned_outputs():
        _, lse = cached_attention_op(q.detach(), k.detach(), v.detach(), 41, 0.3, False, None, impl,
                                     num_splits=num_splits, return_lse=True)
    _, lse64 = cached_attention_op(q.detach().double(), k.detach().double(), v.detach().double(), 41, 0.3,
                                   False, None, "reference", return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 3)
    assert (lse.double() - lse64).abs().max().item() < 1e-5


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_kv_cache_decode_loop(impl, device):
    """A decode loop over a KVCache: one token per step, kv_len = length, views never copied."""
    cache = hierkern.KVCache(1, 12, 1, 32, device=device)
    cache.k_cache.fill_(float("nan"))
    cache.v_cache.fill_(float("nan"))
    ks, vs = [], []
    for _ in range(4):
        k, v = torch.randn(1, 2, 1, 32, device=device), torch.randn(1, 2, 1, 32, device=device)
        ks.append(k)
        vs.append(v)
        cache.append(k, v)
        q = torch.randn(1, 1, 2, 32, device=device)
        with poisoned_outputs():
            out = hierkern.cached_attention(q, cache.k_cache, cache.v_cache, cache.length, impl=impl)
        ref = hierkern.cached_attention(q.double(), torch.cat(ks, 1).double(), torch.cat(vs, 1).double(),
                                        cache.length, impl="reference")
        assert (out.double() - ref).abs().max().item() < 1e-5


def test_default_picks_compiled_cpu_kernel_and_matches():
    q, k, v, _ = make_inputs(1, 2, 2, 2, 32, 20, 20, torch.float32, "cpu")
    out = hierkern.cached_attention(q, k, v, 20)
    ref = hierkern.cached_attention(q, k, v, 20, impl="reference")
    torch.testing.assert_close(out, ref)
