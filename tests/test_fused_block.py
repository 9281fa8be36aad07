"""hierkern::bias_gelu_fwd / _bwd, adaln_norm_fwd / _bwd, gated_residual_fwd / _bwd and
cross_entropy_fwd / _bwd (the next-scale models' fused pieces, hierkern/models/_fused.py) against
float64 references, forward and backward: sizes off the 8-lane vectors and the 64-row reduction chunks, one row, one channel, one
class, strided scale / shift / bias / targets; sums independent of the thread count; bad input;
opcheck; the wrappers' choice of path."""
import re

import pytest
import torch
import torch.nn.functional as F

from hierkern import _backend
from hierkern.models import _fused
from hierkern.testing import assert_close_rel, poisoned_outputs

pytestmark = pytest.mark.skipif(not _backend.has_compiled_ops(), reason="hierkern._C not built")


def _bias_gelu_ref(h, bias):
    return F.gelu(h + bias, approximate="tanh")


def _adaln_ref(x, scale, shift, eps):
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (scale + 1) + shift


def _grads(fn, inputs, grad):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, grad)


def _check(name, fn, ref, inputs, grad):
    """fn (float32) against ref in float64 and in float32, output and every input gradient."""
    with poisoned_outputs():
        out, grads = _grads(fn, inputs, grad)
    out64, grads64 = _grads(ref, [t.double() for t in inputs], grad.double())
    out32, grads32 = _grads(ref, inputs, grad)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert_close_rel(name, out, out64, out32)
    for i, (g, g64, g32) in enumerate(zip(grads, grads64, grads32)):
        assert g.shape == inputs[i].shape
        assert_close_rel(f"{name} grad {i}", g, g64, g32)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 13), (2, 65, 40), (1, 130, 1030), (4, 9)])
def test_bias_gelu_matches_float64(shape):
    g = torch.Generator().manual_seed(sum(shape))
    h = torch.randn(*shape, generator=g) * 3
    bias = torch.randn(2, shape[-1], generator=g)[1]  # a view with an offset
    grad = torch.randn(*shape, generator=g)
    _check("bias_gelu", _fused.bias_gelu, _bias_gelu_ref, [h, bias], grad)


def test_bias_gelu_extremes():
    # saturated tails (exp clamped), exactly zero, and values around the curve's minimum
    h = torch.tensor([[-200.0, -30.0, -9.0, -0.75, 0.0, 1e-6, 0.75, 9.0, 30.0, 200.0]])
    bias = torch.zeros(10)
    _check("bias_gelu extremes", _fused.bias_gelu, _bias_gelu_ref, [h, bias], torch.ones_like(h))


@pytest.mark.parametrize("B,L,C", [(1, 1, 1), (2, 5, 7), (3, 130, 257), (2, 64, 256), (1, 3, 8)])
def test_adaln_norm_matches_float64(B, L, C):
    g = torch.Generator().manual_seed(B * 1000 + L + C)
    x = torch.randn(B, L, C, generator=g) * 2 + 0.5
    ada = torch.randn(B, 1, 6, C, generator=g)  # scale / shift as the block's strided unbind views
    scale, shift = ada[:, :, 2], ada[:, :, 4]
    grad = torch.randn(B, L, C, generator=g)
    _check("adaln_norm", lambda x, s, t: _fused.adaln_norm(x, s, t, 1e-6),
           lambda x, s, t: _adaln_ref(x, s, t, 1e-6), [x, scale, shift], grad)


def test_adaln_norm_constant_rows_use_eps():
    # a constant row has zero variance: rstd = 1 / sqrt(eps), the output is shift
    x = torch.full((1, 3, 16), 2.5)
    scale, shift = torch.randn(1, 1, 16), torch.randn(1, 1, 16)
    _check("adaln_norm constant", lambda x, s, t: _fused.adaln_norm(x, s, t, 1e-5),
           lambda x, s, t: _adaln_ref(x, s, t, 1e-5), [x, scale, shift], torch.randn(1, 3, 16))


