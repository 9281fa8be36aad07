"""End-to-end benchmarks of the next-scale reference models: VAR and HMAR, impl="kernels" against
impl="reference" (VAR's public code path: dense-mask SDPA in training, torch.cat KV cache in
generation — the eager baseline), on the same weights.

    python -m bench.bench_models [--quick] [--device cpu|cuda] [--out results.json]

Phases: "train" = model.loss (forward + mean cross-entropy: F.cross_entropy for the reference as in
VAR's trainer, hierkern's fused cross-entropy for the kernels) + backward (model.train()); "generate" = a whole image,
every scale, classifier-free guidance (2B rows), top_k=900, top_p=0.96, seeded generator.
Time is the median of single calls after a warm-up call, the two impls timed round-robin so machine
noise hits both alike; peak memory is the peak extra memory of one call (bench/common.py's
definition: CUDA max_memory_allocated; CPU replay of the profiler's allocation events, which does
not see scratch a C++ kernel takes outside torch's allocator). ratio = reference / kernels (> 1:
kernels faster or smaller).

CPU: the models' default config (depth 4, VAR's 256px patch_nums, L=680) in float32, batch 2;
`--configs default,d16@256` adds the d16 preset at 256px (batch 2, float32; minutes per call).
CUDA: d16 and d20 at the 256px (L=680, batch 16) and 512px (L=2240, batch 8) schedules, bf16.
Targets are reported, not asserted.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch
import torch.nn.functional as F

from bench.common import default_device, interleaved_medians, peak_memory_bytes, sync
from hierkern.layouts import VAR_256, VAR_512
from hierkern.models import HMAR, VAR
from hierkern.models._next_scale import DEFAULT_PATCH_NUMS

MODELS = {"VAR": VAR, "HMAR": HMAR}
IMPLS = ("reference", "kernels")
PHASES = ("train", "generate")


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    depth: int
    patch_nums: tuple
    batch: int
    dtype: torch.dtype

    @property
    def L(self):
        return sum(p * p for p in self.patch_nums)


# CPU configs by name (--configs): the default config, and the d16 preset at 256px, where the KV cache
# VAR keeps (16 layers of 1024 channels over L=680) is large next to one scale's activations, as on a
# GPU: minutes per call here, so it runs only when asked for.
CPU_CONFIGS = {"default": (4, DEFAULT_PATCH_NUMS), "d16@256": (16, VAR_256)}


def configs(device, quick, names=("default",)):
    if device == "cpu":
        return [Config(name, *CPU_CONFIGS[name], 1 if quick else 2, torch.float32) for name in names]
    out = []
    for depth in ((16,) if quick else (16, 20)):
        out.append(Config(f"d{depth}@256", depth, VAR_256, 16, torch.bfloat16))
        out.append(Config(f"d{depth}@512", depth, VAR_512, 8, torch.bfloat16))
    return out


def build(model_name, cfg, device):
    torch.manual_seed(0)
    model = MODELS[model_name](depth=cfg.depth, patch_nums=cfg.patch_nums)
    return model.to(device=device, dtype=cfg.dtype)


def phase_fn(model, phase, impl, cfg, device):
    """A no-argument callable running one `phase` of `model` with `impl` (inputs made once, outside)."""
    g = torch.Generator(device=device).manual_seed(1)
    labels = torch.randint(0, model.num_classes, (cfg.batch,), generator=g, device=device)
    if phase == "train":
        tokens = torch.randint(0, model.vocab_size, (cfg.batch, model.layout.L), generator=g, device=device)

        def train():
            model.train()
            model.loss(tokens, labels, impl=impl).backward()
            # free the gradients inside the call, so each call starts from none and its peak memory
            # counts the gradients it allocates, not buffers freed from the previous call
            model.zero_grad(set_to_none=True)
        return train

    def generate():
        model.eval()
        gen = torch.Generator(device=device).manual_seed(2)
        return model.generate(labels, cfg=1.5, top_k=900, top_p=0.96, generator=gen, impl=impl)
    return generate


def measure_pair(fns, device, reps, memory):
    """Round-robin timing of {impl: fn}, each already called once (the warm-up: first-call
    allocations, Triton compilation); returns {impl: (median_s, peak_bytes | None)}."""
    medians = interleaved_medians(fns, device, reps, warmup=False)
    out = {}
    for impl, fn in fns.items():
        peak = peak_memory_bytes(fn, device) if memory else None
        sync(device)
        out[impl] = (medians[impl], peak)
    return out


def run(device, quick, models, reps, memory, log=print, config_names=("default",), phases=PHASES):
    rows = []
    for cfg in configs(device, quick, config_names):
        for model_name in models:
            model = build(model_name, cfg, device)
            for phase in phases:
                fns, errors = {}, {}
                for impl in IMPLS:
                    try:
                        fn = phase_fn(model, phase, impl, cfg, device)
                        fn()  # the warm-up call; also surfaces a missing kernel API before timing
                        fns[impl] = fn
                    except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
                        errors[impl] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                results = measure_pair(fns, device, reps, memory) if fns else {}
                for impl in IMPLS:
                    t, peak = results.get(impl, (None, None))
                    rows.append(dict(model=model_name, config=cfg.name, depth=cfg.depth, L=cfg.L, batch=cfg.batch,
                                     dtype=str(cfg.dtype).replace("torch.", ""), device=device, phase=phase,
                                     impl=impl, time_s=t, peak_bytes=peak, error=errors.get(impl)))
                log(f"  {model_name} {cfg.name} {phase}: " + ", ".join(
                    f"{r['impl']} {fmt_time(r['time_s'])}" for r in rows[-len(IMPLS):]))
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def find(rows, **kw):
    for r in rows:
        if all(r[k] == v for k, v in kw.items()):
            return r
    return None


def ratio(a, b):
    return a / b if a is not None and b else None


def targets(rows, device):
    """(description, measured, goal, met) for the issue's targets that this run has data for."""
    out = []
    if device == "cuda":
        for model_name, goal in (("HMAR", 2.5), ("VAR", 1.3)):
            for cfg in {r["config"] for r in rows if r["config"].endswith("@512")}:
                ref = find(rows, model=model_name, config=cfg, phase="train", impl="reference")
                ker = find(rows, model=model_name, config=cfg, phase="train", impl="kernels")
                if ref and ker:
                    x = ratio(ref["time_s"], ker["time_s"])
                    out.append((f"{model_name} {cfg} training step, kernels vs eager baseline", x, f">= {goal}x",
                                x is not None and x >= goal))
    else:
        ref = find(rows, model="VAR", config="default", phase="train", impl="reference")
        ker = find(rows, model="VAR", config="default", phase="train", impl="kernels")
        if ref and ker:
            x = ratio(ref["time_s"], ker["time_s"])
            out.append(("VAR default training step, kernels vs eager baseline", x, ">= 1.3x",
                        x is not None and x >= 1.3))
    for cfg in sorted({r["config"] for r in rows}):
        hmar = find(rows, model="HMAR", config=cfg, phase="generate", impl="kernels")
        for var_impl in IMPLS:
            var = find(rows, model="VAR", config=cfg, phase="generate", impl=var_impl)
            if hmar and var and hmar["peak_bytes"] and var["peak_bytes"]:
                x = hmar["peak_bytes"] / var["peak_bytes"]
                out.append((f"{cfg} generation peak memory, HMAR (kernels) / VAR ({var_impl})", x, "<= 0.333",
                            x <= 1 / 3))
    return out


