"""Benchmark: hierkern.causal_conv1d (the Mamba block's short conv) against eager PyTorch.

    python -m bench.bench_causal_conv1d [--device cpu|cuda] [--reps N] [--out FILE.json]

Shapes: Mamba-2-style (x a channel-last (batch, seqlen, dim).transpose(1, 2) view, width 4, bias, silu)
at M-VAR sequence lengths 680 and 2240 (the 256px and 512px scale schedules). CPU: batch 2, dim 1024,
float32 (scaled for a 2-core machine). CUDA: batch 8, dim 2048, bfloat16.

Peers, measured in the same run (calls interleaved, median time per call, each after a cache flush: bench/common.py):
  conv1d_pad   F.conv1d(x, w[:, None], bias, padding=width - 1, groups=dim)[..., :seqlen] then silu:
               what Mamba code runs without the causal-conv1d package (no conv state in or out).
  reference    hierkern's reference (cat(initial_state, x) + F.conv1d), with the conv state.
ratio = peer time / hierkern time (> 1: hierkern faster). GB/s counts the bytes the op must move
(forward: read x, write out; forward+backward adds read grad_out, read x again, write dx).
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

import hierkern

from bench.common import time_call

SEQLENS = (680, 2240)
WIDTH = 4


def conv1d_pad(x, w, b):
    return F.silu(F.conv1d(x, w.unsqueeze(1), b, padding=w.shape[1] - 1, groups=x.shape[1])[..., :x.shape[2]])


def _peers(impl):
    return {
        "hierkern": lambda x, w, b, s: hierkern.causal_conv1d(x, w, b, s, True, "silu", impl=impl),
        "conv1d_pad": lambda x, w, b, s: conv1d_pad(x, w, b),
        "reference": lambda x, w, b, s: hierkern.causal_conv1d(x, w, b, s, True, "silu", impl="reference"),
    }


def _call(fn, args, op, grad):
    out = fn(*args)
    if op == "fwd+bwd":
        y = out[0] if isinstance(out, tuple) else out
        torch.autograd.backward(y, grad)


def measure(batch, dim, seqlen, dtype, device, impl, reps):
    y = torch.randn(batch, seqlen, dim, device=device, dtype=dtype)
    w = torch.randn(dim, WIDTH, device=device, dtype=dtype) / WIDTH ** 0.5
    b = torch.randn(dim, device=device, dtype=dtype)
    s = torch.randn(batch, dim, WIDTH - 1, device=device, dtype=dtype)
    grad = torch.randn(batch, dim, seqlen, device=device, dtype=dtype)
    rows = []
    for op in ("fwd", "fwd+bwd"):
        need_grad = op == "fwd+bwd"
        leaves = [t.detach().requires_grad_(need_grad) for t in (y, w, b, s)]
        args = (leaves[0].transpose(1, 2), *leaves[1:])
        peers = _peers(impl)
        times = {name: [] for name in peers}
        with torch.set_grad_enabled(need_grad):
            for fn in peers.values():
                _call(fn, args, op, grad)  # warm-up (Triton compile, allocator)
            for _ in range(reps):
                for name, fn in peers.items():
                    times[name].append(time_call(lambda: _call(fn, args, op, grad), device.type))
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        moved = batch * dim * seqlen * dtype.itemsize * (2 if op == "fwd" else 5)
        rows.append({"batch": batch, "dim": dim, "seqlen": seqlen, "width": WIDTH, "dtype": str(dtype), "op": op,
                     "impl": impl, "ms": ms, "gbps": moved / ms["hierkern"] / 1e6,
                     "ratio": {n: ms[n] / ms["hierkern"] for n in ms if n != "hierkern"}})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", help="write the rows as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        batch, dim, dtype, impl = 8, 2048, torch.bfloat16, "triton"
    else:
        batch, dim, dtype, impl = 2, 1024, torch.float32, "cpu"
    rows = []
    print(f"causal_conv1d, {device}, threads {torch.get_num_threads()}, {dtype}, width {WIDTH}, channel-last x, "
          f"bias + silu; median ms (ratio = peer / hierkern)")
    print(f"{'shape':>22} {'op':8} {'hierkern':>9} {'GB/s':>6} {'conv1d_pad':>17} {'reference':>17}")
    for seqlen in SEQLENS:
        for r in measure(batch, dim, seqlen, dtype, device, impl, args.reps):
            rows.append(r)
            ms, ratio = r["ms"], r["ratio"]
            print(f"{f'b{batch} d{dim} L{seqlen}':>22} {r['op']:8} {ms['hierkern']:9.3f} {r['gbps']:6.1f} "
                  f"{ms['conv1d_pad']:9.3f} ({ratio['conv1d_pad']:4.2f}x) {ms['reference']:9.3f} "
                  f"({ratio['reference']:4.2f}x)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
