// K^T and V panel packing for gemm_panels (cpu_math.h), shared by the attention kernels that keep a
// whole key range of one (batch, kv head) packed while its query tiles run: interval attention
// (per sequence) and axial attention (per image line).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "cpu/cpu_math.h"

namespace hierkern::cpu {

// Requests the cache lines of `rows` rows (row_stride elements apart, `cols` elements from each start)
// into L1. The packers read one row per key, a head stride apart (4 KiB for 16 heads x 64 floats):
// every row sits in another page, where the hardware prefetchers do not follow, so without this each
// row is a demand miss to L3 (perf put ~50% of the V pack on one store waiting for its load).
// Locality 3 (T0): into L1; 2 (T1): into L2.
template <int Locality = 3, typename T>
inline void prefetch_rows(const T* src, int64_t rows, int64_t row_stride, int64_t cols) {
  const int64_t bytes = cols * (int64_t)sizeof(T);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < bytes; b += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(src + r * row_stride) + b, 0, Locality);
}

// Rows [r0, r1) of the keys and values pack_kt_panels / pack_v_panels will read for the next
// (batch, kv head) pair, into L2: a caller spreads one pair's rows over the compute of the pair
// before, so the next pack reads L2 instead of waiting on L3 with every fill buffer taken (the
// pack's own look-ahead prefetch alone left it latency-bound).
template <typename T>
inline void prefetch_kv_rows(const T* k, int64_t k_row_stride, int64_t D, const T* v, int64_t v_row_stride,
                             int64_t Dv, int64_t r0, int64_t r1) {
  prefetch_rows<2>(k + r0 * k_row_stride, r1 - r0, k_row_stride, D);
  prefetch_rows<2>(v + r0 * v_row_stride, r1 - r0, v_row_stride, Dv);
}

// Packs the keys of one (batch, kv head) as K^T panels for gemm_panels: panel p holds keys
// [16p, 16p + 16) as D rows of 16 floats; keys past n are zero.
// With `normalize`, every key is scaled to unit L2 norm (the cos-attention prologue).
template <typename T>
inline void pack_kt_panels(const T* src, int64_t n, int64_t D, int64_t row_stride, int64_t col_stride,
                           float* dst, bool normalize) {
  const int64_t np = (n + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < np; ++p) {
    float* panel = dst + p * D * kPanel;
    if (col_stride == 1 && p + 1 < np)  // the next panel's keys
      prefetch_rows(src + (p + 1) * kPanel * row_stride, std::min(kPanel, n - (p + 1) * kPanel), row_stride, D);
    int64_t j = 0;
#ifdef HK_AVX2
    // Eight whole keys at a time: 8 x 8 register transposes (the scalar loop below is 8x slower).
    if constexpr (std::is_same_v<T, float>) {
      if (col_stride == 1 && D % 8 == 0)
        for (; j + 8 <= kPanel && p * kPanel + j + 8 <= n; j += 8)
          for (int64_t c = 0; c < D; c += 8)
            transpose8x8(src + (p * kPanel + j) * row_stride + c, row_stride, panel + c * kPanel + j,
                         kPanel);
    }
#endif
    for (; j < kPanel; ++j) {
      const int64_t key = p * kPanel + j;
      const T* row = src + key * row_stride;
      for (int64_t c = 0; c < D; ++c)
        panel[c * kPanel + j] = key < n ? to_f(row[c * col_stride]) : 0.f;
    }
    if (normalize) {
      float ss[kPanel] = {};
      for (int64_t c = 0; c < D; ++c)
        for (int64_t j = 0; j < kPanel; ++j) ss[j] += panel[c * kPanel + j] * panel[c * kPanel + j];
      for (int64_t j = 0; j < kPanel; ++j) ss[j] = 1.f / std::max(std::sqrt(ss[j]), 1e-12f);
      for (int64_t c = 0; c < D; ++c)
        for (int64_t j = 0; j < kPanel; ++j) panel[c * kPanel + j] *= ss[j];
    }
  }
}

// Packs the values of one (batch, kv head) as column panels: panel p holds dims [16p, 16p + 16) of
// every key as rows of 16 floats, panel_rows (default n) rows per panel; dims past D are zero.
template <typename T>
inline void pack_v_panels(const T* src, int64_t n, int64_t D, int64_t row_stride, int64_t col_stride,
                          float* dst, int64_t panel_rows = -1) {
  if (panel_rows < 0) panel_rows = n;
  const int64_t np = (D + kPanel - 1) / kPanel;
  constexpr int64_t kAhead = 8;  // rows
  if (col_stride == 1) prefetch_rows(src, std::min(kAhead, n), row_stride, D);
  for (int64_t key = 0; key < n; ++key) {
    const T* row = src + key * row_stride;
    if (col_stride == 1 && key + kAhead < n) prefetch_rows(row + kAhead * row_stride, 1, row_stride, D);
    for (int64_t p = 0; p < np; ++p) {
      float* out = dst + (p * panel_rows + key) * kPanel;
      if constexpr (std::is_same_v<T, float>) {
        if (col_stride == 1 && (p + 1) * kPanel <= D) {
          std::memcpy(out, row + p * kPanel, kPanel * sizeof(float));
          continue;
        }
      }
      for (int64_t j = 0; j < kPanel; ++j) {
        const int64_t c = p * kPanel + j;
        out[j] = c < D ? to_f(row[c * col_stride]) : 0.f;
      }
    }
  }
}

}  // namespace hierkern::cpu
