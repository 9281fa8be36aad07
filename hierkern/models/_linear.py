"""Linear layers of the generation loops: one (weight, bias) whose row sets of up to ROWS_MAX rows run
through hierkern::packed_linear (csrc/cpu/packed_linear.cpp) and larger ones through F.linear.

A cached diffusion-LM step pushes a 32-row block through every layer. At that size BLAS re-packs the
weight on each call and the layer norm, bias, GELU and residual add are separate passes; the packed
path packs the weight once (per generate call) and does all of it in one call. It is taken for CPU
float32 weights and grad mode off (the op has no backward). The two paths round differently (within
float32 rounding, not bit-equal), so the choice depends only on the row count: the same rows always
take the same path.
"""
import torch
import torch.nn.functional as F

from .. import _backend

# Row sets up to this size take the packed path. The default model's four layers' linears (width
# 128, 2 threads, interleaved with BLAS): 0.74x BLAS's time at 32 rows, 0.67x at 64, 0.75x at 128,
# 0.86x at 192, 0.99x at 288 (where BLAS's own packing is amortised).
ROWS_MAX = 256

if _backend.has_compiled_ops():
    _packed_linear = torch.ops.hierkern.packed_linear.default

    @torch.library.register_fake("hierkern::pack_linear_weight")
    def _fake_pack(weight):
        n, k = weight.shape
        return weight.new_empty(((n + 15) // 16, k, 16))

    @torch.library.register_fake("hierkern::packed_linear")
    def _fake_packed_linear(x, packed, out_features, bias, gelu, residual, norm_weight, norm_bias, eps):
        return x.new_empty((*x.shape[:-1], out_features))


class Linear:
    """weight (N, K) and bias (N,) or None of one layer; `packed` is set when the packed path can serve
    them (CPU float32, hierkern._C built)."""

    __slots__ = ("weight", "bias", "packed")

    def __init__(self, weight, bias, pack=True):
        self.weight, self.bias = weight, bias
        usable = (pack and _backend.has_compiled_ops() and weight.device.type == "cpu"
                  and weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32))
        self.packed = torch.ops.hierkern.pack_linear_weight(weight.detach()) if usable else None

    def __call__(self, x, gelu=False, residual=None, norm=None):
        """residual + act(n(x) W^T + b), act the tanh GELU when gelu, n the layer norm over the last
        dimension with norm = (weight, bias, eps) (a pre-norm block's), else the identity."""
        if (self.packed is not None and x.numel() <= ROWS_MAX * self.weight.shape[1] and x.dtype == torch.float32
                and not torch.is_grad_enabled()):
            nw, nb, eps = norm if norm is not None else (None, None, 0.0)
            return _packed_linear(x, self.packed, self.weight.shape[0], self.bias, gelu, residual, nw, nb, eps)
        if norm is not None:
            x = torch.layer_norm(x, (x.shape[-1],), *norm)
        y = F.linear(x, self.weight, self.bias)
        if gelu:
            y = F.gelu(y, approximate="tanh")
        return y if residual is None else residual + y
