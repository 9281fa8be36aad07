"""VAR's cos attention (attn_l2_norm; Infinity's cos_attn) as a prologue of the attention kernels:
q_hat = q / |q| * exp(min(t_h, ln 100)), k_hat = k / |k|, softmax scale 1 by default.

The kernels apply the prologue to every q / k tile they load and their backward returns the
gradients with respect to q_hat and k_hat; `backward` here finishes the chain rule (elementwise per
row, O(L * H * D)) to q, k and the per-head temperature."""
import math

import torch

from ... import _backend
from ..._autograd import below_autograd, dispatch

MAX_LOG_MULTIPLIER = math.log(100.0)
NORM_EPS = 1e-12  # F.normalize's clamp on the norm


def check(opname, qk_norm, temperature, q):
    """Validate the qk_norm arguments; return the temperature the kernels take (None when off)."""
    if not isinstance(qk_norm, bool):
        raise TypeError(f"{opname}: qk_norm must be a bool, got {type(qk_norm).__name__}")
    if not qk_norm:
        if temperature is not None:
            raise ValueError(f"{opname}: temperature is only used with qk_norm=True; pass qk_norm=True "
                             f"or drop temperature")
        return None
    if temperature is None:
        raise ValueError(f"{opname}: qk_norm=True needs temperature, a ({q.shape[2]},) float32 tensor "
                         f"of per-head log multipliers")
    if not isinstance(temperature, torch.Tensor):
        raise TypeError(f"{opname}: temperature must be a torch.Tensor, got {type(temperature).__name__}")
    if temperature.shape != (q.shape[2],):
        raise ValueError(f"{opname}: temperature must have shape (heads,) = ({q.shape[2]},), got "
                         f"{tuple(temperature.shape)}")
    if temperature.dtype != torch.float32 and not (q.dtype == torch.float64 == temperature.dtype):
        raise TypeError(f"{opname}: temperature must be float32, got {temperature.dtype}")
    if temperature.device != q.device:
        raise ValueError(f"{opname}: temperature is on {temperature.device} but q is on {q.device}")
    return temperature


def default_scale(qk_norm, head_dim):
    return 1.0 if qk_norm else head_dim ** -0.5


def multiplier(temperature):
    """exp(min(t, ln 100)) per head."""
    return temperature.clamp_max(MAX_LOG_MULTIPLIER).exp()


def reference(q, k, temperature):
    """(q_hat, k_hat) in the inputs' dtype, as VAR computes them (the executable specification). The
    multiplier is computed in float32 as the kernels do (float64 for float64 inputs)."""
    t = temperature.to(torch.promote_types(temperature.dtype, q.dtype))
    qh = torch.nn.functional.normalize(q, dim=-1, eps=NORM_EPS)
    qh = qh * multiplier(t).to(q.dtype)[:, None]
    kh = torch.nn.functional.normalize(k, dim=-1, eps=NORM_EPS)
    return qh, kh


def _normalize_backward(x, g):
    """Gradient of x / max(|x|, eps) given the gradient g of its output (float32 math)."""
    x = x.float()
    g = g.float()
    norm = x.norm(dim=-1, keepdim=True)
    clamped = norm <= NORM_EPS
    inv = 1.0 / norm.clamp_min(NORM_EPS)
    n = x * inv
    grad = (g - n * (n * g).sum(-1, keepdim=True)) * inv
    return torch.where(clamped, g * inv, grad)


if _backend.has_compiled_ops():
    _COS_QK_BWD_OP = torch.ops.hierkern.cos_qk_bwd
    _COS_QK_BWD = below_autograd(_COS_QK_BWD_OP)

    @torch.library.register_fake("hierkern::cos_qk_bwd")
    def _fake_cos_qk_bwd(q, k, temperature, d_qhat, d_khat):
        return torch.empty_like(q), torch.empty_like(k), temperature.new_empty(temperature.shape)


def backward(q, k, temperature, d_qhat, d_khat):
    """(dq, dk, dtemperature) from the gradients with respect to q_hat and k_hat. Float32 CPU tensors
    go through hierkern::cos_qk_bwd (csrc/cpu/cos_qk.cpp: the same math in one pass over the rows);
    everything else runs it here in PyTorch."""
    if (d_khat is not None and _backend.has_compiled_ops()
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (q, k, temperature, d_qhat, d_khat))):
        return dispatch(_COS_QK_BWD_OP, _COS_QK_BWD, q, k, temperature, d_qhat, d_khat)
    return backward_reference(q, k, temperature, d_qhat, d_khat)


def backward_reference(q, k, temperature, d_qhat, d_khat):
    """backward in PyTorch ops (float32 math): the specification of the chain rule."""
    mult = multiplier(temperature.float())[:, None]                     # (H, 1)
    qn = torch.nn.functional.normalize(q.float(), dim=-1, eps=NORM_EPS)
    dq = _normalize_backward(q, d_qhat.float() * mult).to(q.dtype)
    # d q_hat / d t = q_hat where t < ln 100 (the clamp passes the gradient at equality, as torch's).
    dt = (d_qhat.float() * qn).sum(dim=(0, 1, 3)) * mult[:, 0]
    dt = torch.where(temperature <= MAX_LOG_MULTIPLIER, dt, torch.zeros_like(dt)).to(temperature.dtype)
    dk = _normalize_backward(k, d_khat).to(k.dtype) if d_khat is not None else None
    return dq, dk, dt
