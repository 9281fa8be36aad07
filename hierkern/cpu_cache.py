"""The CPU output cache of hierkern's C++ kernels (csrc/cpu/output_cache.h).

Large outputs of the CPU kernels (selective_scan's output and its backward's du / ddelta / dz, blocks
of 1 MiB or more) keep their memory when freed, for the next output of the same size: a fresh
multi-megabyte CPU tensor faults and zeroes every page on first touch, which on a small machine
costs a quarter of a selective_scan forward. The cache holds at most HIERKERN_CPU_CACHE_MB MiB
(read once, at the first cached allocation; default 1024; 0 turns it off), dropping its oldest
blocks first. The PyTorch profiler (profile_memory=True) sees these allocations and frees.
"""
from ._backend import has_compiled_ops


def empty_cpu_cache() -> int:
    """Free every block the CPU output cache holds (as torch.cuda.empty_cache does for CUDA); returns
    the number of bytes freed (0 when hierkern._C is not built). Tensors still in use are untouched."""
    if not has_compiled_ops():
        return 0
    from . import _C
    return int(_C.empty_cpu_cache())
