"""The C++ kernel with tiny tiles (set through its tuning knobs, read once at load) so that short test
sequences still cross many tile boundaries: full, partial and skipped key tiles, split scales; and
with each forward schedule forced (per (batch, kv head) pair, per query tile)."""
import os
import subprocess
import sys

import pytest

SCRIPT = """
import torch, hierkern
from hierkern.testing import assert_close_rel, make_qkv, poisoned_outputs
torch.manual_seed(0)
for sizes in [(1, 3, 7, 130, 257), (1, 4, 9, 16, 25, 36), (1,) * 7, (50,)]:
    lay = hierkern.ScaleLayout.from_sizes(sizes)
    for pattern in ("causal", "diagonal"):
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = make_qkv(2, lay.L, 4, 2, 64, dtype, "cpu", "bhsd", requires_grad=True)
            g = torch.randn(2, lay.L, 4, 64).to(dtype)
            with poisoned_outputs():
                o = hierkern.next_scale_attention(q, k, v, lay, pattern, impl="cpu")
                got = (o, *torch.autograd.grad(o, (q, k, v), g))
            def ref(dt):
                leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
                r = hierkern.next_scale_attention(*leaves, lay, pattern, impl="reference")
                return (r, *torch.autograd.grad(r, leaves, g.to(dt)))
            for name, a, b, c in zip("o dq dk dv".split(), got, ref(torch.float64), ref(dtype)):
                assert_close_rel(f"{sizes}/{pattern}/{dtype}/{name}", a, b, c)
print("OK")
"""


@pytest.mark.parametrize("bq,bk,schedule", [(16, 32, "pairs"), (8, 24, "tiles")])
def test_cpu_kernel_tiny_tiles(bq, bk, schedule):
    env = dict(os.environ, HIERKERN_CPU_BLOCK_Q=str(bq), HIERKERN_CPU_BLOCK_K=str(bk),
               HIERKERN_CPU_FWD_SCHEDULE=schedule)
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr[-4000:]


@pytest.mark.parametrize("D", [32, 48, 64, 80, 96])
def test_cpu_register_block_tails(D):
    """Single-scale layouts of 1..40 tokens and a few longer ones: every query-tile height and key
    panel count the CPU GEMMs split into register blocks (6 rows x up to 4 panels of 16 keys, a 1-3
    remainder merged and split evenly), forward and backward, against the float64 reference; the
    head dims give the narrow GEMMs 2 to 6 panels."""
    from hierkern.testing import assert_close_rel, make_qkv, poisoned_outputs
    import hierkern
    import torch
    torch.manual_seed(0)
    for n in list(range(1, 41)) + [49, 65, 81, 97, 113, 127, 128, 129, 145]:
        lay = hierkern.ScaleLayout.from_sizes([n])
        q, k, v = make_qkv(1, n, 2, 1, D, torch.float32, "cpu", requires_grad=True)
        g = torch.randn(1, n, 2, D)
        with poisoned_outputs():
            o = hierkern.next_scale_attention(q, k, v, lay, "diagonal", impl="cpu")
            got = (o, *torch.autograd.grad(o, (q, k, v), g))
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        r = hierkern.next_scale_attention(*leaves, lay, "diagonal", impl="reference")
        want = (r, *torch.autograd.grad(r, leaves, g.double()))
        leaves32 = [t.detach().requires_grad_() for t in (q, k, v)]
        r32 = hierkern.next_scale_attention(*leaves32, lay, "diagonal", impl="reference")
        low = (r32, *torch.autograd.grad(r32, leaves32, g))
        for name, a, b, c in zip("o dq dk dv".split(), got, want, low):
            assert_close_rel(f"n={n}/D={D}/{name}", a, b, c)
