"""Helpers shared by the selective_scan and ssd_scan tests."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hierkern.testing import assert_close_rel


class OpLog(TorchDispatchMode):
    """Records the name of every op dispatched inside it (which backend a call reached)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def cast_leaves(x, dtype):
    """Detached copies as fresh leaves: everything in float64 (dtype float64), else the originals' dtypes."""
    return {k: None if v is None else (v.detach().to(torch.float64) if dtype == torch.float64
                                       else v.detach().clone()).requires_grad_()
            for k, v in x.items()}


def check_broadcast_grad_out(op, x, names, **flags):
    """op(**x, **flags).sum().backward() on the C++ kernel (it is handed an expanded, stride-0
    grad_out) gives the gradients of the reference, precision-relative to float64."""
    op(**x, **flags, impl="cpu").sum().backward()
    got = {k: v.grad for k, v in x.items()}
    refs = []
    for dtype in (torch.float64, None):
        xr = cast_leaves(x, dtype)
        op(**xr, **flags, impl="reference").sum().backward()
        refs.append({k: v.grad for k, v in xr.items()})
    for k in names:
        assert_close_rel(f"d{k}", got[k], refs[0][k], refs[1][k])
