// Large CPU outputs from a cache of freed blocks.
//
// A fresh multi-megabyte CPU tensor comes from mmap (glibc serves blocks above 32 MiB that way at
// the latest), and every 4 KiB page of it faults and is zeroed on first touch: on the 2-core VM
// this library is developed on, writing a fresh 44.6 MiB output costs ~23 ms more than writing a
// reused one, a quarter of a selective_scan forward at M-VAR's shapes. Outputs made with
// empty_cached keep their pages when freed: the block goes to a per-size free list and the next
// output of that size reuses it (as the CUDA caching allocator does for device memory).
//
// - Only blocks of at least kMinCachedBytes (1 MiB); smaller ones go to c10's CPU allocator.
// - The free lists hold at most HIERKERN_CPU_CACHE_MB MiB (default 1024; 0 turns the cache off):
//   a block freed beyond that is returned to the system. hierkern.empty_cpu_cache() returns every
//   cached block, as does an allocation that fails (before it is tried once more).
// - Allocations and frees are reported to the PyTorch profiler (profile_memory=True sees them as
//   it sees c10's CPU allocator).
// - The tensors are ordinary resizable CPU tensors; only their storage's allocator differs.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace hierkern::cpu {

constexpr int64_t kMinCachedBytes = int64_t(1) << 20;

// at::empty(sizes, opts) for a CPU tensor, its storage from the output cache.
at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& opts);

// at::empty_like(t) (t's layout kept): from the cache when t is contiguous, else from c10's allocator.
at::Tensor empty_like_cached(const at::Tensor& t);

// Frees every cached block; returns the bytes freed.
int64_t release_cached_blocks();

}  // namespace hierkern::cpu
