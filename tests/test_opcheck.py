"""torch.library.opcheck for every op: schema, fake kernel, autograd registration, torch.compile."""
import pytest
import torch

import hierkern
from hierkern.ops.attention import tiling
from hierkern.testing import kernel_backends, make_qkv

LAY = hierkern.ScaleLayout.from_sizes((1, 3, 7, 20))


def _args(device, requires_grad=False):
    q, k, v = make_qkv(2, LAY.L, 4, 2, 32, torch.float32, device, requires_grad=requires_grad)
    return q, k, v, LAY.offsets_tensor(device)


def _temperature(qk_norm, device):
    # the cos-attention prologue's per-head temperature (differentiable), or None
    return torch.tensor([0.5, 1.0, 1.5, 5.0], device=device, requires_grad=True) if qk_norm else None


@pytest.mark.parametrize("pattern", [0, 1])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_opcheck_cpu_ops(pattern, qk_norm):
    q, k, v, off = _args("cpu", requires_grad=True)
    t = _temperature(qk_norm, "cpu")
    torch.library.opcheck(torch.ops.hierkern.interval_attn_fwd.default, (q, k, v, off, pattern, 0, 0.2, t))
    out, lse = torch.ops.hierkern.interval_attn_fwd(q, k, v, off, pattern, 0, 0.2, t)
    g = torch.randn_like(out)
    args = (g, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), off, pattern, 0, 0.2,
            None if t is None else t.detach())
    torch.library.opcheck(torch.ops.hierkern.interval_attn_bwd.default, args)


@pytest.mark.parametrize("impl,device", [b for b in kernel_backends() if b[0] == "triton"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_opcheck_triton_ops(impl, device, qk_norm):
    from hierkern.ops.attention import triton as tk
    q, k, v, off = _args(device, requires_grad=True)
    fbm, _ = tk.fwd_blocks(32, q.dtype, q.device)
    bbm, bbn = tk.bwd_blocks(32, q.dtype, q.device)
    tiles = (tiling.q_tiles(LAY.offsets, 0, fbm, device), tiling.q_tiles(LAY.offsets, 0, bbm, device),
             tiling.k_tiles(LAY.offsets, 0, bbn, device))
    t = _temperature(qk_norm, device)
    torch.library.opcheck(torch.ops.hierkern.interval_attn_fwd_triton.default,
                          (q, k, v, off, *tiles, 0, 0, 0.2, t))
    out, lse = torch.ops.hierkern.interval_attn_fwd_triton(q, k, v, off, *tiles, 0, 0, 0.2, t)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.hierkern.interval_attn_bwd_triton.default,
                          (g, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), off,
                           *tiles[1:], 0, 0, 0.2, None if t is None else t.detach()))


def test_compiles_without_graph_break():
    q, k, v, _ = _args("cpu")
    f = torch.compile(lambda q, k, v: hierkern.next_scale_attention(q, k, v, LAY, impl="cpu"),
                      fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(q, k, v), hierkern.next_scale_attention(q, k, v, LAY, impl="cpu"))


def test_lse_output_is_not_differentiable():
    q, k, v, off = _args("cpu", requires_grad=True)
    out, lse = torch.ops.hierkern.interval_attn_fwd(q, k, v, off, 0, 0, 0.2)
    assert out.requires_grad and not lse.requires_grad
