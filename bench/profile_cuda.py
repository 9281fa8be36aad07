"""Where the time of one hierkern call goes on a GPU: wall time per call against the summed device
time of its kernels (torch.profiler), and the kernels by device time. A call whose wall time is far
above its kernel time is bound by host work (Python, dispatch, launches), not by the kernels. Then the
VAR / HMAR d16@512 training step per impl, its device time split into attention, GEMMs and the rest.

    python -m bench.profile_cuda [--reps 50] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import time

import torch

import hierkern
from hierkern.layouts import VAR_256, VAR_512


def cases():
    dev, dt = "cuda", torch.bfloat16

    def rnd(*shape, grad=False):
        return torch.randn(*shape, device=dev, dtype=dt, requires_grad=grad)

    out = []
    for name, pn in (("VAR256", VAR_256), ("VAR512", VAR_512)):
        lay = hierkern.ScaleLayout(pn)
        q, k, v = (rnd(8, lay.L, 16, 64) for _ in range(3))
        out.append((f"next_scale causal {name} L={lay.L} B8 H16 D64 fwd",
                    lambda q=q, k=k, v=v, lay=lay: hierkern.next_scale_attention(q, k, v, lay, "causal")))
        qg, kg, vg = (rnd(8, lay.L, 16, 64, grad=True) for _ in range(3))
        go = rnd(8, lay.L, 16, 64)

        def fb(q=qg, k=kg, v=vg, lay=lay, go=go):
            o = hierkern.next_scale_attention(q, k, v, lay, "causal")
            return torch.autograd.grad(o, (q, k, v), go)
        out.append((f"next_scale causal {name} L={lay.L} B8 H16 D64 fwd+bwd", fb))
    cache_k, cache_v = rnd(2, 2304, 16, 64), rnd(2, 2304, 16, 64)
    for ql in (1, 256):
        q = rnd(2, ql, 16, 64)
        out.append((f"cached_attention q_len={ql} kv_len=2240 B2 H16 D64",
                    lambda q=q: hierkern.cached_attention(q, cache_k, cache_v, 2240)))
    q, k, v = (rnd(8, 2048, 12, 64) for _ in range(3))
    out.append(("skip_causal BD3 N=1024 block=16 B8 H12 D64 fwd",
                lambda: hierkern.skip_causal_attention(q, k, v, 16)))
    return out


def model_cases():
    """The VAR / HMAR d16@512 training step (bench_models' GPU config) per impl: where issue 3's step
    time goes (attention, GEMMs, the rest), the kernels path against VAR's eager code."""
    from .bench_models import build, configs, phase_fn
    cfg = next(c for c in configs("cuda", quick=True) if c.name == "d16@512")
    out = []
    for model_name in ("VAR", "HMAR"):
        model = build(model_name, cfg, "cuda")
        for impl in ("reference", "kernels"):
            out.append((f"{model_name} {cfg.name} B{cfg.batch} train step, impl={impl}",
                        phase_fn(model, "train", impl, cfg, "cuda")))
    return out


# Kernel-name fragments of each category of device time (the first match wins): hierkern's Triton
# attention kernels and PyTorch's SDPA kernels; cuBLAS / CUTLASS GEMMs and GEMVs. Meant for VAR /
# HMAR: M-VAR's causal-conv Triton kernel is also named _fwd_kernel and would count as attention.
CATEGORIES = (("attention", ("_fwd_kernel", "_bwd_dkdv", "_bwd_dq", "_bwd_delta", "fmha", "attention",
                             "flash")),
              ("gemm", ("gemm", "gemv", "cutlass", "xmma", "sm90_", "sm80_", "cublas", "nvjet")))


def category(kernel_name):
    low = kernel_name.lower()
    return next((name for name, frags in CATEGORIES if any(f in low for f in frags)), "other")


def by_category(kernels):
    """{category: device us per call} over (us, launches, name) rows; the rest under "other"."""
    out = {name: 0.0 for name, _ in CATEGORIES} | {"other": 0.0}
    for t, _, key in kernels:
        out[category(key)] += t
    return out


def profile(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / reps
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels = []
    for e in prof.key_averages():
        dev_t = getattr(e, "self_device_time_total", None)
        if dev_t is None:
            dev_t = getattr(e, "self_cuda_time_total", 0)
        if dev_t and e.device_type == torch.autograd.DeviceType.CUDA:
            kernels.append((dev_t / reps, e.count // reps, e.key))
    kernels.sort(reverse=True)
    return wall * 1e6, sum(t for t, _, _ in kernels), kernels


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out")
    ap.add_argument("--model-reps", type=int, default=3, help="training steps per profile")
    ap.add_argument("--no-models", action="store_true", help="skip the VAR / HMAR training-step breakdown")
    args = ap.parse_args(argv)
    lines = [f"# profile_cuda: {torch.cuda.get_device_name()} torch {torch.__version__}", "",
             "| call | wall us/call | kernel us/call | kernel share | top kernels (us/call x launches) |",
             "|---|---:|---:|---:|---|"]

    def save():  # after every row: a step cut short by its timeout keeps what it measured
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")

    for name, fn in cases():
        try:
            wall, kern, kernels = profile(fn, args.reps)
        except Exception as e:  # noqa: BLE001 - one failing case is a result, not a crash
            lines.append(f"| {name} | error | | | {type(e).__name__}: {str(e)[:120]} |")
            continue
        top = "; ".join(f"{k[:48]} {t:.1f}x{c}" for t, c, k in kernels[:4])
        lines.append(f"| {name} | {wall:.1f} | {kern:.1f} | {kern / wall:.0%} | {top} |")
        print(lines[-1], flush=True)
        save()
    if not args.no_models:
        lines += ["", "Training steps (device ms per step by category; attention: hierkern's Triton kernels or "
                  "SDPA's; gemm: cuBLAS / CUTLASS):", "",
                  "| step | wall ms | kernel ms | attention ms | gemm ms | other ms | top other kernels (us x launches) |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        try:
            steps = model_cases()
        except Exception as e:  # noqa: BLE001
            steps = []
            lines.append(f"| models | error | | | | | {type(e).__name__}: {str(e)[:120]} |")
        for name, fn in steps:
            try:
                wall, kern, kernels = profile(fn, args.model_reps)
            except Exception as e:  # noqa: BLE001
                lines.append(f"| {name} | error | | | | | {type(e).__name__}: {str(e)[:120]} |")
                continue
            cat = by_category(kernels)
            other = [(t, c, k) for t, c, k in kernels if category(k) == "other"]
            top = "; ".join(f"{k[:40]} {t:.0f}x{c}" for t, c, k in other[:4])
            lines.append(f"| {name} | {wall / 1e3:.1f} | {kern / 1e3:.1f} | {cat['attention'] / 1e3:.1f} | "
                         f"{cat['gemm'] / 1e3:.1f} | {cat['other'] / 1e3:.1f} | {top} |")
            print(lines[-1], flush=True)
            save()
    save()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
