// Interval-attention mask semantics shared by the CPU and CUDA kernels.
//
// Every mask hierkern supports lets query row r see at most two contiguous key ranges. The ranges are
// derived from tiny metadata (cumulative segment offsets, a pattern enum, a block size) so no kernel
// ever needs an L x L mask or a per-(b, h) block table. The Python side mirrors these definitions in
// hierkern/ops/attention/patterns.py; keep the two in step.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define HK_HD __host__ __device__ __forceinline__
#else
#define HK_HD inline
#endif

namespace hierkern {

enum Pattern : int64_t {
  // Scale-causal (VAR, Infinity): row of segment i sees keys [0, end_i).
  kSegmentCausal = 0,
  // Block-diagonal (HMAR, M-VAR): row of segment i sees keys [start_i, end_i).
  kSegmentDiagonal = 1,
};

constexpr int64_t kNumPatterns = 2;

struct KeyRanges {
  int64_t lo0, hi0, lo1, hi1;  // [lo0, hi0) U [lo1, hi1); an empty range has lo >= hi
};

// Index of the segment holding position r: the largest i with offsets[i] <= r (offsets[0] == 0).
// Segment counts are tiny (tens), so a binary search is cheap and branch-light.
HK_HD int64_t segment_of(const int32_t* offsets, int64_t nseg, int64_t r) {
  int64_t lo = 0, hi = nseg;  // invariant: offsets[lo] <= r < offsets[hi]
  while (hi - lo > 1) {
    int64_t mid = (lo + hi) >> 1;
    if (offsets[mid] <= r) lo = mid; else hi = mid;
  }
  return lo;
}

// Keys visible to query row r.
HK_HD KeyRanges row_key_ranges(const int32_t* offsets, int64_t nseg, int64_t pattern, int64_t r) {
  const int64_t s = segment_of(offsets, nseg, r);
  KeyRanges kr{0, 0, 0, 0};
  kr.hi0 = offsets[s + 1];
  kr.lo0 = pattern == kSegmentCausal ? 0 : offsets[s];
  return kr;
}

// Queries that see key j (the transpose of row_key_ranges); used by the backward pass for dK/dV.
HK_HD KeyRanges key_query_ranges(const int32_t* offsets, int64_t nseg, int64_t pattern, int64_t j) {
  const int64_t s = segment_of(offsets, nseg, j);
  KeyRanges qr{0, 0, 0, 0};
  qr.lo0 = offsets[s];
  qr.hi0 = pattern == kSegmentCausal ? offsets[nseg] : offsets[s + 1];
  return qr;
}

HK_HD bool in_ranges(const KeyRanges& kr, int64_t j) {
  return (j >= kr.lo0 && j < kr.hi0) || (j >= kr.lo1 && j < kr.hi1);
}

}  // namespace hierkern
