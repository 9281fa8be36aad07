"""hierkern.causal_conv1d rejects bad input with an error that names the argument; nothing is reshaped,
cast or copied to make it fit."""
import pytest
import torch

import hierkern

D, W = 6, 4


def _ok(**over):
    args = dict(x=torch.randn(2, D, 5), weight=torch.randn(D, W), bias=torch.randn(D),
                initial_state=torch.randn(2, D, W - 1))
    args.update(over)
    return args


@pytest.mark.parametrize("over,exc,match", [
    (dict(x=torch.randn(D, 5)), ValueError, r"x must be 3-D \(batch, dim, seqlen\)"),
    (dict(x=torch.randn(2, D, 0)), ValueError, "x must hold at least one time step"),
    (dict(weight=torch.randn(D, W, 1)), ValueError, r"weight must be 2-D \(dim, width\)"),
    (dict(weight=torch.randn(D + 1, W)), ValueError, "weight has 7 channels but x has dim 6"),
    (dict(weight=torch.randn(D, 1)), ValueError, "width 1 is not supported; expected 2 <= width <= 4"),
    (dict(weight=torch.randn(D, 5)), ValueError, "width 5 is not supported; expected 2 <= width <= 4"),
    (dict(weight=torch.randn(D, W, dtype=torch.float16)), ValueError, "weight has dtype torch.float16 but x"),
    (dict(weight=torch.randn(D, W, device="meta")), ValueError, "weight has device meta but x"),
    (dict(bias=torch.randn(D + 1)), ValueError, r"bias must have shape \(6,\)"),
    (dict(bias=torch.randn(D, dtype=torch.bfloat16)), ValueError, "bias has dtype torch.bfloat16 but x"),
    (dict(initial_state=torch.randn(2, D, W)), ValueError, r"initial_state must have shape \(2, 6, 3\)"),
    (dict(initial_state=torch.randn(1, D, W - 1)), ValueError, r"initial_state must have shape \(2, 6, 3\)"),
    (dict(initial_state=torch.randn(2, D * (W - 1))), ValueError, "initial_state must be 3-D"),
    (dict(initial_state=torch.randn(2, D, W - 1, dtype=torch.float64)), ValueError,
     "initial_state has dtype torch.float64 but x"),
    (dict(x=torch.randint(0, 3, (2, D, 5)), weight=torch.randint(0, 3, (D, W)), bias=None, initial_state=None),
     TypeError, "x has dtype torch.int64; expected one of"),
])
def test_bad_arguments(over, exc, match):
    with pytest.raises(exc, match=match):
        hierkern.causal_conv1d(**_ok(**over))


def test_bad_activation():
    with pytest.raises(ValueError, match="activation must be None, 'silu' or 'swish', got 'relu'"):
        hierkern.causal_conv1d(**_ok(), activation="relu")


def test_cuda_impl_not_implemented():
    with pytest.raises(NotImplementedError, match="no CUDA C.. kernel for causal_conv1d"):
        hierkern.causal_conv1d(**_ok(), impl="cuda")


def test_float64_needs_reference():
    args = {k: v.double() for k, v in _ok().items()}
    with pytest.raises(TypeError, match="float64 is supported by impl='reference' only"):
        hierkern.causal_conv1d(**args, impl="cpu")
    out = hierkern.causal_conv1d(**args, impl="reference")
    assert out.dtype == torch.float64 and out.shape == (2, D, 5)


def test_unknown_impl():
    with pytest.raises(ValueError, match="impl must be one of"):
        hierkern.causal_conv1d(**_ok(), impl="cudnn")


def test_cpp_op_checks():
    """The C++ op checks its own arguments (callers of torch.ops.hierkern skip the Python wrapper)."""
    a = _ok()
    with pytest.raises(RuntimeError, match=r"weight must be \(dim, width\) with width in \[2, 4\]"):
        torch.ops.hierkern.causal_conv1d_fwd(a["x"], torch.randn(D, 5), None, None, False)
    with pytest.raises(RuntimeError, match=r"initial_state must be \(batch, dim, width - 1\)"):
        torch.ops.hierkern.causal_conv1d_fwd(a["x"], a["weight"], None, torch.randn(2, D, W), False)
    with pytest.raises(RuntimeError, match="grad_final_state must be"):
        torch.ops.hierkern.causal_conv1d_bwd(torch.randn(2, D, 5), torch.randn(2, D, W), a["x"], a["weight"],
                                            None, None, False)
