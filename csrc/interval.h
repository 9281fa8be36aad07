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
  // The block patterns below read `offsets` as document offsets (cu_seqlens: documents packed one
  // after another, no attention across documents) and split each document into blocks of
  // `block_size` tokens. Skip-causal documents hold 2N tokens: noisy x_t and clean x_0, N each, with
  // block_size dividing N (the ops validate this). Noisy block i sees itself (bidirectional) and clean
  // blocks < i; clean block i sees clean blocks <= i.
  // [x_t ; x_0] (BD3-LM, SDAR, Fast-dLLM v2).
  kSkipNoisyFirst = 2,
  // [x_0 ; x_t] (ACDiT SCAM).
  kSkipCleanFirst = 3,
  // Block-causal ("staircase") prefill: row r of a document sees its keys < (r / B + 1) * B (local
  // positions), clamped to the document end, so a last partial block is allowed.
  kBlockCausal = 4,
};

constexpr int64_t kNumPatterns = 5;

// Patterns whose ranges depend on block_size (which must then be >= 1).
HK_HD bool is_block_pattern(int64_t pattern) { return pattern >= kSkipNoisyFirst && pattern < kNumPatterns; }
HK_HD bool is_skip_pattern(int64_t pattern) {
  return pattern == kSkipNoisyFirst || pattern == kSkipCleanFirst;
}

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

// The segment patterns alone (row_key_ranges / key_query_ranges defer to these). The CUDA kernels
// call them directly: they do not run the block patterns yet (the CUDA op refuses them), and the
// full range code below costs their widest forward instantiation a register spill on sm_80.
HK_HD KeyRanges segment_row_key_ranges(const int32_t* offsets, int64_t nseg, int64_t pattern, int64_t r) {
  const int64_t s = segment_of(offsets, nseg, r);
  KeyRanges kr{0, 0, 0, 0};
  kr.hi0 = offsets[s + 1];
  kr.lo0 = pattern == kSegmentCausal ? 0 : offsets[s];
  return kr;
}

HK_HD KeyRanges segment_key_query_ranges(const int32_t* offsets, int64_t nseg, int64_t pattern, int64_t j) {
  const int64_t s = segment_of(offsets, nseg, j);
  KeyRanges qr{0, 0, 0, 0};
  qr.lo0 = offsets[s];
  qr.hi0 = pattern == kSegmentCausal ? offsets[nseg] : offsets[s + 1];
  return qr;
}

// Keys visible to query row r. Ranges are returned in ascending order (range 0 below range 1).
HK_HD KeyRanges row_key_ranges(const int32_t* offsets, int64_t nseg, int64_t pattern,
                               int64_t block_size, int64_t r) {
  if (pattern == kSegmentCausal || pattern == kSegmentDiagonal)
    return segment_row_key_ranges(offsets, nseg, pattern, r);
  const int64_t s = segment_of(offsets, nseg, r);
  const int64_t a = offsets[s], e = offsets[s + 1];
  KeyRanges kr{0, 0, 0, 0};
  const int64_t B = block_size, x = r - a;
  if (pattern == kBlockCausal) {
    kr.lo0 = a;
    kr.hi0 = a + (x / B + 1) * B < e ? a + (x / B + 1) * B : e;
    return kr;
  }
  const int64_t N = (e - a) / 2;
  // Which half the row is in, and where the clean half starts.
  const bool noisy = (x < N) == (pattern == kSkipNoisyFirst);
  const int64_t clean0 = pattern == kSkipNoisyFirst ? a + N : a;
  const int64_t i = (x < N ? x : x - N) / B;  // block index within the row's half
  if (!noisy) {  // clean block i: clean blocks <= i
    kr.lo0 = clean0;
    kr.hi0 = clean0 + (i + 1) * B;
    return kr;
  }
  // Noisy block i: itself and clean blocks < i (empty for i == 0).
  const int64_t own0 = r - x % B;
  if (pattern == kSkipNoisyFirst) {  // own block lies below the clean half
    kr.lo0 = own0;
    kr.hi0 = own0 + B;
    kr.lo1 = clean0;
    kr.hi1 = clean0 + i * B;
  } else {  // clean half first
    kr.lo0 = clean0;
    kr.hi0 = clean0 + i * B;
    kr.lo1 = own0;
    kr.hi1 = own0 + B;
  }
  return kr;
}

// Whether row r is a noisy row of a skip-causal document (false for every other pattern).
HK_HD bool is_noisy_row(const int32_t* offsets, int64_t nseg, int64_t pattern, int64_t r) {
  if (!is_skip_pattern(pattern)) return false;
  const int64_t s = segment_of(offsets, nseg, r);
  const int64_t a = offsets[s], N = (offsets[s + 1] - a) / 2;
  return (r - a < N) == (pattern == kSkipNoisyFirst);
}

// Queries that see key j (the transpose of row_key_ranges); used by the backward pass for dK/dV.
// Ranges are returned in ascending order.
HK_HD KeyRanges key_query_ranges(const int32_t* offsets, int64_t nseg, int64_t pattern,
                                 int64_t block_size, int64_t j) {
  if (pattern == kSegmentCausal || pattern == kSegmentDiagonal)
    return segment_key_query_ranges(offsets, nseg, pattern, j);
  const int64_t s = segment_of(offsets, nseg, j);
  const int64_t a = offsets[s], e = offsets[s + 1];
  KeyRanges qr{0, 0, 0, 0};
  const int64_t B = block_size, y = j - a;
  if (pattern == kBlockCausal) {  // rows of the key's block and every later row of the document
    qr.lo0 = j - y % B;
    qr.hi0 = e;
    return qr;
  }
  const int64_t N = (e - a) / 2;
  const bool noisy = (y < N) == (pattern == kSkipNoisyFirst);
  const int64_t i = (y < N ? y : y - N) / B;
  if (noisy) {  // a noisy key is seen by its own block's rows only
    qr.lo0 = j - y % B;
    qr.hi0 = qr.lo0 + B;
    return qr;
  }
  // A clean key of block i is seen by clean rows of blocks >= i and noisy rows of blocks > i.
  if (pattern == kSkipNoisyFirst) {  // noisy half [a, a + N) first
    qr.lo0 = a + (i + 1) * B;
    qr.hi0 = a + N;
    qr.lo1 = a + N + i * B;
    qr.hi1 = e;
  } else {
    qr.lo0 = a + i * B;
    qr.hi0 = a + N;
    qr.lo1 = a + N + (i + 1) * B;
    qr.hi1 = e;
  }
  return qr;
}

HK_HD bool in_ranges(const KeyRanges& kr, int64_t j) {
  return (j >= kr.lo0 && j < kr.hi0) || (j >= kr.lo1 && j < kr.hi1);
}

}  // namespace hierkern