def fmt_time(t):
    return "n/a" if t is None else f"{t * 1e3:.1f} ms"


def fmt_mb(b):
    return "-" if b is None else f"{b / 2**20:.1f}"


def markdown(rows, device):
    lines = ["| model | config | batch | phase | reference | kernels | ratio (ref/kernels) | "
             "ref peak MiB | kernels peak MiB | memory ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = []
    for r in rows:
        k = (r["model"], r["config"], r["phase"])
        if k not in keys:
            keys.append(k)
    for model_name, cfg, phase in keys:
        ref = find(rows, model=model_name, config=cfg, phase=phase, impl="reference")
        ker = find(rows, model=model_name, config=cfg, phase=phase, impl="kernels")
        x = ratio(ref["time_s"], ker["time_s"])
        m = ratio(ref["peak_bytes"], ker["peak_bytes"])
        ker_time = fmt_time(ker["time_s"]) if not ker["error"] else f"n/a ({ker['error']})"
        lines.append(f"| {model_name} | {cfg} | {ref['batch']} | {phase} | {fmt_time(ref['time_s'])} | {ker_time} | "
                     f"{'-' if x is None else f'{x:.2f}x'} | {fmt_mb(ref['peak_bytes'])} | "
                     f"{fmt_mb(ker['peak_bytes'])} | {'-' if m is None else f'{m:.2f}x'} |")
    lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
    for desc, x, goal, met in targets(rows, device):
        lines.append(f"| {desc} | {'-' if x is None else f'{x:.2f}'} | {goal} | {'yes' if met else 'no'} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.bench_models", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda if available, else cpu")
    ap.add_argument("--quick", action="store_true", help="CPU: batch 1; CUDA: d16 only; fewer reps")
    ap.add_argument("--models", default="VAR,HMAR", help="comma-separated subset of VAR,HMAR")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per impl (default 3 CPU / 10 CUDA; quick 2 / 5)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory calls")
    ap.add_argument("--configs", default="default",
                    help=f"CPU only: comma-separated subset of {sorted(CPU_CONFIGS)} (default: default)")
    ap.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of train,generate")
    ap.add_argument("--out", default=None, help="write the rows, targets and table as JSON to this path")
    args = ap.parse_args(argv)
    device = args.device or default_device()
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        ap.error(f"--models must name some of {sorted(MODELS)}, got {args.models!r}")
    config_names = [c.strip() for c in args.configs.split(",") if c.strip()]
    if device == "cpu" and (not config_names or any(c not in CPU_CONFIGS for c in config_names)):
        ap.error(f"--configs must name some of {sorted(CPU_CONFIGS)}, got {args.configs!r}")
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not phases or any(p not in PHASES for p in phases):
        ap.error(f"--phases must name some of {PHASES}, got {args.phases!r}")
    reps = args.reps or ((2 if args.quick else 3) if device == "cpu" else (5 if args.quick else 10))
    print(f"bench_models: device={device} torch={torch.__version__} threads={torch.get_num_threads()} reps={reps}",
          file=sys.stderr)
    rows = run(device, args.quick, models, reps, memory=not args.no_memory,
               log=lambda s: print(s, file=sys.stderr), config_names=config_names, phases=phases)
    table = markdown(rows, device)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "torch": str(torch.__version__), "threads": torch.get_num_threads(),
                       "date": time.strftime("%Y-%m-%d"), "quick": args.quick, "reps": reps, "rows": rows,
                       "targets": [dict(target=d, measured=x, goal=g, met=m) for d, x, g, m in targets(rows, device)],
                       "table": table}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
