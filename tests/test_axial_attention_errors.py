"""hierkern.axial_attention: bad input raises a clear error naming the argument; nothing is reshaped,
cast or copied to make it fit; an explicit impl never falls back."""
import pytest
import torch

import hierkern


def qkv(B=1, H=4, W=5, heads=2, kv_heads=2, D=32, dtype=torch.float32):
    return (torch.randn(B, H, W, heads, D, dtype=dtype), torch.randn(B, H, W, kv_heads, D, dtype=dtype),
            torch.randn(B, H, W, kv_heads, D, dtype=dtype))


def test_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must be 5-D \(batch, H, W, heads, head_dim\)"):
        hierkern.axial_attention(q[0], k, v, 1)
    with pytest.raises(ValueError, match="v must be 5-D"):
        hierkern.axial_attention(q, k, v.flatten(1, 2), 1)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        hierkern.axial_attention(q, k.numpy(), v, 1)


@pytest.mark.parametrize("axis", [0, 3, -1, True, 1.0, "h"])
def test_axis(axis):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="axis must be 1"):
        hierkern.axial_attention(q, k, v, axis)


def test_causal_type():
    with pytest.raises(TypeError, match="causal must be a bool"):
        hierkern.axial_attention(*qkv(), 1, causal=1)


@pytest.mark.parametrize("which,shape,msg", [
    ("k", (1, 3, 5, 2, 32), "k/v have H 3 but q has H 4"),
    ("k", (1, 4, 6, 2, 32), "k/v have W 6 but q has W 5"),
    ("k", (2, 4, 5, 2, 32), "k/v have batch 2 but q has batch 1"),
    ("k", (1, 4, 5, 2, 16), "k/v have head_dim 16 but q has head_dim 32"),
    ("v", (1, 4, 5, 1, 32), "k and v must have the same shape"),
])
def test_shapes(which, shape, msg):
    q, k, v = qkv()
    if which == "k":
        k = torch.randn(shape)
        v = torch.randn(shape)
    else:
        v = torch.randn(shape)
    with pytest.raises(ValueError, match=msg):
        hierkern.axial_attention(q, k, v, 1)


def test_gqa_heads():
    with pytest.raises(ValueError, match=r"q heads \(3\) must be a multiple of k/v heads \(2\)"):
        hierkern.axial_attention(*qkv(heads=3, kv_heads=2), 1)


@pytest.mark.parametrize("D", [8, 20, 136])
def test_head_dim(D):
    with pytest.raises(ValueError, match=f"head_dim {D} is not supported"):
        hierkern.axial_attention(*qkv(D=D), 1)


def test_empty_axis():
    with pytest.raises(ValueError, match="batch, H and W must be >= 1"):
        hierkern.axial_attention(*qkv(W=0), 1)


def test_dtypes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k has dtype torch.bfloat16 but q has dtype torch.float32"):
        hierkern.axial_attention(q, k.bfloat16(), v, 1)
    with pytest.raises(TypeError, match="q has dtype torch.int64"):
        hierkern.axial_attention(*(t.long() for t in (q, k, v)), 1)
    with pytest.raises(TypeError, match="float64 is supported by impl='reference' only"):
        hierkern.axial_attention(*(t.double() for t in (q, k, v)), 1, impl="cpu")
    hierkern.axial_attention(*(t.double() for t in (q, k, v)), 1, impl="reference")


def test_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k has device meta but q has device cpu"):
        hierkern.axial_attention(q, k.to("meta"), v, 1)
    with pytest.raises(ValueError, match="impl='cpu' needs CPU tensors"):
        hierkern.axial_attention(*(t.to("meta") for t in (q, k, v)), 1, impl="cpu")


def test_impls():
    q, k, v = qkv()
    with pytest.raises(NotImplementedError, match="no CUDA C\\+\\+ kernel for axial attention"):
        hierkern.axial_attention(q, k, v, 1, impl="cuda")
    with pytest.raises(ValueError, match="impl must be one of"):
        hierkern.axial_attention(q, k, v, 1, impl="fast")
    with pytest.raises(TypeError, match="scale must be a float"):
        hierkern.axial_attention(q, k, v, 1, scale="x")


def test_cpp_op_validates_its_arguments():
    """Direct torch.ops callers get the C++ checks."""
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="axis must be 1"):
        torch.ops.hierkern.axial_attn_fwd(q, k, v, 0, False, 1.0)
    with pytest.raises(RuntimeError, match="q heads must be a multiple"):
        torch.ops.hierkern.axial_attn_fwd(*qkv(heads=3, kv_heads=2), 1, False, 1.0)
    with pytest.raises(RuntimeError, match="must be 5-D"):
        torch.ops.hierkern.axial_attn_fwd(q[0], k[0], v[0], 1, False, 1.0)


def test_triton_refuses_spans_beyond_32_bit_offsets():
    """The Triton kernels index one batch element with 32-bit offsets: a larger span raises (meta
    tensors: no memory)."""
    pytest.importorskip("triton")
    from hierkern.ops.axial import triton as tk
    big = torch.empty_strided((1, 3, 2, 1, 16), (1, 2 ** 30, 16, 16, 1), device="meta")
    with pytest.raises(ValueError, match="32-bit offsets"):
        tk._check_span(big, "q")
    tk._check_span(torch.empty(1, 3, 2, 1, 16, device="meta"), "q")
