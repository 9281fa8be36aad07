#!/usr/bin/env python
"""Approximate KV reuse: the primitives against the PyTorch composition research code uses, and
MaskedDiffusionLM generation speed / agreement per cache strategy.

    python -m bench.bench_kv_reuse [--device cpu|cuda] [--out bench/results/kv_reuse_cpu.json] [--quick]

1. Primitives, one dLLM-Cache refresh of one layer at LLaDA-like shapes scaled for the device
   (LLaDA-8B: 32 K/V heads x 128, ~1k tokens; CPU: 8 K/V heads, 1024 tokens, 25% refreshed):
   - select+scatter: hierkern.refresh_select + a gather of the selected V rows + hierkern.scatter_kv
     (RoPE on write) vs F.cosine_similarity + topk + gather + rotate-half RoPE in PyTorch + scatter_
     into both caches (what dLLM-Cache / Fast-dLLM code does).
   - attention: hierkern.subset_attention vs SDPA (enable_gqa) of the refreshed queries over the cache.
   Times are medians of single calls after a warm-up, the four timed round-robin; ratio = composition
   time / hierkern time.
2. End to end: MaskedDiffusionLM() (the default model, random weights), batch 1, a 32-token prompt,
   gen_length 256, block_length 32, steps 256, threshold 0.9: tokens/s per strategy (median of
   --rounds round-robin calls over the four strategies; the sweeps below are single calls) and the fraction of
   generated tokens identical to cache="none" (same weights, same prompt, greedy).
3. At gen_length 64 (steps 64): every strategy for both impls (the eager reference too), "dual" and
   "adaptive" over the refresh interval, "adaptive" over ratio.
Random weights make near-uniform logits: confidence rarely passes the threshold (one token per step)
and argmax decisions sit on small margins, so the agreement measured here can be pessimistic (small
K/V drift flips near-ties) or optimistic (a trained model's drift differs) - it is reported as measured.
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

import hierkern
from bench.common import default_device, interleaved_medians, sync
from hierkern.models import MaskedDiffusionLM

CACHE_NAMES = ("none", "prefix", "dual", "adaptive")


def _rope_torch(x, cos, sin, idx):
    c = cos[idx][:, :, None, :]
    s = sin[idx][:, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def bench_primitives(dev, dtype, reps, B=1, L=1024, H=32, Hk=8, D=128, ratio=0.25):
    n = math.ceil(ratio * L)
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=dev, dtype=dtype)  # noqa: E731
    v_new, v_old = mk(B, L, Hk, D), mk(B, L, Hk, D)
    k_cache, v_cache = mk(B, L, Hk, D), mk(B, L, Hk, D)
    k_sel, q_sel = mk(B, n, Hk, D), mk(B, n, H, D)
    inv = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(L, dtype=torch.float64)[:, None] * inv
    cos, sin = ang.cos().to(device=dev, dtype=torch.float32), ang.sin().to(device=dev, dtype=torch.float32)
    bi = torch.arange(B, device=dev)[:, None]

    def composition():
        sim = F.cosine_similarity(v_new.flatten(2), v_old.flatten(2), dim=-1)
        idx = sim.topk(n, dim=1, largest=False).indices
        e = idx[:, :, None, None].expand(B, n, Hk, D)
        v_sel = v_new.gather(1, e)
        k_rot = _rope_torch(k_sel.float(), cos, sin, idx).to(dtype)
        k_cache.scatter_(1, e, k_rot)
        v_cache.scatter_(1, e, v_sel)
        return idx

    def fused():
        idx = hierkern.refresh_select(v_new, v_old, n)
        hierkern.scatter_kv(k_cache, v_cache, idx, k_sel, v_new[bi, idx], cos, sin)
        return idx

    def attn_sdpa():
        return F.scaled_dot_product_attention(q_sel.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                              enable_gqa=True)

    def attn_hk():
        return hierkern.subset_attention(q_sel, k_cache, v_cache)

    ia, ib = composition().sort(dim=1).values, fused()
    if dtype == torch.float32:  # (bf16: F.cosine_similarity rounds to bf16, ties and near-ties differ)
        assert torch.equal(ia, ib), "composition and refresh_select disagree"
    t = interleaved_medians({"select_scatter_torch": composition, "select_scatter_hierkern": fused,
                             "attention_sdpa": attn_sdpa, "attention_hierkern": attn_hk}, dev, reps)
    res = {"shape": dict(B=B, L=L, heads=H, kv_heads=Hk, head_dim=D, refreshed=n, dtype=str(dtype).split(".")[-1]),
           "ms": {k: v * 1e3 for k, v in t.items()},
           "ratio_select_scatter": t["select_scatter_torch"] / t["select_scatter_hierkern"],
           "ratio_attention": t["attention_sdpa"] / t["attention_hierkern"],
           "ratio_total": (t["select_scatter_torch"] + t["attention_sdpa"])
           / (t["select_scatter_hierkern"] + t["attention_hierkern"])}
    return res


def run_generate(m, prompt, impl, **kw):
    sync(str(prompt.device))
    t0 = time.perf_counter()
    out = m.generate(prompt, impl=impl, **kw)
    sync(str(prompt.device))
    return out, time.perf_counter() - t0


def bench_generate(dev, quick, rounds=5):
    torch.manual_seed(0)
    m = MaskedDiffusionLM().to(dev).eval()
    P, gen, sweep_gen = 32, (64 if quick else 256), 64
    prompt = torch.randint(0, m.vocab_size, (1, P), generator=torch.Generator().manual_seed(1)).to(dev)
    rows, ref = [], {}
    for impl in ("kernels", "reference"):  # warm-up (allocator, Triton JIT): one short generation each
        for cache in CACHE_NAMES:
            m.generate(prompt, gen_length=32, block_length=32, steps=4, cache=cache, impl=impl)

    def report(impl, cache, length, runs, **extra):
        out, secs = runs[0][0], statistics.median(r[1] for r in runs)
        if cache == "none":
            ref[(impl, length)] = out
        agree = (out[:, P:] == ref[(impl, length)][:, P:]).float().mean().item()
        row = dict(impl=impl, cache=cache, gen_length=length, **extra, seconds=secs, tokens_per_s=length / secs,
                   agreement=agree, calls_s=[r[1] for r in runs])
        rows.append(row)
        print(f"{impl:>9} {cache:>8} gen {length:>3} {str(extra):>18} {secs:8.2f} s {length / secs:9.1f} tok/s  "
              f"agreement {agree:.3f}", flush=True)

    def settings(length):
        return dict(gen_length=length, block_length=32, steps=length, threshold=0.9)

    def one(impl, cache, length, **extra):
        report(impl, cache, length, [run_generate(m, prompt, impl, **settings(length), cache=cache, **extra)], **extra)

    # The targets: the default settings at gen_length 256, the strategies called round-robin `rounds`
    # times (machine noise drifts over seconds; a strategy's calls in a row would each see another
    # load), median per strategy.
    runs = {cache: [] for cache in CACHE_NAMES}
    for _ in range(rounds):
        for cache in CACHE_NAMES:
            runs[cache].append(run_generate(m, prompt, "kernels", **settings(gen), cache=cache))
    for cache in CACHE_NAMES:
        report("kernels", cache, gen, runs[cache])
    # sweeps (and the eager reference) at gen_length 64: this CPU is shared, full runs take minutes
    for impl in ("kernels", "reference"):
        for cache in CACHE_NAMES:
            one(impl, cache, sweep_gen)
    for interval in (1, 2, 4):
        one("kernels", "dual", sweep_gen, interval=interval)
        one("kernels", "adaptive", sweep_gen, interval=interval)
    for ratio in (0.0, 0.1, 0.5, 1.0):
        one("kernels", "adaptive", sweep_gen, ratio=ratio)
    return dict(setup=dict(model="MaskedDiffusionLM() default (width 128, depth 4, heads 4, kv_heads 2, vocab 256)",
                           batch=1, prompt=P, block_length=32, steps="= gen_length", threshold=0.9,
                           ratio_default=0.25, interval_default=None), rows=rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5, help="round-robin calls per strategy at gen_length 256")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = args.device
    result = {"device": torch.cuda.get_device_name() if dev == "cuda" else "CPU", "threads": torch.get_num_threads(),
              "primitives": []}
    shapes = [dict()] if dev == "cpu" else [dict(B=4, L=2048, H=32, Hk=32)]
    for dtype in (torch.float32, torch.bfloat16):
        for shape in shapes:
            r = bench_primitives(dev, dtype, args.reps, **shape)
            result["primitives"].append(r)
            print(json.dumps(r), flush=True)
    result["generate"] = bench_generate(dev, args.quick, args.rounds)
    g = {(r["impl"], r["cache"]): r for r in result["generate"]["rows"]}  # the first row of each pair
    g = {key: next(r for r in result["generate"]["rows"] if (r["impl"], r["cache"]) == key) for key in g}
    result["targets"] = {
        "select_scatter_vs_torch_fp32": result["primitives"][0]["ratio_select_scatter"],
        "dual_vs_none_tokens_per_s": g[("kernels", "dual")]["tokens_per_s"] / g[("kernels", "none")]["tokens_per_s"],
    }
    print(json.dumps(result["targets"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
