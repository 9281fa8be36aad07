"""Compiled-Triton properties that only a GPU can show."""
import pytest
import torch

import hierkern

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _variants(fn):
    caches = getattr(fn, "device_caches", None)
    if caches is None:
        pytest.skip("this triton version does not expose JITFunction.device_caches")
    return sum(len(entry[0]) for entry in caches.values())


def test_no_recompile_when_schedule_or_length_changes():
    from hierkern.ops.attention import triton as tk
    kernels = [tk._fwd_kernel, tk._bwd_dkdv_kernel, tk._bwd_dq_kernel, tk._bwd_delta_kernel]
    schedules = [(1, 4, 9, 16), (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), (3, 7, 130, 257), (37,), (1,) * 9]
    counts = None
    for i, sizes in enumerate(schedules):
        lay = hierkern.ScaleLayout.from_sizes(sizes)
        q, k, v = (torch.randn(2, lay.L, 4, 64, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        for pattern in ("causal", "diagonal"):
            hierkern.next_scale_attention(q, k, v, lay, pattern).sum().backward()
        now = [_variants(f) for f in kernels]
        if i == 0:
            counts = now
        assert now == counts, f"schedule {sizes} compiled new kernel variants: {counts} -> {now}"
