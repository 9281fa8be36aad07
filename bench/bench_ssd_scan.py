#!/usr/bin/env python
"""Microbenchmark: hierkern.ssd_scan against the two eager PyTorch forms of the spec at M-VAR-like
shapes (Mamba-2 layer: headdim 64, dstate 64, one group, the VAR 256px sequence of 680 tokens).

    python -m bench.bench_ssd_scan [--device cpu|cuda] [--b 2] [--l 680 [2240 ...]] [--h 8] [--p 64]
        [--n 64] [--g 1] [--chunk 64] [--dtype fp32|bf16|fp16] [--ops fwd,fwd+bwd] [--bwd-max-l N]
        [--seq-max-l N] [--reps 5] [--peer-reps 3] [--threads N] [--out bench/results/ssd_scan_cpu.json]

hierkern runs impl="cpu" (the C++ kernel) on CPU and impl="triton" (the chunked tensor-core kernels) on
CUDA. Peers, on the same inputs (D, z, dt_bias, dt_softplus):
- chunked: hierkern's chunked SSD reference (the matrix form, Q = --chunk), batched einsums.
- sequential: hierkern's sequential reference, one step at a time (only for l <= --seq-max-l, forward
  only: its autograd graph holds a (b, h, p, n) state per step, gigabytes at the issue shapes).
Times are medians of single calls after a warm-up; ratio = peer time / hierkern time (> 1: hierkern
faster). "fwd+bwd" runs the forward and the backward of sum(out * g) w.r.t. every tensor input, for
l <= --bwd-max-l. Two FLOP rates are reported for hierkern's forward: "rec" counts the recurrence's
useful multiply-adds (3 per (token, head, p, n)), "ssd" the chunked matrix form's multiply-adds as the
Triton kernels run them on tensor cores: per (token, head) Q (n + p) for C B^T and its product with
dt x (full Q x Q tiles, Q = --chunk) and 2 n p for the chunk states and the entering state's output.
"""
import argparse
import json
import os
import time

import torch

import hierkern
from bench.common import fwd_and_fwd_bwd, median_seconds
from hierkern.ops.scan import ssd_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GRADS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")


def make_inputs(b, l, h, p, g, n, dtype, device="cpu"):
    f32 = dict(device=device)
    return dict(x=torch.randn(b, l, h, p, dtype=dtype, **f32), dt=(0.3 * torch.randn(b, l, h, **f32) - 1).to(dtype),
                A=-(0.2 + torch.rand(h, **f32)), B=torch.randn(b, l, g, n, dtype=dtype, **f32),
                C=torch.randn(b, l, g, n, dtype=dtype, **f32), D=torch.randn(h, **f32),
                z=torch.randn(b, l, h, p, dtype=dtype, **f32), dt_bias=0.2 * torch.randn(h, **f32))


def run_length(args, l, dtype, device):
    torch.manual_seed(0)
    x = make_inputs(args.b, l, args.h, args.p, args.g, args.n, dtype, device)
    g = torch.randn(args.b, l, args.h, args.p, dtype=dtype, device=device)
    impl = "cpu" if device == "cpu" else "triton"

    def call(name, inputs):
        kw = dict(D=inputs["D"], z=inputs["z"], dt_bias=inputs["dt_bias"], dt_softplus=True)
        pos = [inputs[k] for k in ("x", "dt", "A", "B", "C")]
        if name == "hierkern":
            return hierkern.ssd_scan(*pos, chunk_size=args.chunk, impl=impl, **kw)
        if name == "chunked":
            return ssd_reference.ssd_scan_chunked(*pos, chunk_size=args.chunk, **kw)[0]
        return ssd_reference.ssd_scan_sequential(*pos, **kw)[0]

    fwd, fwd_bwd = fwd_and_fwd_bwd(call, x, GRADS, g)

    tokens_heads = args.b * l * args.h
    rec_flop = 2 * 3 * tokens_heads * args.p * args.n
    ssd_flop = 2 * tokens_heads * (args.chunk * (args.n + args.p) + 2 * args.n * args.p)
    rows = []
    for op in args.ops.split(","):
        if op == "fwd+bwd" and l > args.bwd_max_l:
            continue
        make = fwd if op == "fwd" else fwd_bwd
        peers = ["hierkern", "chunked"] + (["sequential"] if op == "fwd" and l <= args.seq_max_l else [])
        ms = {p: median_seconds(make(p), device, args.reps if p == "hierkern" else args.peer_reps) * 1e3
              for p in peers}
        row = {"op": op, "l": l, **{f"{p}_ms": ms[p] for p in peers},
               **{f"ratio_{p}": ms[p] / ms["hierkern"] for p in peers if p != "hierkern"}}
        if op == "fwd":
            row["hierkern_rec_tflops"] = rec_flop / ms["hierkern"] / 1e9
            row["hierkern_ssd_tflops"] = ssd_flop / ms["hierkern"] / 1e9
        rows.append(row)
        extra = (f"  rec {row['hierkern_rec_tflops']:.3f} TFLOP/s, ssd {row['hierkern_ssd_tflops']:.3f} TFLOP/s"
                 if op == "fwd" else "")
        print(f"l={l:<5} {op:<8} " + "  ".join(f"{p} {ms[p]:.2f} ms" + (f" ({ms[p] / ms['hierkern']:.2f}x)"
                                                 if p != "hierkern" else "") for p in peers) + extra, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("b", 2), ("h", 8), ("p", 64), ("n", 64), ("g", 1), ("chunk", 64)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--l", type=int, nargs="+", default=[680])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="fp32", choices=DTYPES)
    ap.add_argument("--ops", default="fwd,fwd+bwd")
    ap.add_argument("--bwd-max-l", type=int, default=1 << 30, help="fwd+bwd only for lengths up to this")
    ap.add_argument("--seq-max-l", type=int, default=1 << 30, help="the sequential peer only up to this length")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--peer-reps", type=int, default=3, help="timed calls of the eager peers")
    ap.add_argument("--threads", type=int, help="torch / OpenMP threads (default: torch's)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    print(f"ssd_scan {args.device}, {args.dtype}, b={args.b} l={args.l} h={args.h} p={args.p} n={args.n} "
          f"g={args.g} chunk={args.chunk}, threads {torch.get_num_threads()}", flush=True)
    rows = [r for l in args.l for r in run_length(args, l, dtype, args.device)]
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        meta = {k: getattr(args, k) for k in ("device", "b", "l", "h", "p", "n", "g", "chunk", "dtype", "ops",
                                              "reps", "peer_reps", "bwd_max_l", "seq_max_l")}
        meta.update(threads=torch.get_num_threads(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
        if args.device == "cuda":
            meta["gpu"] = torch.cuda.get_device_name()
        with open(args.out, "w") as f:
            json.dump({"config": meta, "results": rows}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
