"""Bad input to the approximate-KV-reuse primitives raises a clear error naming the argument."""
import pytest
import torch

import hierkern


def _sel(**kw):
    a = dict(new=torch.randn(2, 8, 2, 16), cached=torch.randn(2, 8, 2, 16), k=3)
    a.update(kw)
    return a


@pytest.mark.parametrize("kw,err,msg", [
    (dict(new=torch.randn(2, 8, 32)), ValueError, "new must be 4-D"),
    (dict(cached=torch.randn(2, 9, 2, 16)), ValueError, "same shape"),
    (dict(cached=torch.randn(2, 8, 2, 16, dtype=torch.bfloat16)), ValueError, "dtype"),
    (dict(new=torch.randint(0, 3, (2, 8, 2, 16)), cached=torch.randint(0, 3, (2, 8, 2, 16))), TypeError, "dtype"),
    (dict(k=9), ValueError, r"k must be in \[0, seq=8\]"),
    (dict(k=-1), ValueError, "k must be"),
    (dict(k=2.0), TypeError, "k must be an int"),
    (dict(new="x"), TypeError, "new must be a torch.Tensor"),
])
def test_refresh_select_errors(kw, err, msg):
    with pytest.raises(err, match=msg):
        hierkern.refresh_select(**_sel(**kw))


def test_refresh_select_impl_errors():
    with pytest.raises(TypeError, match="float64"):
        hierkern.refresh_select(**_sel(new=torch.randn(2, 8, 2, 16).double(), cached=torch.randn(2, 8, 2, 16).double()),
                                impl="cpu")
    with pytest.raises(ValueError, match="impl must be one of"):
        hierkern.refresh_select(**_sel(), impl="fast")
    with pytest.raises(ValueError, match="impl='cuda' needs CUDA"):
        hierkern.refresh_select(**_sel(), impl="cuda")


def _sc(**kw):
    a = dict(k_cache=torch.randn(2, 10, 2, 16), v_cache=torch.randn(2, 10, 2, 16),
             index=torch.tensor([[0, 3, 5], [1, 2, 9]]), k=torch.randn(2, 3, 2, 16), v=torch.randn(2, 3, 2, 16))
    a.update(kw)
    return a


@pytest.mark.parametrize("kw,err,msg", [
    (dict(k_cache=torch.randn(2, 10, 32)), ValueError, "k_cache must be 4-D"),
    (dict(v_cache=torch.randn(2, 11, 2, 16)), ValueError, "k_cache and v_cache must have the same shape"),
    (dict(index=torch.tensor([[0, 3, 5], [1, 2, 9]], dtype=torch.int32)), TypeError, "index must be int64"),
    (dict(index=torch.tensor([0, 3, 5])), ValueError, "index must be 2-D"),
    (dict(index=torch.tensor([[0, 3, 5]])), ValueError, "index has batch 1"),
    (dict(k=torch.randn(2, 4, 2, 16)), ValueError, r"k must have shape"),
    (dict(v=torch.randn(2, 3, 1, 16)), ValueError, r"v must have shape"),
    (dict(k=torch.randn(2, 3, 2, 16, dtype=torch.bfloat16)), ValueError, "dtype"),
    (dict(cos=torch.randn(10, 8)), ValueError, "both cos and sin"),
    (dict(cos=torch.randn(10, 16), sin=torch.randn(10, 16)), ValueError, r"cos must have shape"),
    (dict(cos=torch.randn(10, 8).double(), sin=torch.randn(10, 8).double()), TypeError, "cos must be float32"),
    (dict(index=torch.tensor([[0, 3, 3], [1, 2, 9]])), ValueError, "more than once"),
    (dict(index=torch.tensor([[0, 3, 10], [1, 2, 9]])), IndexError, "range"),
])
@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_scatter_kv_errors(kw, err, msg, impl):
    if impl == "cpu" and err is IndexError:
        err = RuntimeError  # the C++ kernel's TORCH_CHECK (checked while it reads the indices)
    if impl == "cpu" and "more than once" in msg:
        err = RuntimeError
    with pytest.raises(err, match=msg):
        hierkern.scatter_kv(**_sc(**kw), impl=impl)


def test_scatter_kv_odd_head_dim_with_rope():
    a = _sc(k_cache=torch.randn(2, 10, 2, 15), v_cache=torch.randn(2, 10, 2, 15), k=torch.randn(2, 3, 2, 15),
            v=torch.randn(2, 3, 2, 15), cos=torch.randn(10, 7), sin=torch.randn(10, 7))
    with pytest.raises(ValueError, match="even head_dim"):
        hierkern.scatter_kv(**a)


def test_scatter_kv_not_differentiable():
    with pytest.raises(RuntimeError, match="not differentiable"):
        hierkern.scatter_kv(**_sc(k=torch.randn(2, 3, 2, 16, requires_grad=True)))


@pytest.mark.parametrize("kw,err,msg", [
    (dict(kv_len=0), ValueError, r"kv_len must be in \[1, max_len=20\]"),
    (dict(kv_len=21), ValueError, "kv_len must be in"),
    (dict(kv_len=3.0), TypeError, "kv_len must be an int"),
    (dict(q=torch.randn(2, 3, 3, 32)), ValueError, "multiple"),
    (dict(q=torch.randn(2, 0, 4, 32)), ValueError, "at least one query"),
    (dict(v_cache=torch.randn(2, 19, 2, 32)), ValueError, "same shape"),
    (dict(scale="a"), TypeError, "scale"),
])
def test_subset_attention_errors(kw, err, msg):
    a = dict(q=torch.randn(2, 3, 4, 32), k_cache=torch.randn(2, 20, 2, 32), v_cache=torch.randn(2, 20, 2, 32))
    a.update(kw)
    with pytest.raises(err, match=msg):
        hierkern.subset_attention(**a)
