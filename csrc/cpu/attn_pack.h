// K^T and V panel packing for gemm_panels (cpu_math.h), shared by the attention kernels that keep a
// whole key range of one (batch, kv head) packed while its query tiles run: interval attention
// (per sequence) and axial attention (per image line).
#pragma once
#include <cmath>
#include <cstring>
#include <type_traits>

#include "cpu/cpu_math.h"

namespace hierkern::cpu {

// Packs the keys of one (batch, kv head) as K^T panels for gemm_panels: panel p holds keys
// [16p, 16p + 16) as D rows of 16 floats; keys past n are zero.
// With `normalize`, every key is scaled to unit L2 norm (the cos-attention prologue).
template <typename T>
inline void pack_kt_panels(const T* src, int64_t n, int64_t D, int64_t row_stride, int64_t col_stride,
                           float* dst, bool normalize) {
  const int64_t np = (n + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < np; ++p) {
    float* panel = dst + p * D * kPanel;
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
// every key as n rows of 16 floats; dims past D are zero.
template <typename T>
inline void pack_v_panels(const T* src, int64_t n, int64_t D, int64_t row_stride, int64_t col_stride,
                          float* dst) {
  const int64_t np = (D + kPanel - 1) / kPanel;
  for (int64_t key = 0; key < n; ++key) {
    const T* row = src + key * row_stride;
    for (int64_t p = 0; p < np; ++p) {
      float* out = dst + (p * n + key) * kPanel;
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
