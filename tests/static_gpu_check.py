#!/usr/bin/env python
"""Static GPU checks that need no GPU: compile every kernel configuration ahead of time and inspect it.

  python tests/static_gpu_check.py [--arch 80 90] [--json out.json] [--jobs N] [--modules M ...] [--no-cuda]

1. Triton: every entry of aot_configs() of each module in TRITON_MODULES is compiled for each arch with
   triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)). It fails on a compile error, on
   register spills (the cubin's stack frame, read with the cuobjdump shipped in the triton wheel), on
   shared memory beyond the arch's per-block limit, and, for entries with uses_dot, when any of its dots
   is not lowered to tensor cores (wgmma on sm_90, mma on sm_80; checked per dot in the TTGIR). An entry
   with a "wgmma_exempt" reason (a deliberately tiny decode tile: wgmma needs 64 rows) must get mma on
   sm_90 instead. An entry with "archs" (e.g. an Ampere-only tile) is compiled for those archs only.
2. CUDA C++: the device code of every csrc/cuda/*.cu is compiled with nvcc (-cubin) for sm_80 and sm_90a
   with setup.py's flags and -Xptxas -v; it fails on any compile error or spill stores/loads.

Prints one line per check and exits non-zero on any failure. `run_checks(archs)` returns the result
dicts. Triton is compiled with TRITON_INTERPRET unset: the variable changes what triton.jit returns at
import time, so when it is set the checks run in a clean subprocess.
"""
import argparse
import concurrent.futures as cf
import glob
import json
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Opt-in shared memory per block (bytes): A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TRITON_MODULES = ("hierkern.ops.attention.triton", "hierkern.ops.cached_attention.triton",
                  "hierkern.ops.conv.triton", "hierkern.ops.kv_reuse.triton", "hierkern.ops.scan.ssd_triton",
                  "hierkern.ops.axial.triton")
TENSOR_CORE_PTX = {80: "mma.sync", 90: "wgmma.mma_async"}


