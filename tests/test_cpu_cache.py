"""The CPU output cache (csrc/cpu/output_cache.h): outputs of 1 MiB or more keep their memory when
freed, for the next output of their size; bounded by HIERKERN_CPU_CACHE_MB; seen by the profiler.
Users: selective_scan (out; du, ddelta, dz) and the interval attention behind next_scale_attention
(out, packed K/V; dq, dk, dv)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hierkern
from hierkern.ops.scan.reference import selective_scan_reference

pytestmark = pytest.mark.skipif(not hierkern._backend.has_compiled_ops(), reason="needs hierkern._C")

MIB = 2**20


def scan_inputs(l, d=64, b=2, n=4):
    """selective_scan inputs whose output (b, d, l) float32 is b * d * l * 4 bytes."""
    g = torch.Generator().manual_seed(l)
    return dict(u=torch.randn(b, d, l, generator=g), delta=0.1 * torch.rand(b, d, l, generator=g),
                A=-torch.rand(d, n, generator=g), B=torch.randn(b, n, l, generator=g),
                C=torch.randn(b, n, l, generator=g))


def scan(x):
    return hierkern.selective_scan(**x, impl="cpu")


def attention_case():
    """next_scale_attention with a 1 MiB output (1, 1024, 4, 64): its output, and the backward's dq /
    dk / dv, come from the cache."""
    g = torch.Generator().manual_seed(0)
    lay = hierkern.ScaleLayout.from_sizes([1, 7, 120, 896])
    q, k, v = (torch.randn(1, lay.L, 4, 64, generator=g) for _ in range(3))
    run = lambda: hierkern.next_scale_attention(q, k, v, lay, "causal", impl="cpu")  # noqa: E731
    ref = hierkern.next_scale_attention(q.double(), k.double(), v.double(), lay, "causal", impl="reference")
    return run, ref.float()


def scan_case():
    x = scan_inputs(l=2048)  # a 1 MiB output
    return (lambda: scan(x)), selective_scan_reference(**x)


@pytest.mark.parametrize("case", [scan_case, attention_case], ids=["selective_scan", "next_scale_attention"])
def test_freed_output_is_reused_and_fully_rewritten(case):
    run, ref = case()
    hierkern.empty_cpu_cache()
    out = run()
    ptr, nbytes = out.data_ptr(), out.numel() * 4
    assert nbytes >= MIB
    out.fill_(float("nan"))  # poison the block the next output gets
    del out
    # Returned to the system, the block's address would likely go to this allocation of its size.
    blocker = torch.empty(nbytes, dtype=torch.uint8)
    again = run()
    assert again.data_ptr() == ptr and blocker.data_ptr() != ptr
    torch.testing.assert_close(again, ref, rtol=1e-4, atol=1e-4)
    del again
    assert hierkern.empty_cpu_cache() >= nbytes
    assert hierkern.empty_cpu_cache() == 0


def test_small_outputs_bypass_the_cache():
    hierkern.empty_cpu_cache()
    out = scan(scan_inputs(l=64))  # 32 KiB
    del out
    assert hierkern.empty_cpu_cache() == 0


def test_attention_gradients_come_from_the_cache():
    g = torch.Generator().manual_seed(1)
    lay = hierkern.ScaleLayout.from_sizes([1, 7, 120, 896])
    q, k, v = (torch.randn(1, lay.L, 4, 64, generator=g).requires_grad_() for _ in range(3))
    hierkern.empty_cpu_cache()
    out = hierkern.next_scale_attention(q, k, v, lay, "diagonal", impl="cpu")
    out.sum().backward()
    nbytes = out.numel() * 4
    del out
    for t in (q, k, v):
        t.grad = None
    assert hierkern.empty_cpu_cache() >= 4 * nbytes  # out, dq, dk, dv


def test_backward_outputs_are_cached():
    x = {k: v.requires_grad_() for k, v in scan_inputs(l=2048).items()}
    hierkern.empty_cpu_cache()
    out = scan(x)  # alive through the backward, so du and ddelta cannot take its block
    out.sum().backward()
    nbytes = out.numel() * 4
    del out
    for v in x.values():
        v.grad = None
    assert hierkern.empty_cpu_cache() >= 3 * nbytes  # the output, du, ddelta


def test_cached_output_resizes():
    out = scan(scan_inputs(l=2048))
    head = out[0, 0, :8].clone()
    out.resize_(out.numel() * 2)
    assert torch.equal(out[:8], head)


def test_profiler_sees_cached_allocations():
    from torch.profiler import ProfilerActivity, profile
    x = scan_inputs(l=2048)
    scan(x)  # warm: later calls take the block from the cache
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = scan(x)
        nbytes = out.numel() * 4
        del out
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert nbytes in sizes and -nbytes in sizes


def run(script, env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


PRELUDE = """
    import torch, hierkern
    def out_of(l):
        x = dict(u=torch.randn(2, 64, l), delta=torch.rand(2, 64, l), A=-torch.rand(64, 4),
                 B=torch.randn(2, 4, l), C=torch.randn(2, 4, l))
        return hierkern.selective_scan(**x, impl="cpu")
"""


def test_cache_size_zero_turns_it_off():
    r = run(PRELUDE + """
    out = out_of(4096)
    del out
    print("freed", hierkern.empty_cpu_cache())
    """, {"HIERKERN_CPU_CACHE_MB": "0"})
    assert r.returncode == 0, r.stderr
    assert "freed 0" in r.stdout


def test_cache_drops_its_oldest_blocks_beyond_the_cap():
    r = run(PRELUDE + """
    a, b = out_of(4096), out_of(5120)  # 2 MiB and 2.5 MiB: both do not fit under 3 MiB
    del a
    del b
    print("freed", hierkern.empty_cpu_cache())
    """, {"HIERKERN_CPU_CACHE_MB": "3"})
    assert r.returncode == 0, r.stderr
    assert f"freed {2 * 64 * 5120 * 4}" in r.stdout


def test_bad_cache_size_is_refused():
    r = run(PRELUDE + "    out_of(4096)\n", {"HIERKERN_CPU_CACHE_MB": "lots"})
    assert r.returncode != 0
    assert "HIERKERN_CPU_CACHE_MB must be a number of MiB >= 0, got 'lots'" in r.stderr
