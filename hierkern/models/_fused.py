"""Fused pieces of the next-scale models' impl="kernels" path besides attention: the AdaLN
LayerNorm-and-modulate, bias + tanh-GELU after the MLP's bias-free first GEMM and the gated residual add
of a sub-layer's bias-free output projection (one C++ pass forward and one backward each,
hierkern::adaln_norm_fwd / _bwd, bias_gelu_fwd / _bwd and gated_residual_fwd / _bwd in
csrc/cpu/fused_block.cpp, where PyTorch runs a LayerNorm, a multiply and an add (five kernels
backward), or an addmm that first copies the broadcast bias and a GELU that costs ~13x an add here),
and the training loss's cross-entropy (hierkern::cross_entropy_fwd / _bwd, csrc/cpu/cross_entropy.cpp:
no (R, V) log-probabilities, one pass over the logits each way).

These are model internals, not public ops. The fused kernels exist for CPU float32 only; on other
devices and dtypes, for per-token modulation (ACDiT's per-block timesteps) and without hierkern._C the
functions compute the same math with the PyTorch ops impl="reference" uses. Forward and backward
agree with that composition to float32 rounding (tests/test_fused_block.py).
"""
import torch
import torch.nn.functional as F

from .. import _backend
from .._autograd import below_autograd, call_op, dispatch

_COMPILED = _backend.has_compiled_ops()


def _bias_gelu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _bias_gelu_backward(ctx, grad):
    h, bias = ctx.saved_tensors
    # autograd may hand over an expanded or strided gradient; the kernel reads contiguous rows
    return dispatch(_BIAS_GELU_BWD_OP, _BIAS_GELU_BWD, grad.contiguous(), h, bias)