@pytest.mark.parametrize("B,L,C", [(1, 1, 1), (2, 5, 7), (3, 130, 257), (2, 64, 256)])
def test_gated_residual_matches_float64(B, L, C):
    g = torch.Generator().manual_seed(B * 100 + L + C)
    x, y = torch.randn(B, L, C, generator=g), torch.randn(B, L, C, generator=g)
    bias = torch.randn(2, C, generator=g)[1]
    gamma = torch.randn(B, 1, 6, C, generator=g)[:, :, 0]  # a strided unbind view, as the block's
    _check("gated_residual", _fused.gated_residual, lambda x, y, b, t: x + (y + b) * t, [x, y, bias, gamma],
           torch.randn(B, L, C, generator=g))


@pytest.mark.parametrize("R,V", [(1, 1), (3, 7), (130, 1030), (5, 4096), (64, 33)])
def test_cross_entropy_matches_float64(R, V):
    g = torch.Generator().manual_seed(R * 100 + V)
    logits = torch.randn(R, V, generator=g) * 4
    target = torch.randint(0, V, (2, R), generator=g)[1]  # a strided view
    target[0] = V - 1
    _check("cross_entropy", lambda x: _fused.cross_entropy(x, target),
           lambda x: F.cross_entropy(x, target), [logits], torch.tensor(1.7))
    loss, lse = torch.ops.hierkern.cross_entropy_fwd(logits, target)  # per-row losses
    assert_close_rel("cross_entropy rows", loss, F.cross_entropy(logits.double(), target, reduction="none"),
                     F.cross_entropy(logits, target, reduction="none"))
    assert_close_rel("cross_entropy lse", lse, logits.double().logsumexp(1), logits.logsumexp(1))


@pytest.mark.parametrize("R,V", [(1, 1), (3, 7), (130, 1030), (65, 4096)])
@pytest.mark.parametrize("overwrite", [False, True])
def test_cross_entropy_with_bias_matches_float64(R, V, overwrite):
    # the head's bias taken by the fused op (model.loss): z = logits + bias, dbias summed over rows in
    # 64-row chunks (130 and 65 rows: a partial last chunk)
    g = torch.Generator().manual_seed(R * 10 + V)
    logits = torch.randn(R, V, generator=g) * 4
    bias = torch.randn(2, V, generator=g)[1] * 3  # a view with an offset
    target = torch.randint(0, V, (R,), generator=g)
    fused = (lambda x, b: _fused.cross_entropy(x.clone(), target, bias=b, overwrite_logits=True)) if overwrite \
        else (lambda x, b: _fused.cross_entropy(x, target, bias=b))
    _check("cross_entropy bias", fused, lambda x, b: F.cross_entropy(x + b, target), [logits, bias],
           torch.tensor(0.9))
    loss, lse = torch.ops.hierkern.cross_entropy_fwd(logits, target, bias)
    z = logits.double() + bias.double()
    assert_close_rel("cross_entropy bias rows", loss, F.cross_entropy(z, target, reduction="none"),
                     F.cross_entropy(logits + bias, target, reduction="none"))
    assert_close_rel("cross_entropy bias lse", lse, z.logsumexp(1), (logits + bias).logsumexp(1))


def test_cross_entropy_bias_falls_back_outside_the_kernel():
    # float64 logits take F.cross_entropy(logits + bias): same loss and gradients as composing it
    g = torch.Generator().manual_seed(3)
    logits, bias = torch.randn(6, 9, generator=g, dtype=torch.float64), torch.randn(9, generator=g, dtype=torch.float64)
    target = torch.randint(0, 9, (6,), generator=g)
    a = [t.clone().requires_grad_() for t in (logits, bias)]
    b = [t.clone().requires_grad_() for t in (logits, bias)]
    _fused.cross_entropy(a[0], target, bias=a[1]).backward()
    F.cross_entropy((b[0] + b[1]).float(), target).backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


