#!/usr/bin/env python
"""Microbenchmark: hierkern.cached_attention against SDPA on the sliced cache (VAR inference shapes).

    python -m bench.bench_cached_attention [--device cpu|cuda] [--dtype fp32|bf16|fp16]

Both read the first kv_len rows of a preallocated (B, max_len, H, D) cache. SDPA gets the BSHD cache
slices transposed to (B, H, L, D) views (no copies; SDPA's own kernels decide whether to copy). Times
are medians of single calls after a warm-up, the two timed round-robin; ratio = SDPA time / hierkern
time (> 1: hierkern faster).
"""
import argparse

import torch
import torch.nn.functional as F

import hierkern
from bench.common import default_device, interleaved_medians

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--dtype", default="fp32", choices=DTYPES)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    dtype, dev = DTYPES[args.dtype], args.device
    B, H, D, max_len = 2, 16, 64, 2304
    cache = hierkern.KVCache(B, max_len, H, D, dtype=dtype, device=dev)
    cache.append(torch.randn(B, max_len, H, D, device=dev, dtype=dtype),
                 torch.randn(B, max_len, H, D, device=dev, dtype=dtype))
    print(f"device {dev}, {args.dtype}, B={B} H={H} D={D}, threads {torch.get_num_threads()}")
    print(f"{'q_len':>5} {'kv_len':>6} {'hierkern ms':>12} {'SDPA ms':>9} {'ratio':>6} {'GFLOP/s':>8}")
    for q_len in (1, 16, 256):
        for kv_len in (680, 1360, 2240):
            q = torch.randn(B, q_len, H, D, device=dev, dtype=dtype)
            k = cache.k_cache[:, :kv_len].transpose(1, 2)
            v = cache.v_cache[:, :kv_len].transpose(1, 2)
            qt = q.transpose(1, 2)
            med = interleaved_medians({
                "hierkern": lambda: hierkern.cached_attention(q, cache.k_cache, cache.v_cache, kv_len),
                "sdpa": lambda: F.scaled_dot_product_attention(qt, k, v)}, dev, args.reps)
            hk, sd = med["hierkern"], med["sdpa"]
            flops = 4 * B * H * q_len * kv_len * D
            print(f"{q_len:>5} {kv_len:>6} {hk * 1e3:>12.3f} {sd * 1e3:>9.3f} {sd / hk:>6.2f} {flops / hk / 1e9:>8.1f}")


if __name__ == "__main__":
    main()
