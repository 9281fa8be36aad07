"""Benchmark: hierkern.axial_attention (column and row attention) against permute + SDPA and the eager
reference, and AxialTransformer sampling with the per-row KV cache against naive recomputation.

    python -m bench.bench_axial [--device cpu|cuda] [--reps N] [--out FILE.json] [--quick]

Shapes (the issue's): (B=8, 64x64, 8 heads, D=64) and (B=4, 128x128, 8 heads, D=64), channel-last
(B, H, W, heads, D) contiguous q, k, v, non-causal, at those batches on every device: bfloat16 on CUDA,
float32 on CPU. `--small-cpu-batch` shrinks the CPU batches to 2 and 1 (a quicker run), but at B=1 the
peer's column permute is free: (B, W) merge into one dimension without a copy, so q, k, v reach SDPA as
strided views and only the output is copied back; it then compares the two attention kernels, not the
permute-based recipe.

Peers, measured in the same run (calls interleaved, median time per call, each after a cache flush: bench/common.py):
  sdpa       the usual way: column attention permutes q, k, v to (B * W, heads, H, D) (reshape copies),
             runs F.scaled_dot_product_attention and permutes the output back to channel-last
             (another copy); row attention passes free (B * H, heads, W, D) views and reshapes back.
  reference  hierkern's reference (permute, explicit matmul / softmax).
ratio = peer time / hierkern time (> 1: hierkern faster). TFLOP/s counts 4 * B * H * W * S * heads * D
(S the axis length) for the forward, 3.5x that for forward+backward.
Sampling: AxialTransformer(impl="kernels", width 128, 4 heads, 2 kv heads, 2 + 2 layers), 3 channels of 256
levels, 16x32 images batch 2 (CPU) / 32x64 batch 4 (CUDA), median of --sample-reps runs each after a
warm-up run: the cache saves the inner decoder's recompute of the row (W-fold work per pixel).
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

import hierkern
from hierkern.models import AxialTransformer

from bench.common import time_call

SHAPES = ((8, 64, 64), (4, 128, 128))
SMALL_CPU_BATCH = {64: 2, 128: 1}
HEADS, HEAD_DIM = 8, 64


def sdpa_axial(q, k, v, axis):
    B, H, W, n, D = q.shape
    if axis == 1:  # columns: (B, W, heads, H, D) copies, then back to channel-last
        qs, ks, vs = (t.permute(0, 2, 3, 1, 4).reshape(B * W, n, H, D) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs)
        return out.view(B, W, n, H, D).permute(0, 3, 1, 2, 4).contiguous()
    qs, ks, vs = (t.reshape(B * H, W, n, D).transpose(1, 2) for t in (q, k, v))  # free views
    out = F.scaled_dot_product_attention(qs, ks, vs)
    return out.transpose(1, 2).reshape(B, H, W, n, D)


def _peers(impl):
    return {
        "hierkern": lambda q, k, v, axis: hierkern.axial_attention(q, k, v, axis, impl=impl),
        "sdpa": sdpa_axial,
        "reference": lambda q, k, v, axis: hierkern.axial_attention(q, k, v, axis, impl="reference"),
    }


def _timed(fn, device):
    return time_call(fn, device.type)  # after a cache flush, as every hierkern benchmark


def measure_attention(B, H, W, dtype, device, impl, reps):
    rows = []
    shape = (B, H, W, HEADS, HEAD_DIM)
    base = [torch.randn(shape, device=device, dtype=dtype) for _ in range(3)]
    grad = torch.randn(shape, device=device, dtype=dtype)
    for axis, name in ((1, "column"), (2, "row")):
        S = H if axis == 1 else W
        for op in ("fwd", "fwd+bwd"):
            need_grad = op == "fwd+bwd"
            q, k, v = (t.detach().requires_grad_(need_grad) for t in base)
            peers = _peers(impl)

            def call(fn):
                out = fn(q, k, v, axis)
                if need_grad:
                    torch.autograd.grad(out, (q, k, v), grad)

            times = {p: [] for p in peers}
            with torch.set_grad_enabled(need_grad):
                for fn in peers.values():
                    call(fn)  # warm-up
                for _ in range(reps):
                    for p, fn in peers.items():
                        times[p].append(_timed(lambda: call(fn), device))
            ms = {p: 1e3 * statistics.median(t) for p, t in times.items()}
            flops = 4.0 * B * H * W * S * HEADS * HEAD_DIM * (3.5 if need_grad else 1.0)
            rows.append({"kind": "attention", "axis": name, "op": op, "B": B, "H": H, "W": W, "heads": HEADS,
                         "D": HEAD_DIM, "dtype": str(dtype), "impl": impl, "ms": ms,
                         "tflops": flops / (ms["hierkern"] * 1e-3) / 1e12,
                         "ratio": {p: ms[p] / ms["hierkern"] for p in ms if p != "hierkern"}})
            r = rows[-1]
            print(f"{name:6} {op:8} B{B} {H}x{W} {r['ms']['hierkern']:9.2f} ms {r['tflops']:6.3f} TF/s  "
                  f"sdpa {ms['sdpa']:9.2f} ({r['ratio']['sdpa']:4.2f}x)  reference {ms['reference']:9.2f} "
                  f"({r['ratio']['reference']:4.2f}x)", flush=True)
    return rows


def measure_sampling(device, reps, image_size, batch):
    torch.manual_seed(0)
    m = AxialTransformer(image_size=image_size, channels=3, levels=256, width=128, heads=4, kv_heads=2,
                         outer_depth=2, inner_depth=2, impl="kernels").to(device).eval()
    times = {"cached": [], "naive": []}
    for it in range(reps + 1):
        for mode, use_cache in (("cached", True), ("naive", False)):
            g = torch.Generator(device=device).manual_seed(it)
            t = _timed(lambda: m.sample(batch, generator=g, use_cache=use_cache), device)
            if it:  # the first round warms up
                times[mode].append(t)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    row = {"kind": "sampling", "image_size": list(image_size), "batch": batch, "width": 128, "outer_depth": 2,
           "inner_depth": 2, "ms": ms, "speedup": ms["naive"] / ms["cached"]}
    print(f"sampling {image_size[0]}x{image_size[1]}x3 batch {batch}: cached {ms['cached']:.0f} ms, naive "
          f"{ms['naive']:.0f} ms ({row['speedup']:.2f}x)", flush=True)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sample-reps", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="the 64x64 shape only")
    parser.add_argument("--small-cpu-batch", action="store_true",
                        help="CPU: batch 2 at 64x64 and 1 at 128x128 instead of the issue's 8 and 4")
    parser.add_argument("--out", help="write the rows as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype, impl = (torch.bfloat16, "triton") if cuda else (torch.float32, "cpu")
    print(f"axial_attention, {device}, threads {torch.get_num_threads()}, {dtype}, heads {HEADS}, D {HEAD_DIM}; "
          f"median ms (ratio = peer / hierkern)")
    rows = []
    for B, H, W in SHAPES[:1] if args.quick else SHAPES:
        rows += measure_attention(SMALL_CPU_BATCH[H] if args.small_cpu_batch and not cuda else B, H, W, dtype, device,
                                  impl, args.reps)
    rows.append(measure_sampling(device, args.sample_reps, (32, 64) if cuda else (16, 32), 4 if cuda else 2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
