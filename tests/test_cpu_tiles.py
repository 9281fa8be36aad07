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

