"""Times the Triton interval-attention kernels' table configs against their tuning candidates on the
present GPU, and writes the fastest per kernel as a HIERKERN_TRITON_CONFIGS file.

    python -m bench.tune_triton [--out JSON] [--configs-out JSON] [--reps N]   # a lent GPU
    TRITON_INTERPRET=1 python -m bench.tune_triton --device cpu --quick         # the logic, on CPU

Kernels: the forward, dK/dV and dQ of next_scale_attention (hierkern/ops/attention/triton.py), each at
the 16-bit head-dim buckets the GPU benchmarks use (64: VAR / HMAR; 128: Infinity) over the benchmark's
shapes (bf16, B=8, H=16; D=64 at L=680 and 2240, D=128 at L=2240; causal and diagonal). Candidates
are TUNE_CANDIDATES, which tests/static_gpu_check.py compiles for sm_90 without spills. A dK/dV or dQ
candidate is timed as the whole backward (delta, dK/dV, dQ) with the other backward kernel at its
table config, so the three backward launches are measured as a training step runs them.

Time per case: on CUDA, `reps` calls captured in one CUDA graph and replayed (device time: the kernels
alone, not the Python launch path, which bench/profile_cuda.py measures); on CPU (the interpreter,
for tests) the median wall time of `reps` calls. A config's score is its total time over the cases of
its bucket; one whose outputs differ from the table config's beyond bf16 rounding (relative max
error > 2e-2), or are not finite with every fresh allocation NaN-filled, is reported and never
chosen. The chosen config of each (kernel, bucket) is the lowest score, the table's own when
nothing beats it; `--configs-out` gets every choice, so
HIERKERN_TRITON_CONFIGS=<that file> runs with them (bench/gpu_check.sh then repeats the report's
hierkern rows that way, next to the table configs' run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

import hierkern
from hierkern.layouts import VAR_256, VAR_512
from hierkern.ops.attention import tiling
from hierkern.ops.attention.next_scale import PATTERNS
from hierkern.testing import poisoned_outputs

KERNELS = ("fwd", "dkdv", "dq")
MISMATCH_RTOL = 2e-2


def cases(device, quick):
    """(head-dim bucket, [(name, schedule, pattern, B, H)]) for each tuned bucket."""
    if quick:
        return {64: [("tiny causal", (1, 2, 3, 5), "causal", 1, 2)]}
    out = {64: [], 128: []}
    for pattern in ("causal", "diagonal"):
        out[64] += [(f"VAR256 {pattern} L=680", VAR_256, pattern, 8, 16),
                    (f"VAR512 {pattern} L=2240", VAR_512, pattern, 8, 16)]
        out[128] += [(f"VAR512 {pattern} L=2240", VAR_512, pattern, 8, 16)]
    return out


class Case:
    def __init__(self, name, schedule, pattern, B, H, D, device, dtype):
        from hierkern.ops.attention import triton as tk
        self.tk = tk
        self.name, self.pattern = name, PATTERNS[pattern]
        self.layout = hierkern.ScaleLayout(schedule)
        g = torch.Generator().manual_seed(0)
        shape = (B, self.layout.L, H, D)
        self.q, self.k, self.v, self.go = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(4))
        self.offsets = self.layout.offsets_tensor(torch.device(device))
        self.scale = D ** -0.5
        self.out, self.lse = self.fwd()

    def fwd(self):
        bm, _ = self.tk.fwd_blocks(self.q.shape[-1], self.q.dtype, self.q.device)
        tiles = tiling.q_tiles(self.layout.offsets, self.pattern, bm, self.q.device)
        return self.tk.interval_attn_fwd(self.q, self.k, self.v, self.offsets, tiles, self.pattern, 0, self.scale)

    def bwd(self):
        bm, bn = self.tk.bwd_blocks(self.q.shape[-1], self.q.dtype, self.q.device)
        offs = self.layout.offsets
        return self.tk.interval_attn_bwd(self.go, self.q, self.k, self.v, self.out, self.lse, self.offsets,
                                         tiling.q_tiles(offs, self.pattern, bm, self.q.device),
                                         tiling.k_tiles(offs, self.pattern, bn, self.q.device),
                                         self.pattern, 0, self.scale)

    def call(self, kernel):
        return self.fwd if kernel == "fwd" else self.bwd


def time_call(fn, device, reps):
    """Seconds per call (see the module docstring)."""
    if device != "cuda":
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (and the JIT compile) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / reps)
    return best


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def _checked_call(fn):
    """fn()'s outputs, computed with every fresh allocation filled with NaN (an element the kernels
    leave unwritten shows, instead of reading a previous config's correct result from a reused
    block); raises on any non-finite output."""
    with poisoned_outputs():
        out = fn()
    for t in out:
        if not torch.isfinite(t).all():
            raise ValueError("non-finite outputs (unwritten elements or NaN/inf results)")
    return out


def tune(device="cuda", reps=20, quick=False, kernels=KERNELS, log=print, time_limit=None, on_progress=None):
    """(results, choices). time_limit: seconds after which no new (kernel, bucket) starts (the ones not
    started are listed in the log); on_progress(results, choices) runs after each (kernel, bucket)."""
    from hierkern.ops.attention import triton as tk
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    results, choices = [], []
    t0 = time.perf_counter()
    for bucket, specs in cases(device, quick).items():
        built = None
        for kernel in kernels:
            if time_limit is not None and time.perf_counter() - t0 > time_limit:
                log(f"  {kernel} d{bucket}: not started (--time-limit {time_limit:g} s reached)")
                continue
            if built is None:
                built = [Case(name, sched, pat, B, H, bucket, device, dtype) for name, sched, pat, B, H in specs]
            default = {"fwd": tk._fwd_config, "dkdv": tk._dkdv_config, "dq": tk._dq_config}[kernel](
                bucket, dtype, torch.device(device))
            candidates = [default] + [c for c in tk.TUNE_CANDIDATES[kernel].get((bucket, 16), []) if c != default]
            if quick:
                candidates = candidates[:2]
            try:
                refs = [_checked_call(c.call(kernel)) for c in built]
            except Exception as e:  # the table config itself fails here: nothing to compare against
                log(f"  {kernel} d{bucket}: table config failed, kernel skipped: {type(e).__name__}: {e}")
                row = _row(kernel, bucket, tk.config_entry(kernel, bucket, dtype, default), True)
                results.append({**row, "max_rel_err": float("nan"), "error": f"{type(e).__name__}: {e}"})
                continue
            scores = []
            for cfg in candidates:
                entry = tk.config_entry(kernel, bucket, dtype, cfg)
                row = _row(kernel, bucket, entry, cfg == default)
                try:
                    with tk.override_configs([entry]):
                        for case, ref in zip(built, refs):
                            fn = case.call(kernel)
                            got = _checked_call(fn)
                            err = max(rel_err(g, r) for g, r in zip(got, ref))
                            row["max_rel_err"] = max(row["max_rel_err"], err)
                            row["times_ms"][case.name] = time_call(fn, device, reps) * 1e3
                    if row["max_rel_err"] > MISMATCH_RTOL:
                        row["error"] = f"outputs differ from the table config's (rel. error {row['max_rel_err']:.3g})"
                except Exception as e:  # a config that fails to compile or launch is reported, not chosen
                    row["error"] = f"{type(e).__name__}: {e}"
                row["total_ms"] = sum(row["times_ms"].values()) if row["error"] is None else None
                results.append(row)
                if row["total_ms"] is not None:
                    scores.append((row["total_ms"], not row["default"], entry))
                log(f"  {kernel} d{bucket} {_cfg_str(entry)}{' (table)' if row['default'] else ''}: "
                    + (f"{row['total_ms']:.3f} ms" if row["error"] is None else row["error"]))
            if scores:
                choices.append(min(scores, key=lambda s: (s[0], s[1]))[2])
            if on_progress:
                on_progress(results, choices)
    return results, choices


def _row(kernel, bucket, entry, default):
    """One config's result row, before it is measured."""
    return {"kernel": kernel, "head_dim": bucket, "config": entry, "default": default, "times_ms": {},
            "max_rel_err": 0.0, "error": None, "total_ms": None}


