"""Builds hierkern._C.

C++ CPU kernels are always built. CUDA sources (csrc/cuda/*.cu) are built when nvcc and a CUDA
build of torch are present; no GPU is needed. Knobs (environment variables):
  HIERKERN_SKIP_CUDA=1        build the CPU kernels only
  HIERKERN_CUDA_ARCHS         ';'-separated list, default "80;90a" (sm_80 and sm_90a)
  HIERKERN_CPU_FLAGS          extra C++ flags for the CPU kernels, default "-march=native"
  MAX_JOBS                    parallel compile jobs (honoured by torch's ninja builder)
  CUDA_HOME                   the real CUDA toolkit (found from `nvcc --dryrun` otherwise)
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup, find_packages

ROOT = os.path.dirname(os.path.abspath(__file__))


def _real_cuda_home():
    """The nvcc on PATH may be a wrapper script, which makes torch guess CUDA_HOME wrong."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--dryrun", "x.cu"], capture_output=True, text=True, timeout=60)
            m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
            if m:
                return os.path.realpath(m.group(1))  # TOP=<toolkit>/bin/..
        except (OSError, subprocess.SubprocessError):
            pass
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return os.path.realpath(cand)
    return None


def _want_cuda(torch):
    if os.environ.get("HIERKERN_SKIP_CUDA", "0") == "1":
        return None
    if torch.version.cuda is None:
        return None
    home = _real_cuda_home()
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return None
    return home


def _nvidia_wheel_dirs():
    """torch's CUDA headers include cusparse.h / cublas_v2.h, shipped by the nvidia-* wheels."""
    import site
    inc, lib = [], []
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        for sub in ("nvidia/cu13", "nvidia/cu12"):
            d = os.path.join(sp, sub)
            if os.path.isdir(os.path.join(d, "include")):
                inc.append(os.path.join(d, "include"))
                lib.append(os.path.join(d, "lib"))
        for d in glob.glob(os.path.join(sp, "nvidia", "*", "include")):
            if d not in inc:
                inc.append(d)
    return inc, lib


def cuda_gencode_flags():
    archs = os.environ.get("HIERKERN_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
    flags = []
    for a in filter(None, (x.strip().replace("sm_", "") for x in archs)):
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags


def get_extensions():
    import torch  # noqa: F401  (build requirement; --no-build-isolation on the GPU machine)

    cuda_home = _want_cuda(torch)
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
        import torch.utils.cpp_extension as ce
        ce.CUDA_HOME = cuda_home
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpu_flags = os.environ.get("HIERKERN_CPU_FLAGS", "-march=native").split()
    cxx = ["-O3", "-fopenmp", "-DHIERKERN_CPU"] + cpu_flags
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if cuda_home:
        inc, lib = _nvidia_wheel_dirs()
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "--use_fast_math", "-Xptxas", "-v", "-lineinfo"] + cuda_gencode_flags()
        return [CUDAExtension(
            "hierkern._C", sources, include_dirs=include_dirs + inc, library_dirs=lib,
            define_macros=[("HIERKERN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx + ["-DHIERKERN_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"])]
    return [CppExtension("hierkern._C", sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension
    return {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


setup(
    name="hierkern",
    version="0.1.0",
    description="Kernels for hierarchical generative models (next-scale, block-diffusion, axial, scans)",
    packages=find_packages(include=["hierkern", "hierkern.*"]),
    # The selective-scan CUDA header, for the NVRTC path (hierkern/_csrc is a symlink into csrc/cuda in
    # a checkout; setuptools copies the file it points to).
    package_data={"hierkern": ["_csrc/*.cuh"]},
    ext_modules=get_extensions(),
    cmdclass=_cmdclass(),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={"triton": ["triton>=3.2"],
                    # NVRTC-compiled CUDA kernels without building hierkern._C with CUDA (CUDA 12 driver+;
                    # use cupy-cuda13x instead on a CUDA 13 stack).
                    "cupy": ["cupy-cuda12x>=13"],
                    "test": ["pytest", "pytest-benchmark", "matplotlib"]},
)
