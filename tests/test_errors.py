"""Bad input raises a clear error naming the argument."""
import pytest
import torch

import hierkern
from hierkern.testing import make_qkv

LAY = hierkern.ScaleLayout((1, 2, 3))


def qkv(L=14, H=2, Hkv=2, D=32, dtype=torch.float32):
    return make_qkv(1, L, H, Hkv, D, dtype)


def call(q, k, v, layout=LAY, **kw):
    return hierkern.next_scale_attention(q, k, v, layout, **kw)


def test_seq_len_must_match_layout():
    with pytest.raises(ValueError, match="layout.L"):
        call(*qkv(L=15))


def test_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="q must be 4-D"):
        call(q[0], k, v)
    with pytest.raises(ValueError, match="v must be 4-D"):
        call(q, k, v[..., None])


def test_dtype_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="dtype"):
        call(q, k.bfloat16(), v)


def test_unsupported_dtype():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="dtype"):
        call(q.int(), k.int(), v.int())


def test_float64_only_for_reference():
    q, k, v = (t.double() for t in qkv())
    call(q, k, v, impl="reference")
    with pytest.raises(TypeError, match="float64"):
        call(q, k, v, impl="cpu")


def test_device_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="device"):
        call(q, k.to("meta"), v)


def test_head_dim_mismatch_and_unsupported():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="head_dim mismatch"):
        call(q, *make_qkv(1, 14, 2, 2, 64)[1:])
    for d in (16, 36, 264):
        with pytest.raises(ValueError, match="head_dim"):
            call(*qkv(D=d))


def test_gqa_heads_must_divide():
    q, _, _ = qkv(H=3)
    _, k, v = qkv(Hkv=2)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        call(q, k, v)


def test_k_v_shape_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="same shape"):
        call(q, k, v[:, :, :1])


def test_unknown_pattern_impl_layout_scale():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="pattern"):
        call(q, k, v, pattern="block")
    with pytest.raises(ValueError, match="impl"):
        call(q, k, v, impl="flash")
    with pytest.raises(TypeError, match="layout"):
        call(q, k, v, layout=(1, 2, 3))
    with pytest.raises(TypeError, match="scale"):
        call(q, k, v, scale="0.1")


def test_explicit_backend_never_falls_back(monkeypatch):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="impl='cuda' needs CUDA tensors"):
        call(q, k, v, impl="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        call(q, k, v, impl="triton")


def test_cpp_op_validates_offsets():
    q, k, v = qkv()
    bad = torch.tensor([0, 1, 5, 13], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="offsets"):
        torch.ops.hierkern.interval_attn_fwd(q, k, v, bad, 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="offsets"):
        torch.ops.hierkern.interval_attn_fwd(q, k, v, bad.long(), 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="pattern"):
        torch.ops.hierkern.interval_attn_fwd(q, k, v, LAY.offsets_tensor("cpu"), 7, 0, 1.0)
    nonincreasing = torch.tensor([0, 5, 1, 14], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="strictly increasing"):
        torch.ops.hierkern.interval_attn_fwd(q, k, v, nonincreasing, 0, 0, 1.0)
