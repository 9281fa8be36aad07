#!/usr/bin/env python
"""Microbenchmark: hierkern.selective_scan (C++ CPU kernel, or the CUDA kernel with --device cuda)
against two eager PyTorch scans at M-VAR-like shapes (Mamba-1 layer, dstate 16, the VAR 256px
sequence of 680 tokens).

    python -m bench.bench_selective_scan [--device cpu|cuda] [--b 2] [--d 512] [--n 16] [--l 680 2240]
        [--dtype fp32|bf16] [--ops fwd fwd+bwd] [--reps 5] [--peer-reps 2] [--out FILE.json]
    python -m bench.bench_selective_scan --issue-shapes ...   # b=8, d=2048, n=16, l=680 and 2240

Peers, all on the same inputs (variable B and C, D, z, delta_bias, delta_softplus):
- reference: hierkern's executable spec, one step at a time (exp(dt * A) recomputed per step).
- mamba-style: the eager scan mamba-ssm ships as its reference: exp(dt * A) and dt * B * u for all
  steps materialised up front as (b, d, l, n) tensors, then a Python loop of one multiply-add and
  one contraction per step. Written here from the published algorithm, with broadcasts and bmm
  where mamba-ssm's uses a three-operand einsum (which torch runs about 10x slower on CPU).
Times are medians of single calls after a warm-up; ratio = peer time / hierkern time (> 1: hierkern
faster). "fwd+bwd" runs the forward and the backward of sum(out * g) w.r.t. u, delta, A, B, C, D, z.
The eager peers take seconds per call, so they get --peer-reps calls (default 2), in rounds: each
round runs hierkern --reps / --peer-reps times (rounded up), then every peer once. The mamba-style
scan's backward is left out unless --mamba-bwd is given: autograd turns each step's slice of the
(b, d, l, n) tensors into a full-size gradient buffer, O(l^2 n) memory traffic (minutes a call here).
On CUDA the forward rows also report the achieved HBM bandwidth of the hierkern kernel: the bytes a
scan must move (read u, delta, z, B, C once, write out and the last state) over its time, and that
as a fraction of --peak-tbps (default 4.8, the H200's HBM3e); the target is >= 0.6.
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

import hierkern
from bench.common import fwd_and_fwd_bwd, interleaved_medians

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def mamba_style_scan(u, delta, A, B, C, D, z, delta_bias):
    dtype = u.dtype
    u, delta = u.float(), delta.float()
    dt = F.softplus(delta + delta_bias[:, None])
    decay = torch.exp(dt[..., None] * A[:, None, :])                                 # (b, d, l, n)
    drive = (dt * u)[..., None] * B.float().transpose(1, 2)[:, None]                 # (b, d, l, n)
    x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    Cf = C.float()
    ys = []
    for t in range(u.shape[2]):
        x = decay[:, :, t] * x + drive[:, :, t]
        ys.append(torch.bmm(x, Cf[:, :, t, None])[..., 0])
    y = torch.stack(ys, dim=2) + D[:, None] * u
    return (y * F.silu(z.float())).to(dtype)


def make_inputs(b, d, n, l, dtype):
    return dict(u=torch.randn(b, d, l, dtype=dtype), delta=(0.3 * torch.randn(b, d, l) - 1).to(dtype),
                A=-(0.2 + 2 * torch.rand(d, n)), B=torch.randn(b, n, l, dtype=dtype),
                C=torch.randn(b, n, l, dtype=dtype), D=torch.randn(d), z=torch.randn(b, d, l, dtype=dtype),
                delta_bias=0.2 * torch.randn(d))


def bytes_moved(b, d, n, l, dtype):
    """What a forward scan has to move: u, delta, z read and out written (b, d, l each), variable B and
    C read once (b, n, l each), the float32 last state written."""
    elt = torch.empty((), dtype=dtype).element_size()
    return (4 * b * d * l + 2 * b * n * l) * elt + 4 * b * d * n


def bench_shape(args, l):
    dev, dtype = args.device, DTYPES[args.dtype]
    torch.manual_seed(0)
    x = {k: v.to(dev) for k, v in make_inputs(args.b, args.d, args.n, l, dtype).items()}
    grad_names = ("u", "delta", "A", "B", "C", "D", "z")
    g = torch.randn(args.b, args.d, l, dtype=dtype, device=dev)
    hk_impl = "cpu" if dev == "cpu" else "cuda"

    def call(name, inputs):
        if name == "mamba-style":
            return mamba_style_scan(**inputs)
        return hierkern.selective_scan(**inputs, delta_softplus=True, impl=hk_impl if name == "hierkern" else name)

    fwd, fwd_bwd = fwd_and_fwd_bwd(call, x, grad_names, g)

    peers = ("hierkern", "reference", "mamba-style")
    print(f"selective_scan {dev}, {args.dtype}, b={args.b} d={args.d} n={args.n} l={l}"
          + (f", threads {torch.get_num_threads()}" if dev == "cpu" else f", {torch.cuda.get_device_name()}"))
    print(f"{'op':<8} " + " ".join(f"{p + ' ms':>16}" for p in peers) + f" {'ref/hk':>7} {'mamba/hk':>8}"
          + ("  HBM TB/s  of peak" if dev == "cuda" else ""))
    rows = []
    nan = float("nan")
    for op, make in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        if op not in args.ops:
            continue
        run = [p for p in peers if p == "hierkern" or not (
            p in args.skip_peers or p == "mamba-style" and op == "fwd+bwd" and not args.mamba_bwd)]
        # The eager peers take seconds per call at large shapes and have nothing to warm (no
        # compilation, no autotuning); hierkern runs reps / peer_reps times per round (rounded up).
        warm = [p for p in run if p == "hierkern" or args.peer_warmup]
        rounds = max(1, args.peer_reps)
        sec = interleaved_medians({p: make(p) for p in run}, dev, rounds, warmup=warm,
                                  per_round={"hierkern": max(1, -(-args.reps // rounds))})
        ms = {p: sec[p] * 1e3 if p in sec else nan for p in peers}
        row = {"op": op, "l": l, **{f"{p}_ms": ms[p] for p in peers},
               "ratio_reference": ms["reference"] / ms["hierkern"],
               "ratio_mamba_style": ms["mamba-style"] / ms["hierkern"]}
        line = (f"{op:<8} " + " ".join(f"{ms[p]:>16.2f}" for p in peers) +
                f" {row['ratio_reference']:>7.2f} {row['ratio_mamba_style']:>8.2f}")
        if dev == "cuda" and op == "fwd":
            tbps = bytes_moved(args.b, args.d, args.n, l, dtype) / (ms["hierkern"] * 1e-3) / 1e12
            row.update(bytes=bytes_moved(args.b, args.d, args.n, l, dtype), hbm_tbps=tbps,
                       hbm_fraction=tbps / args.peak_tbps)
            line += f"  {tbps:>8.2f}  {tbps / args.peak_tbps:>7.1%}"
        rows.append(row)
        print(line, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--b", type=int, default=2)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--l", type=int, nargs="+", default=[680])
    ap.add_argument("--issue-shapes", action="store_true", help="b=8, d=2048, n=16, l=680 and 2240 (issue 5)")
    ap.add_argument("--dtype", default="fp32", choices=DTYPES)
    ap.add_argument("--ops", nargs="+", default=["fwd", "fwd+bwd"], choices=("fwd", "fwd+bwd"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--peer-reps", type=int, default=2, help="timed calls of the eager peers")
    ap.add_argument("--no-peer-warmup", dest="peer_warmup", action="store_false",
                    help="time the eager peers without a warm-up call (minutes per call at the issue shapes)")
    ap.add_argument("--skip-peers", nargs="*", default=[], choices=("reference", "mamba-style"))
    ap.add_argument("--mamba-bwd", action="store_true", help="also time the mamba-style scan's backward")
    ap.add_argument("--peak-tbps", type=float, default=4.8, help="HBM peak for the bandwidth fraction (H200)")
    ap.add_argument("--threads", type=int, help="torch / OpenMP threads (default: torch's)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if args.issue_shapes:
        args.b, args.d, args.n, args.l = 8, 2048, 16, [680, 2240]
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for l in args.l:
        rows += bench_shape(args, l)
    if args.out:
        # JSON has no NaN: a peer left out is null.
        rows = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in rows]
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        meta = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
                "b": args.b, "d": args.d, "n": args.n, "l": args.l, "dtype": args.dtype,
                "threads": torch.get_num_threads(), "torch": torch.__version__, "reps": args.reps,
                "peer_reps": args.peer_reps, "peer_warmup": args.peer_warmup,
                "skipped_peers": args.skip_peers, "date": time.strftime("%Y-%m-%d")}
        if args.device == "cuda":
            meta["peak_tbps"] = args.peak_tbps
        with open(args.out, "w") as f:
            json.dump({"config": meta, "results": rows}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