# ----------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------
def _cuobjdump():
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes):
    """(registers, stack-frame bytes, local-memory bytes) of the kernel in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], check=True, capture_output=True,
                              text=True).stdout
    usage = {key: int(val) for key, val in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text)}
    return usage["REG"], usage.get("STACK", 0), usage.get("LOCAL", 0)


def _tensor_core_problem(ttgir: str, ptx: str, arch: int, mma_only: bool = False):
    """None when every dot of the kernel runs on tensor cores (wgmma on sm_90, mma on sm_80; mma on
    both with mma_only); else why not.

    Counted per dot in the TTGIR, so one dot falling back (to mma v2 on sm_90, to FMA on sm_80) fails
    even when another dot of the kernel did get the fast instruction."""
    dots = re.findall(r"= tt\.dot .*", ttgir)
    if mma_only:
        n_fast = sum(1 for d in dots if re.search(r"-> tensor<[^>]*#mma", d))
        slow = len(dots) - n_fast
        if slow or not n_fast or TENSOR_CORE_PTX[80] not in ptx:
            return f"{slow} of {slow + n_fast} dots not on {TENSOR_CORE_PTX[80]}"
        return None
    if arch >= 90:
        n_fast = len(re.findall(r"= ttng\.warp_group_dot ", ttgir))
        slow = len(dots)
    else:
        n_fast = sum(1 for d in dots if re.search(r"-> tensor<[^>]*#mma", d))
        slow = len(dots) - n_fast
    if slow or not n_fast or TENSOR_CORE_PTX[arch] not in ptx:
        return f"{slow} of {slow + n_fast} dots not on {TENSOR_CORE_PTX[arch]}"
    return None


def _compile_triton(module: str, index: int, arch: int) -> dict:
    """Compile <module>.aot_configs()[index] for sm_<arch> and check it (runs in a worker process)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = importlib.import_module(module).aot_configs()[index]
    kernel = cfg["kernel"]
    result = {"kind": "triton", "name": cfg["name"], "arch": arch, "regs": None, "spills": None,
              "shared": None, "mma": None, "ok": False, "error": ""}
    attrs = {(kernel.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in cfg["divisible_by_16"]}
    try:
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=cfg["signature"], constexprs=cfg["constexprs"], attrs=attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    except Exception as exc:  # noqa: BLE001 - any compiler failure is a check failure, reported verbatim
        result["error"] = f"compile error: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
        return result

    regs, stack, local = _resource_usage(compiled.asm["cubin"])
    result.update(regs=regs, spills=stack + local, shared=compiled.metadata.shared)
    problems = []
    if stack or local:
        problems.append(f"spills ({stack} B stack frame, {local} B local)")
    if compiled.metadata.shared > SHARED_LIMIT[arch]:
        problems.append(f"shared memory {compiled.metadata.shared} B > {SHARED_LIMIT[arch]} B")
    if cfg["uses_dot"]:
        problem = _tensor_core_problem(compiled.asm["ttgir"], compiled.asm["ptx"], arch,
                                       mma_only=bool(cfg.get("wgmma_exempt")))
        result["mma"] = problem is None
        if problem:
            problems.append(problem)
    result["error"] = "; ".join(problems)
    result["ok"] = not problems
    return result


def _triton_tasks(archs, modules=TRITON_MODULES):
    import importlib

    tasks = []
    for module in modules:
        cfgs = importlib.import_module(module).aot_configs()
        # An entry with "archs" is the configuration the launcher picks on those architectures only.
        tasks += [(_compile_triton, module, i, arch) for i, cfg in enumerate(cfgs) for arch in archs
                  if arch in cfg.get("archs", archs)]
    return tasks


# ----------------------------------------------------------------------------------------------------
# CUDA C++
# ----------------------------------------------------------------------------------------------------
def _cuda_home():
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        # The nvcc on PATH may be a wrapper; its dry run names the real toolkit as TOP=<root>/bin/..
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "x.cu")
            open(src, "w").close()
            proc = subprocess.run([nvcc, "--dryrun", src], capture_output=True, text=True, cwd=tmp)
        match = re.search(r"^#\$ TOP=(.+)$", proc.stdout + proc.stderr, re.MULTILINE)
        if match:
            return os.path.normpath(match.group(1).strip())
    return "/usr/local/cuda"


