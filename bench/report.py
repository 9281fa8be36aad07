"""Benchmark report for next_scale_attention against its peers, measured in one run.

    python -m bench.report [--device cpu|cuda] [--quick] [--out DIR] [--impl IMPL]

Prints a Markdown table (config, op, impl/peer, median ms, TFLOP/s, peak MB, ratio) and the issue's
target lines (PASS / MISS / N/A), and writes DIR/next_scale_<device>.{json,png,md}
(default DIR: bench/results). Definitions of every column: bench/common.py and bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time

import torch

from . import common
from .common import OPS, PEERS, fmt

HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def environment(device):
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device,
           "torch": torch.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "machine": platform.machine(),
           "processor": platform.processor() or platform.machine(),
           "cache_flush_mib": common.flush_mib()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:  # which code was measured: the kernels change under the benchmarks while they are tuned
        import subprocess
        git = ["git", "-C", os.path.dirname(HERE)]
        env["git_head"] = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True,
                                         text=True, timeout=10).stdout.strip() or None
        env["git_dirty"] = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                                          capture_output=True, text=True, timeout=10).stdout.split()[1::2]
        import hierkern._C as _c
        env["hierkern_C_mtime"] = datetime.datetime.fromtimestamp(os.path.getmtime(_c.__file__)).isoformat(
            timespec="seconds")
    except Exception:  # noqa: BLE001 - informational only
        pass
    if os.environ.get("HIERKERN_TRITON_CONFIGS"):  # tuned configs in force (bench/tune_triton.py)
        from hierkern.ops.attention import triton as tk
        env["triton_config_overrides"] = tk.active_overrides()
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        env["cpus"] = os.cpu_count()
    return env


def run(device, quick, impl, peers, ops, memory=True, time_limit=None, only=None):
    configs = common.configs_for(device, quick)
    if only:
        configs = [c for c in configs if any(s in c.name for s in only)]
    policy = common.policy_for(device, quick)
    rows = []
    skipped = []
    t_start = time.perf_counter()

    def out_of_time():
        return time_limit is not None and time.perf_counter() - t_start > time_limit

    for cfg in configs:
        if out_of_time():
            skipped.append(cfg.name)
            log(f"[{time.perf_counter() - t_start:6.1f}s] SKIP {cfg.name}: --time-limit {time_limit:.0f}s reached")
            continue
        case = common.Case(cfg, device, hierkern_impl=impl)
        log(f"[{time.perf_counter() - t_start:6.1f}s] {cfg.name} (density {cfg.density:.3f}, "
            f"{case.hierkern_label()})")
        if "flex" in peers:
            r = common.measure_block_mask(case, reps=3 if device == "cpu" else 10)
            rows.append(r)
            log(f"    mask    flex_block_mask    {fmt(r['median_ms'])} ms {r['error'] or ''}")
        for op in ops:
            if out_of_time():
                skipped.append(f"{cfg.name} {op}")
                log(f"    SKIP {op}: --time-limit reached")
                continue
            # the eager reference is context only (no target uses it) and very slow on CPU at
            # L=2240: let it go down to a single timed call there
            min_reps = {"reference": 1} if device == "cpu" else None
            group = common.measure_group(case, peers, op, policy, memory=memory, min_reps=min_reps)
            rows.extend(group)
            for r in group:
                extra = f" compile {r['compile_s']:.1f}s" if "compile_s" in r else ""
                log(f"    {op:7s} {r['peer']:18s} {fmt(r['median_ms']):>9s} ms  {fmt(r['tflops'], '.3f'):>7s} TF/s"
                    f"  peak {fmt(r['peak_mb'], '.1f'):>7s} MB  reps {r['reps']}{extra}"
                    f"{'  ERROR ' + r['error'] if r['error'] else ''}")
        del case
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    common.add_ratios(rows)
    targets = common.evaluate_targets(rows, configs, device)
    return configs, rows, targets, skipped, time.perf_counter() - t_start


def markdown(env, configs, rows, targets, skipped, quick, elapsed):
    lines = []
    dev = env.get("gpu") or f"CPU ({env.get('cpus')} cores, {env.get('cpu_capability')}, {env['threads']} threads)"
    lines.append(f"## next_scale_attention benchmark: {env['device']}{' (quick)' if quick else ''}")
    lines.append("")
    lines.append(f"{env['date']} | {dev} | torch {env['torch']} | triton {env['triton']} | "
                 f"python {env['python']} | total {elapsed:.0f} s"
                 + (f" | load avg before/after {env['loadavg_before'][0]:.1f}/{env['loadavg_after'][0]:.1f}"
                    if "loadavg_after" in env else ""))
    if env.get("git_head"):
        dirty = env.get("git_dirty") or []
        lines.append("")
        lines.append(f"code: git {env['git_head']}" + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")
                     + (f"; hierkern._C built {env['hierkern_C_mtime']}" if env.get("hierkern_C_mtime") else ""))
    if env.get("triton_config_overrides"):
        lines.append("")
        lines.append("Triton configs overridden by HIERKERN_TRITON_CONFIGS (not the committed tables): "
                     + "; ".join(f"{o['kernel']} d{o['head_dim']} {o['block_m']}x{o['block_n']} "
                                 f"w{o['num_warps']} s{o['num_stages']}" for o in env["triton_config_overrides"]))
    lines.append("")
    flush = env.get("cache_flush_mib")
    lines.append("Median ms of single calls after warm-up, each after "
                 + (f"a {flush} MiB cache flush (HIERKERN_BENCH_FLUSH_MB); " if flush else "no cache flush; ")
                 + "TFLOP/s counts useful FLOPs only "
                 "(4·B·H·D·visible_pairs forward, 3.5x that for fwd+bwd); peak MB is the peak extra "
                 "allocation of one call; ratio = peer time / hierkern time (> 1: hierkern faster).")
    lines.append("")
    lines.append("| config | op | impl/peer | median ms | TFLOP/s | peak MB | ratio | notes |")
    lines.append("|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        notes = []
        if r.get("compile_s") is not None:
            notes.append(f"compile {r['compile_s']:.1f} s (excluded)")
        if r["reps"]:
            notes.append(f"{r['reps']} reps")
        if r["error"]:
            notes.append(f"n/a ({r['error']})")
        med = fmt(r["median_ms"], ".2f", "n/a")
        lines.append(f"| {r['config']} | {r['op']} | {r['label']} | {med} | {fmt(r['tflops'], '.3f')} | "
                     f"{fmt(r['peak_mb'], '.1f')} | {fmt(r['ratio'], '.2f')} | {'; '.join(notes)} |")
    lines.append("")
    if skipped:
        lines.append("Not measured (--time-limit reached): " + "; ".join(skipped))
        lines.append("")
    lines.append("### Targets" + (" (quick config: indicative only, thresholds are for the full config)"
                                   if quick else ""))
    lines.append("")
    lines.extend(target_lines(targets))
    return "\n".join(lines) + "\n"


def target_lines(targets):
    out = []
    for t in targets:
        if t["kind"] == "tflops":
            val = f"{fmt(t['value'], '.1f', 'n/a')} TFLOP/s"
        else:
            val = f"{fmt(t['value'], '.2f', 'n/a')}x"
        note = f"  ({t['note']})" if t["note"] else ""
        out.append(f"- {t['status']:4s} {t['target']} [L={t['config'].split('L=')[1].split()[0]}]: "
                   f"measured {val}{note}")
    return out


def plot(path, env, configs, rows, quick):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = [p for p in PEERS if any(r["peer"] == p for r in rows)]
    colors = {"hierkern": "#d62728", "sdpa_dense": "#1f77b4", "flex": "#2ca02c",
              "per_scale_sdpa": "#ff7f0e", "reference": "#7f7f7f"}
    by = {(r["config"], r["op"], r["peer"]): r for r in rows}
    fig, axes = plt.subplots(1, len(OPS), figsize=(7 + 2.2 * len(configs), 5.2), squeeze=False)
    width = 0.8 / len(peers)
    # CPU numbers are far below 1 TFLOP/s: plot GFLOP/s there so the axis stays readable
    top = max([r["tflops"] or 0 for r in rows] + [1e-9])
    unit, mult = ("TFLOP/s", 1.0) if top >= 1 else ("GFLOP/s", 1e3)
    for ax, op in zip(axes[0], OPS):
        ymax = max([(r["tflops"] or 0) * mult for r in rows if r["op"] == op] + [1e-9])
        for i, p in enumerate(peers):
            for j, cfg in enumerate(configs):
                r = by.get((cfg.name, op, p))
                x = j + (i - (len(peers) - 1) / 2) * width
                if r is None:
                    continue
                if r["tflops"] is None:
                    ax.text(x, ymax * 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
                    continue
                ax.bar(x, r["tflops"] * mult, width, color=colors.get(p), label=common.PEER_LABELS[p] if j == 0 else None)
                if p != "hierkern" and r.get("ratio"):
                    ax.text(x, r["tflops"] * mult, f"{r['ratio']:.2f}x", rotation=90, ha="center", va="bottom",
                            fontsize=6)
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels([f"VAR{c.res} {c.pattern}\nL={c.L} D={c.D}" for c in configs], fontsize=8)
        ax.set_ylabel(f"useful {unit}")
        ax.set_ylim(0, ymax * 1.25)
        ax.set_title(f"{op}")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(peers), fontsize=8, frameon=False)
    c0 = configs[0]
    dev = env.get("gpu") or f"CPU x{env['threads']} threads"
    fig.suptitle(f"next_scale_attention, {dev}, B={c0.B} H={c0.H} {common.DTYPE_NAMES[c0.dtype]}"
                 f"{' (quick)' if quick else ''}  (bar labels: peer time / hierkern time)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda if available else cpu")
    ap.add_argument("--quick", action="store_true", help="small smoke configuration (CI)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder (default bench/results)")
    ap.add_argument("--impl", default=None, choices=("cpu", "triton", "cuda", "reference"),
                    help="hierkern impl (default: impl=None, the fastest available)")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma list from {','.join(PEERS)}")
    ap.add_argument("--ops", default=",".join(OPS), help="comma list from fwd,fwd+bwd")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds; configs/ops not started by then are skipped (listed in the outputs)")
    ap.add_argument("--replot", metavar="JSON", help="only redraw the PNG next to an existing result JSON")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    ap.add_argument("--configs", default="", help="comma list of substrings: only configs whose name holds one "
                                                    "(e.g. VAR512 or D128)")
    args = ap.parse_args(argv)

    if args.replot:
        with open(args.replot) as f:
            data = json.load(f)
        dev = data["environment"]["device"]
        names = [c["name"] for c in data["configs"]]
        configs = [c for c in common.configs_for(dev, data["quick"]) if c.name in names]
        png = os.path.splitext(args.replot)[0] + ".png"
        plot(png, data["environment"], configs, data["rows"], data["quick"])
        log(f"wrote {png}")
        return 0

    device = args.device or common.default_device()
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    peers = [p for p in args.peers.split(",") if p]
    ops = [o for o in args.ops.split(",") if o]
    for p in peers:
        if p not in PEERS:
            ap.error(f"unknown peer {p!r}")
    for o in ops:
        if o not in OPS:
            ap.error(f"unknown op {o!r}")
    if "hierkern" not in peers:
        peers.insert(0, "hierkern")

    env = environment(device)
    if hasattr(os, "getloadavg"):
        env["loadavg_before"] = [round(x, 2) for x in os.getloadavg()]
    configs, rows, targets, skipped, elapsed = run(device, args.quick, args.impl, peers, ops,
                                                   memory=not args.no_memory, time_limit=args.time_limit,
                                                   only=[c for c in args.configs.split(",") if c])
    if hasattr(os, "getloadavg"):
        env["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    md = markdown(env, configs, rows, targets, skipped, args.quick, elapsed)
    print(md)

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"next_scale_{device}")
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, "quick": args.quick, "elapsed_s": elapsed, "skipped": skipped,
                   "configs": [c.as_dict() | {"name": c.name} for c in configs],
                   "definitions": {
                       "tflops": "useful FLOPs / median time; forward 4*B*H*D*visible_pairs, fwd+bwd 3.5x",
                       "ratio": "peer median time / hierkern median time (>1: hierkern faster)",
                       "peak_mb": ("cuda: max_memory_allocated after reset minus allocated before; cpu: peak "
                                   "running sum of torch CPU-allocator allocations during one call "
                                   "(torch.profiler profile_memory)"),
                   },
                   "rows": rows, "targets": targets}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(md)
    plot(stem + ".png", env, configs, rows, args.quick)
    log(f"wrote {stem}.json, {stem}.md, {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
