#!/usr/bin/env python
"""Microbenchmark: hierkern.ssd_scan (C++ CPU kernel) against the two eager PyTorch forms of the
spec at M-VAR-like shapes scaled for a small CPU (Mamba-2 layer: headdim 64, dstate 64, one group,
the VAR 256px sequence of 680 tokens).

    python -m bench.bench_ssd_scan [--b 2] [--l 680] [--h 8] [--p 64] [--n 64] [--g 1]
        [--chunk 64] [--dtype fp32|bf16] [--reps 5] [--threads N] [--out bench/results/ssd_scan_cpu.json]

Peers, on the same inputs (D, z, dt_bias, dt_softplus):
- chunked: hierkern's chunked SSD reference (the matrix form, Q = --chunk), batched einsums.
- sequential: hierkern's sequential reference, one step at a time.
Times are medians of single calls after a warm-up; ratio = peer time / hierkern time (> 1: hierkern
faster). "fwd+bwd" runs the forward and the backward of sum(out * g) w.r.t. every tensor input.
"""
import argparse
import json
import os
import time

import torch

import hierkern
from bench.common import median_seconds
from hierkern.ops.scan import ssd_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GRADS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")


def make_inputs(b, l, h, p, g, n, dtype):
    return dict(x=torch.randn(b, l, h, p, dtype=dtype), dt=(0.3 * torch.randn(b, l, h) - 1).to(dtype),
                A=-(0.2 + torch.rand(h)), B=torch.randn(b, l, g, n, dtype=dtype),
                C=torch.randn(b, l, g, n, dtype=dtype), D=torch.randn(h), z=torch.randn(b, l, h, p, dtype=dtype),
                dt_bias=0.2 * torch.randn(h))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("b", 2), ("l", 680), ("h", 8), ("p", 64), ("n", 64), ("g", 1), ("chunk", 64)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--dtype", default="fp32", choices=DTYPES)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--peer-reps", type=int, default=3, help="timed calls of the eager peers")
    ap.add_argument("--threads", type=int, help="torch / OpenMP threads (default: torch's)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    x = make_inputs(args.b, args.l, args.h, args.p, args.g, args.n, dtype)
    g = torch.randn(args.b, args.l, args.h, args.p, dtype=dtype)

    def call(name, inputs):
        kw = dict(D=inputs["D"], z=inputs["z"], dt_bias=inputs["dt_bias"], dt_softplus=True)
        pos = [inputs[k] for k in ("x", "dt", "A", "B", "C")]
        if name == "hierkern":
            return hierkern.ssd_scan(*pos, chunk_size=args.chunk, impl="cpu", **kw)
        if name == "chunked":
            return ssd_reference.ssd_scan_chunked(*pos, chunk_size=args.chunk, **kw)[0]
        return ssd_reference.ssd_scan_sequential(*pos, **kw)[0]

    def fwd(name):
        def f():
            with torch.no_grad():
                return call(name, x)
        return f

    def fwd_bwd(name):
        leaves = {k: (v.detach().requires_grad_() if k in GRADS else v) for k, v in x.items()}
        return lambda: torch.autograd.grad((call(name, leaves) * g).sum(), [leaves[k] for k in GRADS])

    peers = ("hierkern", "chunked", "sequential")
    # useful multiply-adds of the recurrence: state update (2) and output (1) per (token, head, p, n)
    fma = 3 * args.b * args.l * args.h * args.p * args.n
    print(f"ssd_scan CPU, {args.dtype}, b={args.b} l={args.l} h={args.h} p={args.p} n={args.n} g={args.g} "
          f"chunk={args.chunk}, threads {torch.get_num_threads()}")
    print(f"{'op':<8} " + " ".join(f"{p + ' ms':>15}" for p in peers)
          + f" {'chunk/hk':>9} {'seq/hk':>7} {'hk GFLOP/s':>10}")
    rows = []
    for op, make in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        ms = {p: median_seconds(make(p), "cpu", args.reps if p == "hierkern" else args.peer_reps) * 1e3 for p in peers}
        row = {"op": op, **{f"{p}_ms": ms[p] for p in peers},
               "ratio_chunked": ms["chunked"] / ms["hierkern"],
               "ratio_sequential": ms["sequential"] / ms["hierkern"],
               "hierkern_fwd_gflops": 2 * fma / ms["hierkern"] / 1e6 if op == "fwd" else None}
        rows.append(row)
        gf = f"{row['hierkern_fwd_gflops']:>10.1f}" if op == "fwd" else f"{'':>10}"
        print(f"{op:<8} " + " ".join(f"{ms[p]:>15.2f}" for p in peers) +
              f" {row['ratio_chunked']:>9.2f} {row['ratio_sequential']:>7.2f} {gf}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        meta = {k: getattr(args, k) for k in ("b", "l", "h", "p", "n", "g", "chunk", "dtype", "reps", "peer_reps")}
        meta.update(threads=torch.get_num_threads(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
        with open(args.out, "w") as f:
            json.dump({"config": meta, "results": rows}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