def _torch_cuda_flags(cuda_home):
    """torch's include dirs and nvcc flags, as setup.py's CUDAExtension passes them."""
    saved = os.environ.get("CUDA_HOME")
    os.environ["CUDA_HOME"] = cuda_home  # importing cpp_extension guesses (and warns) without it
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime": expected here
    try:
        import torch
        import torch.utils.cpp_extension as cpp
    finally:
        if saved is None:
            del os.environ["CUDA_HOME"]
    import nvidia  # the nvidia-* wheels torch depends on: cusparse.h, cublas_v2.h, ...

    includes = list(cpp.include_paths()) + [os.path.join(REPO, "csrc")]
    for root in nvidia.__path__:
        includes += sorted(glob.glob(os.path.join(root, "cu*", "include")))
    flags = [*cpp.COMMON_NVCC_FLAGS, "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             "-DTORCH_EXTENSION_NAME=_C", "-DHIERKERN_WITH_CUDA"]
    return flags + [f"-I{d}" for d in includes]


def _compile_cu(path, arch, cuda_home, torch_flags):
    """nvcc one .cu for one arch, device code only (-cubin: the host half, three times slower, is
    compiled by the build itself), with setup.py's optimisation flags, and read ptxas -v."""
    suffix = "a" if arch >= 90 else ""  # sm_90a: wgmma / setmaxnreg need the arch-specific target
    name = os.path.relpath(path, REPO)
    result = {"kind": "cuda", "name": name, "arch": arch, "regs": None, "spills": None, "shared": None,
              "mma": None, "ok": False, "error": ""}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [os.path.join(cuda_home, "bin", "nvcc"), "-cubin", f"-arch=sm_{arch}{suffix}", path,
               "-o", os.path.join(tmp, "out.cubin"), "-O3", "--use_fast_math", "-lineinfo", "-Xptxas", "-v",
               *torch_flags]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode:
        errors = [line for line in log.splitlines() if "error" in line] or log.strip().splitlines()[-3:]
        result["error"] = "nvcc failed: " + " | ".join(errors[:3])[:500]
        return result
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    result.update(regs=max(regs, default=None), spills=sum(spills))
    result["ok"] = result["spills"] == 0
    if not result["ok"]:
        result["error"] = "spill stores/loads in ptxas -v output"
    return result


def _cuda_tasks(archs):
    sources = sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "*.cu")))
    print(f"cuda: {len(sources)} .cu file(s) found under csrc/cuda", flush=True)
    if not sources:
        return []
    cuda_home = _cuda_home()
    torch_flags = _torch_cuda_flags(cuda_home)
    return [(_compile_cu, path, arch, cuda_home, torch_flags) for path in sources for arch in archs]


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------
def _format(r):
    fmt = lambda x: "-" if x is None else str(x)  # noqa: E731
    mma = "-" if r["mma"] is None else ("yes" if r["mma"] else "NO")
    status = "PASS" if r["ok"] else "FAIL " + r["error"]
    return (f"{r['kind']:6} {r['name']:40} sm_{r['arch']}  regs {fmt(r['regs']):>4}  spills {fmt(r['spills']):>4}"
            f"  smem {fmt(r['shared']):>6}  mma {mma:3}  {status}")


def run_checks(archs=(80, 90), jobs=None, verbose=True, modules=TRITON_MODULES, cuda=True):
    """Run every check for the given archs (the Triton `modules`, and the CUDA sources unless cuda is
    false: a partial run while working on one kernel family); returns a list of result dicts."""
    archs = tuple(int(a) for a in archs)
    if os.environ.get("TRITON_INTERPRET"):
        return _run_clean_subprocess(archs, jobs, verbose, modules, cuda)
    # Spawned workers unpickle the task functions by module name: keep this module and hierkern importable.
    for path in (REPO, os.path.dirname(os.path.abspath(__file__))):
        if path not in sys.path:
            sys.path.insert(0, path)
    jobs = jobs or os.cpu_count() or 1
    tasks = _triton_tasks(archs, modules) + (_cuda_tasks(archs) if cuda else [])
    results = []
    # Every compile (triton and nvcc) in one pool of fresh (spawned) interpreters, reported in order.
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in [pool.submit(*task) for task in tasks]:
            results.append(future.result())
            if verbose:
                print(_format(results[-1]), flush=True)
    return results


def _run_clean_subprocess(archs, jobs, verbose, modules=TRITON_MODULES, cuda=True):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--arch", *map(str, archs), "--json", out]
        if jobs:
            cmd += ["--jobs", str(jobs)]
        cmd += ["--modules", *modules] + ([] if cuda else ["--no-cuda"])
        proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=None if verbose else subprocess.DEVNULL)
        if not os.path.exists(out):
            raise RuntimeError(f"static GPU check subprocess died (exit code {proc.returncode})")
        with open(out) as f:
            return json.load(f)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--json", help="write the result dicts to this file")
    parser.add_argument("--jobs", type=int, help="parallel compile processes (default: all cores)")
    parser.add_argument("--modules", nargs="+", default=list(TRITON_MODULES), choices=TRITON_MODULES,
                        help="Triton modules to check (default: all)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the nvcc checks of csrc/cuda")
    args = parser.parse_args(argv)
    results = run_checks(args.arch, args.jobs, modules=args.modules, cuda=not args.no_cuda)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