def _cfg_str(entry):
    return f"{entry['block_m']}x{entry['block_n']} w{entry['num_warps']} s{entry['num_stages']}"


def table(results):
    lines = ["| kernel | head_dim | config | total ms | vs table | max rel err | note |",
             "|---|---|---|---:|---:|---:|---|"]
    base = {(r["kernel"], r["head_dim"]): r["total_ms"] for r in results if r["default"]}
    for r in results:
        b = base.get((r["kernel"], r["head_dim"]))
        ratio = f"{b / r['total_ms']:.2f}x" if b and r["total_ms"] else "-"
        total = f"{r['total_ms']:.3f}" if r["total_ms"] is not None else "-"
        note = "table" if r["default"] else (r["error"] or "")
        lines.append(f"| {r['kernel']} | {r['head_dim']} | {_cfg_str(r['config'])} | {total} | {ratio} | "
                     f"{r['max_rel_err']:.2g} | {note} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=20, help="calls per timing (CUDA: per graph replay)")
    ap.add_argument("--quick", action="store_true", help="one tiny case and two configs per kernel (tests)")
    ap.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    ap.add_argument("--out", help="write the results (JSON) here")
    ap.add_argument("--configs-out", help="write the chosen configs here, as HIERKERN_TRITON_CONFIGS reads them")
    ap.add_argument("--time-limit", type=float, help="seconds; no (kernel, head_dim) starts after it")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        from hierkern import _backend
        if not _backend.triton_interpreted():
            ap.error("--device cpu runs the Triton kernels under the interpreter: set TRITON_INTERPRET=1")
    print(f"tune_triton: device={args.device} torch={torch.__version__} reps={args.reps}", flush=True)
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter)",
            "torch": torch.__version__, "date": datetime.date.today().isoformat(), "reps": args.reps,
            "quick": args.quick}

    def write(results, choices):  # after every (kernel, bucket): a run cut short keeps what it measured
        if args.out:
            _write_json(args.out, {**meta, "results": results, "chosen": choices, "table": table(results)})
        if args.configs_out:
            _write_json(args.configs_out, choices)

    results, choices = tune(args.device, args.reps, args.quick, args.kernels,
                            log=lambda m: print(m, flush=True), time_limit=args.time_limit, on_progress=write)
    print(table(results))
    print("chosen:", json.dumps(choices))
    return 0


def _write_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