def _adaln_setup(ctx, inputs, output):
    x, scale, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _adaln_backward(ctx, grad, _grad_mean, _grad_rstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dscale, dshift = dispatch(_ADALN_BWD_OP, _ADALN_BWD, grad.contiguous(), x, scale, mean, rstd)
    return dx, dscale, dshift, None


def _gated_setup(ctx, inputs, output):
    _, y, bias, gamma = inputs
    ctx.save_for_backward(y, bias, gamma)


def _gated_backward(ctx, grad):
    y, bias, gamma = ctx.saved_tensors
    grad = grad.contiguous()
    dy, dbias, dgamma = dispatch(_GATED_BWD_OP, _GATED_BWD, grad, y, bias, gamma)
    return grad, dy, dbias, dgamma


def _ce_setup(ctx, inputs, output):
    logits, target, bias = inputs
    ctx.save_for_backward(logits, target, output[1], bias)
    ctx.mark_non_differentiable(output[1])
    ctx.logits_overwritten = False


def _ce_backward(ctx, grad_loss, _grad_lse):
    logits, target, lse, bias = ctx.saved_tensors
    dlogits, dbias = dispatch(_CE_BWD_OP, _CE_BWD, grad_loss, logits, target, lse, bias)
    return dlogits, None, (dbias if bias is not None else None)


def _ce_backward_overwrite(ctx, grad_loss, _grad_lse):
    if ctx.logits_overwritten:
        raise RuntimeError("hierkern cross_entropy(overwrite_logits=True): its backward writes the gradient over "
                           "the logits, so it runs once; use overwrite_logits=False to backpropagate twice")
    logits, target, lse, bias = ctx.saved_tensors
    dbias = dispatch(_CE_BWD__OP, _CE_BWD_, grad_loss, logits, target, lse, bias)
    ctx.logits_overwritten = True
    return logits, None, (dbias if bias is not None else None)


if _COMPILED:
    # the backward ops, and their eager shortcut below the Autograd key (hierkern/_autograd.py)
    _CE = torch.ops.hierkern.cross_entropy_fwd
    _CE_BWD_OP = torch.ops.hierkern.cross_entropy_bwd
    _CE_BWD__OP = torch.ops.hierkern.cross_entropy_bwd_
    _BIAS_GELU = torch.ops.hierkern.bias_gelu_fwd
    _ADALN = torch.ops.hierkern.adaln_norm_fwd
    _BIAS_GELU_BWD_OP = torch.ops.hierkern.bias_gelu_bwd
    _ADALN_BWD_OP = torch.ops.hierkern.adaln_norm_bwd
    _GATED = torch.ops.hierkern.gated_residual_fwd
    _GATED_BWD_OP = torch.ops.hierkern.gated_residual_bwd
    _CE_BWD, _CE_BWD_, _BIAS_GELU_BWD, _ADALN_BWD, _GATED_BWD = (below_autograd(op) for op in (
        _CE_BWD_OP, _CE_BWD__OP, _BIAS_GELU_BWD_OP, _ADALN_BWD_OP, _GATED_BWD_OP))

    @torch.library.register_fake("hierkern::bias_gelu_fwd")
    def _fake_bias_gelu(h, bias):
        return torch.empty_like(h)

    @torch.library.register_fake("hierkern::bias_gelu_bwd")
    def _fake_bias_gelu_bwd(grad, h, bias):
        return torch.empty_like(h), h.new_empty(h.shape[-1:])

    @torch.library.register_fake("hierkern::adaln_norm_fwd")
    def _fake_adaln(x, scale, shift, eps):
        return torch.empty_like(x), x.new_empty(x.shape[:2]), x.new_empty(x.shape[:2])

    @torch.library.register_fake("hierkern::adaln_norm_bwd")
    def _fake_adaln_bwd(grad, x, scale, mean, rstd):
        return torch.empty_like(x), x.new_empty(scale.shape), x.new_empty(scale.shape)

    @torch.library.register_fake("hierkern::cross_entropy_fwd")
    def _fake_ce(logits, target, bias=None):
        return logits.new_empty(logits.shape[:1]), logits.new_empty(logits.shape[:1])

    def _fake_dbias(logits, bias):
        return logits.new_empty(logits.shape[1:] if bias is not None else (0,))

    @torch.library.register_fake("hierkern::cross_entropy_bwd")
    def _fake_ce_bwd(grad_loss, logits, target, lse, bias=None):
        return torch.empty_like(logits), _fake_dbias(logits, bias)

    @torch.library.register_fake("hierkern::cross_entropy_bwd_")
    def _fake_ce_bwd_(grad_loss, logits, target, lse, bias=None):
        return _fake_dbias(logits, bias)

    @torch.library.register_fake("hierkern::gated_residual_fwd")
    def _fake_gated(x, y, bias, gamma):
        return torch.empty_like(x)

    @torch.library.register_fake("hierkern::gated_residual_bwd")
    def _fake_gated_bwd(grad, y, bias, gamma):
        return torch.empty_like(y), y.new_empty(bias.shape), y.new_empty(gamma.shape)

    torch.library.register_autograd("hierkern::gated_residual_fwd", _gated_backward, setup_context=_gated_setup)
    torch.library.register_autograd("hierkern::cross_entropy_fwd", _ce_backward, setup_context=_ce_setup)
    torch.library.register_autograd("hierkern::bias_gelu_fwd", _bias_gelu_backward, setup_context=_bias_gelu_setup)
    torch.library.register_autograd("hierkern::adaln_norm_fwd", _adaln_backward, setup_context=_adaln_setup)


def _fusable(*tensors):
    return _COMPILED and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def bias_gelu(h, bias):
    """GELU(h + bias, approximate="tanh"); h is x W^T without the bias."""
    if _fusable(h, bias) and h.is_contiguous():
        return call_op(_BIAS_GELU, _bias_gelu_setup, _bias_gelu_backward, h, bias,
                       eager=below_autograd(_BIAS_GELU))
    return F.gelu(h + bias, approximate="tanh")


def mlp_without_bias(seq, x):
    """seq = nn.Sequential(Linear, GELU(approximate="tanh"), Linear) applied to x, without the second
    Linear's bias (gated_residual adds it); the first bias and the GELU fused after the first GEMM."""
    fc1, _, fc2 = seq
    return F.linear(bias_gelu(F.linear(x, fc1.weight), fc1.bias), fc2.weight)


def gated_residual(x, y, bias, gamma):
    """x + (y + bias) * gamma: a block's residual add of its gated sub-layer output, y the output
    projection without its bias. x, y (B, L, C); bias (C,); gamma (B, 1, C) (one gate per sequence)
    or anything broadcasting to x (composed in PyTorch)."""
    if (_fusable(x, y, bias, gamma) and x.dim() == 3 and x.is_contiguous() and y.shape == x.shape
            and y.is_contiguous() and gamma.dim() == 3 and gamma.shape == (x.shape[0], 1, x.shape[2])):
        return call_op(_GATED, _gated_setup, _gated_backward, x, y, bias, gamma[:, 0], eager=below_autograd(_GATED))
    return x + (y + bias) * gamma


def adaln_norm(x, scale, shift, eps):
    """LayerNorm(x) without affine parameters, times (1 + scale), plus shift. x (B, L, C); scale and
    shift (B, 1, C) (one modulation per sequence) or anything broadcasting to x (composed in PyTorch)."""
    if (_fusable(x, scale, shift) and x.dim() == 3 and x.is_contiguous() and scale.dim() == shift.dim() == 3
            and scale.shape == shift.shape == (x.shape[0], 1, x.shape[2])):
        y, _, _ = call_op(_ADALN, _adaln_setup, _adaln_backward, x, scale[:, 0], shift[:, 0], eps,
                          eager=below_autograd(_ADALN))
        return y
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (scale + 1) + shift


def cross_entropy(logits, target, bias=None, overwrite_logits=False):
    """F.cross_entropy(logits + bias, target) (mean over rows) for (R, V) logits, (R,) int64 class
    indices and an optional (V,) bias (that of the linear layer that made the logits, left out of its
    GEMM: the fused op adds it while it reads each row and sums its gradient in the same pass);
    float32 CPU tensors go through the fused op, anything else through F.cross_entropy on float32
    logits (as the models' training step computes it). overwrite_logits: the eager backward writes the
    gradient over the logits instead of a fresh (R, V) buffer, for a caller that owns them
    (model.loss); it then runs once (a second backward raises)."""
    if (_fusable(logits, *(() if bias is None else (bias,))) and logits.dim() == 2 and logits.is_contiguous()
            and target.device.type == "cpu"):
        loss, _ = call_op(_CE, _ce_setup, _ce_backward_overwrite if overwrite_logits else _ce_backward, logits,
                          target, bias, eager=below_autograd(_CE))
        return loss.mean()
    return F.cross_entropy((logits if bias is None else logits + bias).float(), target)


def takes_head_bias(linear):
    """Whether cross_entropy fuses the bias of `linear` (an nn.Linear making the logits): model.loss then
    has the head leave it out of its GEMM (AdaLNHead.bias_deferred)."""
    return linear.bias is not None and _fusable(linear.weight, linear.bias)
