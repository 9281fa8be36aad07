"""pytest-benchmark microbenchmarks of next_scale_attention and its peers (same cases as
`python -m bench.report`, which adds ratios, targets, JSON and a plot).

Benchmarks in one group (config + op) are comparable: hierkern, SDPA with a dense bool mask,
compiled flex_attention with a BlockMask (compile excluded), the per-scale SDPA loop and the eager
reference. extra_info carries useful FLOPs, TFLOP/s (from the median) and peak MB.
"""
import pytest
import torch

from bench import common


def _rounds(device, quick):
    return 20 if device == "cuda" else (3 if quick else 2)


def _timed(fn, device):
    if device == "cuda":
        def f():
            fn()
            torch.cuda.synchronize()
        return f
    return fn


@pytest.mark.parametrize("op", common.OPS)
@pytest.mark.parametrize("peer", common.PEERS)
def test_next_scale(benchmark, cfg, op, peer, device, case_cache, request):
    case = case_cache(cfg, device)
    quick = not request.config.getoption("--hk-full")
    policy = common.policy_for(device, quick)
    row, fn, _ = common.prepare(case, peer, op, policy, memory=True)
    if fn is None:
        if peer == "flex" and op == "fwd+bwd" and common.flex_backward_error(device):
            pytest.skip(f"flex n/a: {row['error']}")
        pytest.fail(f"{peer} {op} failed on {cfg.name}: {row['error']}")
    benchmark.group = f"{cfg.id} {op}"
    benchmark.name = f"{peer}"
    benchmark.extra_info.update(config=cfg.name, op=op, peer=row["label"], flops=row["flops"],
                                peak_mb=row["peak_mb"], compile_s=row.get("compile_s"))
    benchmark.pedantic(_timed(fn, device), rounds=_rounds(device, quick), iterations=1,
                       warmup_rounds=1 if device == "cuda" else 0)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        med = stats.stats.median
        benchmark.extra_info["tflops"] = row["flops"] / med / 1e12 if med else None


def test_flex_block_mask(benchmark, cfg, device, case_cache):
    """create_block_mask on its own (the cost a FlexAttention user pays per schedule/length)."""
    case = case_cache(cfg, device)
    benchmark.group = f"{cfg.id} mask"
    benchmark.extra_info.update(config=cfg.name)
    common.make_block_mask(cfg, device)  # warm-up
    benchmark.pedantic(lambda: (common.make_block_mask(cfg, device), common.sync(device)),
                       rounds=5 if device == "cuda" else 3, iterations=1)
