"""M-VAR end to end: generation with the Mamba state carried from scale to scale against recomputing
the whole prefix at every scale (what M-VAR's public code does), and the training step with
impl="kernels" against impl="reference" (dense-mask SDPA, PyTorch causal conv, chunked PyTorch SSD
scan: the eager baseline), on the same weights.

    python -m bench.bench_mvar [--device cpu|cuda] [--quick] [--threads N] [--depth N] [--phases ...]
                               [--out results.json]

Generation: a whole image at VAR's 256px schedule (patch_nums 1,2,3,4,5,6,8,10,13,16; L=680), every
scale, classifier-free guidance (2B rows), top_k=900, top_p=0.96, a generator seeded the same for
every call, so carried and recomputed runs must return the same tokens (checked, reported as
same_tokens). Network: the same per-scale forwards on teacher-forced 2B rows without sampling
(VAR's top-k / top-p sampler over the 4096-token vocabulary costs the same in both modes, about a
third of a carried generation at the CPU config). Training step: model.loss (forward + mean
cross-entropy, hierkern's fused one for the kernels) + backward (model.train()).
Time: median of single calls after a warm-up call, the contenders of one comparison timed
round-robin so machine noise hits them alike (bench_models.measure_pair); peak memory as
bench/common.py defines it. speedup = slower contender / faster one as named in each row.

CPU: the default config (depth 4: width 256, 4 heads; Mamba-2 d_state 64, expand 2, headdim 64 -> 8
scan heads), batch 2, float32. CUDA: the d16 preset (width 1024, 16 heads; 32 scan heads), batch 16,
bf16. Targets are reported, not asserted: generation with state carry >= 2x faster than prefix
recompute (issue 5).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from bench.bench_models import fmt_mb, fmt_time, measure_pair
from bench.common import default_device
from hierkern.layouts import VAR_256, ScaleLayout
from hierkern.models import MVAR

IMPLS = ("reference", "kernels")
PHASES = ("generate", "network", "train")
CARRY_TARGET = 2.0
_ERRORS = (RuntimeError, NotImplementedError, ValueError, TypeError)


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    preset: str | None  # None: the model's default constructor (with `depth`)
    batch: int
    dtype: torch.dtype
    depth: int = 4


def config_for(device, quick, depth=None):
    if device == "cpu":
        if depth is not None and depth != 4:
            return Config(f"depth {depth}", None, 1 if quick else 2, torch.float32, depth)
        return Config("default", None, 1 if quick else 2, torch.float32)
    return Config("d16", "d16", 8 if quick else 16, torch.bfloat16)


def build(cfg, device):
    torch.manual_seed(0)
    with torch.device(device):  # a d16 model is built on the GPU, not initialised on the CPU and copied
        model = MVAR(depth=cfg.depth, patch_nums=VAR_256) if cfg.preset is None else MVAR.preset(cfg.preset)
    return model.to(dtype=cfg.dtype)


def generate_fn(model, labels, impl, state_carry, device, sink):
    def generate():
        model.eval()
        gen = torch.Generator(device=device).manual_seed(2)
        out = model.generate(labels, cfg=1.5, top_k=900, top_p=0.96, generator=gen, impl=impl,
                             state_carry=state_carry)
        sink[(impl, state_carry)] = out
        return out
    return generate


def network_fn(model, tokens, labels, impl, state_carry, device):
    """Generation's network work without sampling: 2B teacher-forced rows scale by scale, each scale
    once from the carried Mamba states, or the whole prefix again at every scale (its last scale's
    logits kept, as generate(state_carry=False) does)."""
    tokens, labels = tokens.repeat(2, 1), torch.cat((labels, torch.full_like(labels, model.num_classes)))

    @torch.no_grad()
    def network():
        model.eval()
        if state_carry:
            return model(tokens, labels, impl=impl, state_carry=True)
        cond, block_cond = model.condition(labels)
        x = model.teacher_forcing_input(tokens, cond)
        off, sizes = model.layout.offsets, model.layout.sizes
        return [model.sequence_logits(x[:, :off[si + 1]], cond, block_cond,
                                      ScaleLayout.from_sizes(sizes[:si + 1]), impl)[:, off[si]:]
                for si in range(model.layout.num_scales)]
    return network


def train_fn(model, tokens, labels, impl):
    def train():
        model.train()
        model.loss(tokens, labels, impl=impl).backward()
        model.zero_grad(set_to_none=True)
    return train


def timed(fns, device, reps, memory, log):
    """{key: fn} -> {key: (time_s | None, peak | None, error | None)}; a contender whose warm-up call
    raises (e.g. a kernel with no GPU backend yet) is reported with its error, never timed."""
    ok, errors = {}, {}
    for key, fn in fns.items():
        try:
            fn()
            ok[key] = fn
        except _ERRORS as e:
            errors[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log(f"    {key}: {errors[key]}")
    res = measure_pair(ok, device, reps, memory) if ok else {}
    return {key: (*res.get(key, (None, None)), errors.get(key)) for key in fns}


def run(device, quick, reps, memory, log=print, depth=None, phases=PHASES):
    cfg = config_for(device, quick, depth)
    model = build(cfg, device)
    g = torch.Generator(device=device).manual_seed(1)
    labels = torch.randint(0, model.num_classes, (cfg.batch,), generator=g, device=device)
    tokens = torch.randint(0, model.vocab_size, (cfg.batch, model.layout.L), generator=g, device=device)
    base = dict(config=cfg.name, L=model.layout.L, batch=cfg.batch, depth=model.depth, width=model.width,
                d_state=model.mambas[0].d_state, dtype=str(cfg.dtype).replace("torch.", ""), device=device)
    rows = []
    for impl in IMPLS:
        if "generate" not in phases:
            break
        sink = {}
        fns = {sc: generate_fn(model, labels, impl, sc, device, sink) for sc in (True, False)}
        res = timed(fns, device, reps, memory, log)
        same = (all(torch.equal(a, b) for a, b in zip(sink[(impl, True)], sink[(impl, False)]))
                if len(sink) == 2 else None)
        for sc in (True, False):
            t, peak, err = res[sc]
            rows.append(dict(base, phase="generate", impl=impl, mode="state_carry" if sc else "prefix_recompute",
                             time_s=t, peak_bytes=peak, error=err, same_tokens=same))
        log(f"  generate {impl}: carry {fmt_time(res[True][0])}, recompute {fmt_time(res[False][0])}, "
            f"same tokens {same}")
        if "network" not in phases:
            continue
        fns = {sc: network_fn(model, tokens, labels, impl, sc, device) for sc in (True, False)}
        res = timed(fns, device, reps, False, log)
        for sc in (True, False):
            t, peak, err = res[sc]
            rows.append(dict(base, phase="network", impl=impl, mode="state_carry" if sc else "prefix_recompute",
                             time_s=t, peak_bytes=peak, error=err, same_tokens=None))
        log(f"  network {impl}: carry {fmt_time(res[True][0])}, recompute {fmt_time(res[False][0])}")
    if "train" not in phases:
        return rows
    fns = {impl: train_fn(model, tokens, labels, impl) for impl in IMPLS}
    res = timed(fns, device, reps, memory, log)
    for impl in IMPLS:
        t, peak, err = res[impl]
        rows.append(dict(base, phase="train", impl=impl, mode="teacher_forcing", time_s=t, peak_bytes=peak,
                         error=err, same_tokens=None))
    log(f"  train: reference {fmt_time(res['reference'][0])}, kernels {fmt_time(res['kernels'][0])}")
    return rows


def find(rows, **kw):
    return next((r for r in rows if all(r[k] == v for k, v in kw.items())), None)


def speedup(slow, fast):
    return slow["time_s"] / fast["time_s"] if slow and fast and slow["time_s"] and fast["time_s"] else None


def summary(rows):
    """(comparison, speedup, goal or None, met or None)."""
    out = []
    for impl in IMPLS:
        x = speedup(find(rows, phase="generate", impl=impl, mode="prefix_recompute"),
                    find(rows, phase="generate", impl=impl, mode="state_carry"))
        out.append((f"generation ({impl}): state carry vs prefix recompute", x, f">= {CARRY_TARGET:g}x",
                    None if x is None else x >= CARRY_TARGET))
        x = speedup(find(rows, phase="network", impl=impl, mode="prefix_recompute"),
                    find(rows, phase="network", impl=impl, mode="state_carry"))
        out.append((f"generation's network work, no sampling ({impl}): state carry vs prefix recompute", x,
                    None, None))
    x = speedup(find(rows, phase="generate", impl="reference", mode="prefix_recompute"),
                find(rows, phase="generate", impl="kernels", mode="state_carry"))
    out.append(("generation: kernels + state carry vs reference + prefix recompute (M-VAR's code path)", x,
                None, None))
    x = speedup(find(rows, phase="train", impl="reference"), find(rows, phase="train", impl="kernels"))
    out.append(("training step: kernels vs reference", x, None, None))
    return out


def markdown(rows):
    lines = ["| phase | impl | mode | time | peak MiB | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        note = r["error"] or ("" if r["same_tokens"] is None else f"same tokens: {r['same_tokens']}")
        lines.append(f"| {r['phase']} | {r['impl']} | {r['mode']} | {fmt_time(r['time_s'])} | "
                     f"{fmt_mb(r['peak_bytes'])} | {note} |")
    lines += ["", "| comparison | speedup | goal | met |", "|---|---|---|---|"]
    for desc, x, goal, met in summary(rows):
        lines.append(f"| {desc} | {'-' if x is None else f'{x:.2f}x'} | {goal or '-'} | "
                     f"{'-' if met is None else ('yes' if met else 'no')} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.bench_mvar", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--quick", action="store_true", help="batch 1 (CPU) / 8 (CUDA), fewer reps")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per contender (default 3 CPU / 5 CUDA)")
    ap.add_argument("--depth", type=int, default=None, help="CPU: model depth (width 64 * depth; default 4)")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory calls")
    ap.add_argument("--out", default=None, help="write rows, summary and table as JSON to this path")
    args = ap.parse_args(argv)
    device = args.device or default_device()
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    phases = tuple(p.strip() for p in args.phases.split(",") if p.strip())
    if not phases or any(p not in PHASES for p in phases):
        ap.error(f"--phases must name some of {PHASES}, got {args.phases!r}")
    if args.depth is not None and (device != "cpu" or args.depth < 1):
        ap.error("--depth takes a positive int and applies to --device cpu only (CUDA runs the d16 preset)")
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or ((2 if args.quick else 3) if device == "cpu" else (3 if args.quick else 5))
    print(f"bench_mvar: device={device} torch={torch.__version__} threads={torch.get_num_threads()} reps={reps}",
          file=sys.stderr)
    rows = run(device, args.quick, reps, memory=not args.no_memory, log=lambda s: print(s, file=sys.stderr),
               depth=args.depth, phases=phases)
    table = markdown(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                       "torch": str(torch.__version__), "threads": torch.get_num_threads(),
                       "date": time.strftime("%Y-%m-%d"), "quick": args.quick,
                       "reps": reps, "rows": rows,
                       "summary": [dict(comparison=d, speedup=x, goal=g, met=m) for d, x, g, m in summary(rows)],
                       "table": table}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