def test_cross_entropy_large_and_masked_logits():
    # logits far from 0 (the max is subtracted) and -inf at classes other than the target
    logits = torch.randn(4, 40) * 50 + 1000
    logits[1, 5:] = float("-inf")
    target = torch.tensor([0, 3, 39, 7])
    _check("cross_entropy large", lambda x: _fused.cross_entropy(x, target),
           lambda x: F.cross_entropy(x, target), [logits], torch.tensor(1.0))


def test_cross_entropy_overwrite_logits_backpropagates_once():
    # the gradient written over the logits equals the out-of-place one; a second backward through the
    # same graph raises instead of reading the overwritten logits
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(9, 6, generator=g, requires_grad=True), torch.randn(5, 6, generator=g)
    target = torch.randint(0, 9, (5,), generator=g)
    grads = []
    for overwrite in (False, True):
        loss = _fused.cross_entropy(x @ w.t(), target, overwrite_logits=overwrite)
        grads.append(torch.autograd.grad(loss, w, retain_graph=True)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()
    opcheck_args = (torch.randn(5), (x @ w.t()).detach(), target, torch.randn(5))
    torch.library.opcheck(torch.ops.hierkern.cross_entropy_bwd_.default, opcheck_args)
    torch.library.opcheck(torch.ops.hierkern.cross_entropy_bwd_.default, opcheck_args + (torch.randn(9),))


def test_parameter_gradients_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(0)
    h, bias, gh = torch.randn(300, 72, generator=g), torch.randn(72, generator=g), torch.randn(300, 72, generator=g)
    x, gx = torch.randn(3, 200, 40, generator=g), torch.randn(3, 200, 40, generator=g)
    scale, shift = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    target = torch.randint(0, 72, (300,), generator=g)
    threads = torch.get_num_threads()

    def run():
        _, mean, rstd = torch.ops.hierkern.adaln_norm_fwd(x, scale, shift, 1e-6)
        _, lse = torch.ops.hierkern.cross_entropy_fwd(h, target, bias)
        return (torch.ops.hierkern.bias_gelu_bwd(gh, h, bias)
                + torch.ops.hierkern.adaln_norm_bwd(gx, x, scale, mean, rstd)
                + torch.ops.hierkern.gated_residual_bwd(gx, x, shift[0], scale)
                + torch.ops.hierkern.cross_entropy_bwd(gh[:, 0], h, target, lse, bias))
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        many = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_input_names_the_argument():
    h, b = torch.randn(4, 8), torch.randn(8)
    x, s = torch.randn(2, 3, 8), torch.randn(2, 8)
    ops = torch.ops.hierkern
    cases = [
        (lambda: ops.bias_gelu_fwd(h.double(), b), "bias_gelu_fwd: h must be float32"),
        (lambda: ops.bias_gelu_fwd(torch.randn(8, 4).t(), b), "bias_gelu_fwd: h must be contiguous"),
        (lambda: ops.bias_gelu_fwd(h, torch.randn(7)), "bias_gelu_fwd: bias must be (h.size(-1),) = (8,)"),
        (lambda: ops.bias_gelu_fwd(h, b.half()), "bias_gelu_fwd: bias must be float32"),
        (lambda: ops.bias_gelu_bwd(torch.randn(4, 7), h, b), "bias_gelu_bwd: grad must have h's shape"),
        (lambda: ops.adaln_norm_fwd(h, s, s, 1e-6), "adaln_norm_fwd: x must be (batch, seq, channels)"),
        (lambda: ops.adaln_norm_fwd(x, torch.randn(2, 7), s, 1e-6), "adaln_norm_fwd: scale must be (batch, channels)"),
        (lambda: ops.adaln_norm_fwd(x, s, torch.randn(1, 8), 1e-6), "adaln_norm_fwd: shift must be (batch, channels)"),
        (lambda: ops.adaln_norm_fwd(x, s, s.double(), 1e-6), "adaln_norm_fwd: shift must be float32"),
        (lambda: ops.adaln_norm_fwd(x.transpose(0, 1), s[:1].expand(3, 8), s[:1].expand(3, 8), 1e-6),
         "adaln_norm_fwd: x must be contiguous"),
        (lambda: ops.adaln_norm_bwd(x, x, s, torch.randn(2, 4), torch.randn(2, 3)),
         "adaln_norm_bwd: mean must be (batch, seq) = (2, 3)"),
        (lambda: ops.adaln_norm_bwd(torch.randn(2, 2, 8), x, s, torch.randn(2, 3), torch.randn(2, 3)),
         "adaln_norm_bwd: grad must have x's shape"),
        (lambda: ops.gated_residual_fwd(x, x[:, :2].contiguous(), s[0], s), "gated_residual_fwd: y must be (batch, seq, "
         "channels) = (2, 3, 8)"),
        (lambda: ops.gated_residual_fwd(x, x, torch.randn(7), s), "gated_residual_fwd: bias must be (channels,) = (8,)"),
        (lambda: ops.gated_residual_fwd(x, x, s[0], s[:1]), "gated_residual_fwd: gamma must be (batch, channels)"),
        (lambda: ops.gated_residual_fwd(x, x.transpose(1, 2).contiguous().transpose(1, 2), s[0], s),
         "gated_residual_fwd: y must be contiguous"),
        (lambda: ops.gated_residual_bwd(h, x, s[0], s), "gated_residual_bwd: grad must be (batch, seq, channels)"),
        (lambda: ops.cross_entropy_fwd(h, torch.tensor([0, 1, 8, 2])), "cross_entropy_fwd: target[2] = 8 is not a "
         "class index in [0, 8)"),
        (lambda: ops.cross_entropy_fwd(h, torch.tensor([0, 1, -1, 2])), "target[2] = -1 is not a class index"),
        (lambda: ops.cross_entropy_fwd(h, torch.zeros(4, dtype=torch.int32)), "target must be an int64 CPU tensor"),
        (lambda: ops.cross_entropy_fwd(h, torch.zeros(3, dtype=torch.long)), "target must be (rows,) = (4,)"),
        (lambda: ops.cross_entropy_fwd(x, torch.zeros(2, dtype=torch.long)), "logits must be contiguous (rows, classes)"),
        (lambda: ops.cross_entropy_fwd(h.t(), torch.zeros(8, dtype=torch.long)), "logits must be contiguous"),
        (lambda: ops.cross_entropy_fwd(h.double(), torch.zeros(4, dtype=torch.long)), "logits must be float32"),
        (lambda: ops.cross_entropy_bwd(torch.randn(3), h, torch.zeros(4, dtype=torch.long), torch.randn(4)),
         "cross_entropy_bwd: grad_loss must be (rows,) = (4,)"),
        (lambda: ops.cross_entropy_bwd(torch.randn(4), h, torch.zeros(4, dtype=torch.long), torch.randn(4, 1)),
         "cross_entropy_bwd: lse must be (rows,) = (4,)"),
        (lambda: ops.cross_entropy_fwd(h, torch.zeros(4, dtype=torch.long), torch.randn(7)),
         "cross_entropy_fwd: bias must be (classes,) = (8,)"),
        (lambda: ops.cross_entropy_fwd(h, torch.zeros(4, dtype=torch.long), b.double()),
         "cross_entropy_fwd: bias must be float32"),
        (lambda: ops.cross_entropy_bwd_(torch.randn(4), h.clone(), torch.zeros(4, dtype=torch.long), torch.randn(4),
                                        torch.randn(1, 8)), "cross_entropy_bwd_: bias must be (classes,) = (8,)"),
    ]
    for call, msg in cases:
        with pytest.raises(RuntimeError, match=re.escape(msg)):
            call()


def test_opcheck():
    ops = torch.ops.hierkern
    h, b = torch.randn(2, 5, 24, requires_grad=True), torch.randn(24, requires_grad=True)
    torch.library.opcheck(ops.bias_gelu_fwd.default, (h, b))
    torch.library.opcheck(ops.bias_gelu_bwd.default, (torch.randn(2, 5, 24), h.detach(), b.detach()))
    x = torch.randn(2, 5, 24, requires_grad=True)
    s, t = torch.randn(2, 24, requires_grad=True), torch.randn(2, 24, requires_grad=True)
    torch.library.opcheck(ops.adaln_norm_fwd.default, (x, s, t, 1e-6))
    _, mean, rstd = ops.adaln_norm_fwd(x.detach(), s.detach(), t.detach(), 1e-6)
    torch.library.opcheck(ops.adaln_norm_bwd.default, (torch.randn(2, 5, 24), x.detach(), s.detach(), mean, rstd))
    y, b, gam = torch.randn(2, 5, 24, requires_grad=True), torch.randn(24, requires_grad=True), torch.randn(2, 24)
    torch.library.opcheck(ops.gated_residual_fwd.default, (x, y, b, gam.requires_grad_()))
    torch.library.opcheck(ops.gated_residual_bwd.default, (torch.randn(2, 5, 24), y.detach(), b.detach(),
                                                           gam.detach()))
    logits, target = torch.randn(6, 11, requires_grad=True), torch.randint(0, 11, (6,))
    torch.library.opcheck(ops.cross_entropy_fwd.default, (logits, target))
    _, lse = ops.cross_entropy_fwd(logits.detach(), target)
    torch.library.opcheck(ops.cross_entropy_bwd.default, (torch.randn(6), logits.detach(), target, lse))
    bias = torch.randn(11, requires_grad=True)
    torch.library.opcheck(ops.cross_entropy_fwd.default, (logits, target, bias))
    _, lse = ops.cross_entropy_fwd(logits.detach(), target, bias.detach())
    torch.library.opcheck(ops.cross_entropy_bwd.default, (torch.randn(6), logits.detach(), target, lse, bias.detach()))


def test_wrappers_fuse_only_what_the_kernels_take(monkeypatch):
    calls = []
    real = _fused.call_op
    monkeypatch.setattr(_fused, "call_op", lambda op, *a, **k: calls.append(op) or real(op, *a, **k))
    x, s = torch.randn(2, 4, 8), torch.randn(2, 1, 8)
    _fused.adaln_norm(x, s, s, 1e-6)
    _fused.bias_gelu(x, s[0, 0])
    _fused.cross_entropy(x[0], torch.zeros(4, dtype=torch.long))
    _fused.gated_residual(x, x, s[0, 0], s)
    assert calls == [torch.ops.hierkern.adaln_norm_fwd, torch.ops.hierkern.bias_gelu_fwd,
                     torch.ops.hierkern.cross_entropy_fwd, torch.ops.hierkern.gated_residual_fwd]
    calls.clear()
    per_token = torch.randn(2, 4, 8)  # ACDiT-style per-token modulation: composed in PyTorch
    torch.testing.assert_close(_fused.adaln_norm(x, per_token, s, 1e-6), _adaln_ref(x, per_token, s, 1e-6))
    torch.testing.assert_close(_fused.bias_gelu(x.double(), s[0, 0].double()),
                               _bias_gelu_ref(x.double(), s[0, 0].double()))
    _fused.bias_gelu(x.transpose(1, 2), torch.randn(4))  # strided h: composed
    target = torch.zeros(4, dtype=torch.long)
    torch.testing.assert_close(_fused.cross_entropy(x[0].double(), target), F.cross_entropy(x[0].float(), target))
    torch.testing.assert_close(_fused.gated_residual(x, x, s[0, 0], per_token), x + (x + s[0, 0]) * per_token)
    assert calls == []
