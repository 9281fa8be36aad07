"""cached_attention: bad input raises a clear error naming the argument; opcheck for its ops."""
import pytest
import torch

import hierkern
from hierkern.testing import kernel_backends

B, LQ, H, HK, MAX, D = 1, 3, 4, 2, 20, 32


def inputs(dtype=torch.float32, D=D):
    return (torch.randn(B, LQ, H, D, dtype=dtype), torch.randn(B, MAX, HK, D, dtype=dtype),
            torch.randn(B, MAX, HK, D, dtype=dtype))


def call(q, k, v, kv_len=10, **kw):
    return hierkern.cached_attention(q, k, v, kv_len, **kw)


@pytest.mark.parametrize("kv_len", [0, -1, MAX + 1])
def test_kv_len_out_of_range(kv_len):
    with pytest.raises(ValueError, match=rf"kv_len must be in \[1, max_len={MAX}\].*got {kv_len}"):
        call(*inputs(), kv_len=kv_len)


def test_kv_len_type():
    with pytest.raises(TypeError, match="kv_len must be an int"):
        call(*inputs(), kv_len=torch.tensor(3))
    with pytest.raises(TypeError, match="kv_len must be an int"):
        call(*inputs(), kv_len=True)


def test_shape_mismatches_name_the_argument():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="k_cache and v_cache must have the same shape"):
        call(q, k, v[:, :10])
    with pytest.raises(ValueError, match="k_cache must be 4-D"):
        call(q, k[0], v)
    with pytest.raises(ValueError, match="k_cache has batch 2 but q has batch 1"):
        call(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="head_dim mismatch"):
        call(q, *inputs(D=64)[1:])
    with pytest.raises(ValueError, match=r"q heads \(3\) must be a multiple of k_cache/v_cache heads"):
        call(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="q_len >= 1"):
        call(q[:, :0], k, v)


@pytest.mark.parametrize("d", [16, 36, 264])
def test_head_dim_unsupported(d):
    with pytest.raises(ValueError, match=f"head_dim {d} is not supported"):
        call(*inputs(D=d))


def test_dtype_and_device_mismatch():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="k_cache has dtype torch.bfloat16 but q has dtype torch.float32"):
        call(q, k.bfloat16(), v)
    with pytest.raises(ValueError, match="v_cache has device meta"):
        call(q, k, v.to("meta"))
    with pytest.raises(TypeError, match="float64"):
        call(q.double(), k.double(), v.double(), impl="cpu")
    with pytest.raises(TypeError, match="dtype"):
        call(q.int(), k.int(), v.int())


def test_temperature_checks():
    q, k, v = inputs()
    t = torch.zeros(H)
    with pytest.raises(ValueError, match="qk_norm=True needs temperature"):
        call(q, k, v, qk_norm=True)
    with pytest.raises(ValueError, match="temperature is only used with qk_norm=True"):
        call(q, k, v, temperature=t)
    with pytest.raises(ValueError, match=r"temperature must have shape \(heads,\) = \(4,\)"):
        call(q, k, v, qk_norm=True, temperature=torch.zeros(HK))
    with pytest.raises(TypeError, match="temperature must be float32"):
        call(q, k, v, qk_norm=True, temperature=t.half())
    with pytest.raises(ValueError, match="temperature is on meta"):
        call(q, k, v, qk_norm=True, temperature=t.to("meta"))
    with pytest.raises(TypeError, match="qk_norm must be a bool"):
        call(q, k, v, qk_norm=1, temperature=t)


def test_impl_checks():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="impl"):
        call(q, k, v, impl="flash")
    with pytest.raises(NotImplementedError, match="cached_attention: there is no CUDA C\\+\\+ kernel"):
        hierkern._backend.select("cached_attention", "cuda", torch.device("cuda"))


def test_cpp_op_validates_its_arguments():
    q, k, v = inputs()
    with pytest.raises(RuntimeError, match="kv_len must be in"):
        torch.ops.hierkern.cached_attn_fwd(q, k, v, None, MAX + 1, False, 1.0, 0)
    with pytest.raises(RuntimeError, match="qk_norm needs a temperature"):
        torch.ops.hierkern.cached_attn_fwd(q, k, v, None, 5, True, 1.0, 0)
    with pytest.raises(RuntimeError, match="temperature must be a float32"):
        torch.ops.hierkern.cached_attn_fwd(q, k, v, torch.zeros(HK), 5, True, 1.0, 0)
    with pytest.raises(RuntimeError, match="num_splits"):
        torch.ops.hierkern.cached_attn_fwd(q, k, v, None, 5, False, 1.0, -1)


def _opcheck_args(device, qk_norm):
    q, k, v = (t.to(device).requires_grad_() for t in inputs())
    t = torch.randn(H, device=device).requires_grad_() if qk_norm else None
    return q, k, v, t


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_opcheck_cpu_ops(qk_norm, num_splits):
    q, k, v, t = _opcheck_args("cpu", qk_norm)
    torch.library.opcheck(torch.ops.hierkern.cached_attn_fwd.default, (q, k, v, t, 13, qk_norm, 0.5, num_splits))
    out, lse = torch.ops.hierkern.cached_attn_fwd(q, k, v, t, 13, qk_norm, 0.5, num_splits)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), None if t is None else t.detach(),
            out.detach(), lse, 13, qk_norm, 0.5)
    torch.library.opcheck(torch.ops.hierkern.cached_attn_bwd.default, args)


@pytest.mark.parametrize("impl,device", [b for b in kernel_backends() if b[0] == "triton"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_opcheck_triton_ops(impl, device, qk_norm):
    q, k, v, t = _opcheck_args(device, qk_norm)
    torch.library.opcheck(torch.ops.hierkern.cached_attn_fwd_triton.default, (q, k, v, t, 13, qk_norm, 0.5, 2))
    out, lse = torch.ops.hierkern.cached_attn_fwd_triton(q, k, v, t, 13, qk_norm, 0.5, 2)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), None if t is None else t.detach(),
            out.detach(), lse, 13, qk_norm, 0.5)
    torch.library.opcheck(torch.ops.hierkern.cached_attn_bwd_triton.default, args)


def test_compiles_without_graph_break():
    q, k, v = inputs()
    t = torch.zeros(H)
    f = torch.compile(lambda q, k, v, t: hierkern.cached_attention(q, k, v, 11, impl="cpu", qk_norm=True,
                                                                   temperature=t),
                      fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(q, k, v, t), hierkern.cached_attention(q, k, v, 11, impl="cpu", qk_norm=True,
                                                                        temperature=t))
