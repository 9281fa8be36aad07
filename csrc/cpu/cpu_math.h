// Small CPU building blocks for the attention kernels: a row-major GEMM on top of the BLAS that torch
// already links (no extra dependency), a branch-free exp the compiler vectorises, and tile loads that
// read any strides and convert to float.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HK_AVX2 1
#endif
// AVX-512 paths (16 lanes, 32 vector registers) where the build targets them (-march=native on a CPU
// that has them). On cores with two 512-bit FMA units (Intel Xeon since Skylake-SP) that doubles the
// FMA peak over AVX2 (measured on this project's Xeon: 221 vs 115 GFLOP/s per core); on Zen 4, which
// splits a 512-bit op in two, it halves the instruction count at the same peak.
#if defined(HK_AVX2) && defined(__AVX512F__)
#define HK_AVX512 1
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>

extern "C" {
// Fortran BLAS, exported by libtorch_cpu (MKL or OpenBLAS). Weak so a torch build without it still
// loads; gemm_rm then uses the portable loop below.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
}

// GCC 12 reports its own AVX-512 intrinsics (the _mm512_undefined_ps self-initialisation behind
// min/max/shifts/reductions) as maybe-uninitialized once inlined at -O3 (GCC bug 105593, fixed in
// 13); the warning is attributed along the inlining chain, so it is silenced for this header's code
// (in its -Wuninitialized form too, which an out-of-line exp_n<Vec16, N, true> draws).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
namespace hierkern::cpu {

// Uninitialised float scratch. std::vector<float>(n) zero-fills, and a kernel's per-call tiles sized
// for the largest case (a 128 x 512 score tile is 256 KiB, past glibc's mmap threshold: fresh
// pages, faulted in on first touch) cost more than the arithmetic of a short call (a decode or
// diffusion step). Callers size tiles for the call and skip the fill.
using FloatBuf = std::unique_ptr<float[]>;
inline FloatBuf scratch_floats(int64_t n) { return FloatBuf(new float[std::max<int64_t>(n, 1)]); }

// Row-major C[m, n] = alpha * op(A) op(B) + beta * C, where op(X) = X or X^T (trans_x true).
inline void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                    const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                    int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (sgemm_ != nullptr) {
    // A row-major matrix is its column-major transpose, so swap the operands.
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int M = (int)n, N = (int)m, K = (int)k, LDA = (int)ldb, LDB = (int)lda, LDC = (int)ldc;
    sgemm_(&tb, &ta, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
    return;
  }
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      float acc = 0.f;
      for (int64_t p = 0; p < k; ++p) {
        const float av = trans_a ? a[p * lda + i] : a[i * lda + p];
        const float bv = trans_b ? b[j * ldb + p] : b[p * ldb + j];
        acc += av * bv;
      }
      c[i * ldc + j] = alpha * acc + (beta == 0.f ? 0.f : beta * c[i * ldc + j]);
    }
  }
}

#ifdef HK_AVX2
// C[i0 + MR rows, j0 : j0 + 16 (8 without `two`)] += alpha * op(A) * B, accumulated over all k.
template <bool TransA, int MR>
inline void narrow_block(int64_t i0, int64_t j0, bool two, int64_t k, float alpha, const float* a, int64_t lda,
                         const float* b, int64_t ldb, float* c, int64_t ldc) {
  auto A = [&](int64_t i, int64_t p) { return TransA ? a[p * lda + i] : a[i * lda + p]; };
  __m256 c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) { c0[r] = _mm256_setzero_ps(); c1[r] = _mm256_setzero_ps(); }
  for (int64_t p = 0; p < k; ++p) {
    const float* bp = b + p * ldb + j0;
    const __m256 b0 = _mm256_loadu_ps(bp);
    const __m256 b1 = two ? _mm256_loadu_ps(bp + 8) : _mm256_setzero_ps();
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_set1_ps(A(i0 + r, p));
      c0[r] = _mm256_fmadd_ps(av, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(av, b1, c1[r]);
    }
  }
  const __m256 va = _mm256_set1_ps(alpha);
  for (int r = 0; r < MR; ++r) {
    float* cp = c + (i0 + r) * ldc + j0;
    _mm256_storeu_ps(cp, _mm256_fmadd_ps(va, c0[r], _mm256_loadu_ps(cp)));
    if (two) _mm256_storeu_ps(cp + 8, _mm256_fmadd_ps(va, c1[r], _mm256_loadu_ps(cp + 8)));
  }
}

// C[m, n] += alpha * op(A)[m, k] * B[k, n], row-major, n % 8 == 0. For the attention GEMMs whose
// output width is head_dim (P V, dS K, P^T dO, dS^T Q): A is a fresh score tile used for only n
// columns, so BLAS spends a large share of its time packing it; this register-blocked kernel
// (6 rows x 16 columns of C in 12 accumulators) reads A in place instead. The m % 6 leftover rows
// run as one block of their own height: one row at a time is a single dependent FMA chain per
// accumulator, a quarter of the throughput (a 64-row tile's 4 leftover rows cost like 16).
template <bool TransA>
inline void gemm_acc_narrow_avx2(int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                                 int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc) {
  constexpr int MR = 6;
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const bool two = j0 + 16 <= n;  // else an 8-wide tail
    int64_t i0 = 0;
    for (; i0 + MR <= m; i0 += MR) narrow_block<TransA, MR>(i0, j0, two, k, alpha, a, lda, b, ldb, c, ldc);
    switch (m - i0) {
      case 5: narrow_block<TransA, 5>(i0, j0, two, k, alpha, a, lda, b, ldb, c, ldc); break;
      case 4: narrow_block<TransA, 4>(i0, j0, two, k, alpha, a, lda, b, ldb, c, ldc); break;
      case 3: narrow_block<TransA, 3>(i0, j0, two, k, alpha, a, lda, b, ldb, c, ldc); break;
      case 2: narrow_block<TransA, 2>(i0, j0, two, k, alpha, a, lda, b, ldb, c, ldc); break;
      case 1: narrow_block<TransA, 1>(i0, j0, two, k, alpha, a, lda, b, ldb, c, ldc); break;
      default: break;
    }
  }
}
#endif

#ifdef HK_AVX512
// C[MR rows, NP * 16 columns] (= or +=) alpha * op(A)[MR rows, k] * B, where B's row p, column block
// j (16 floats) is at b + p * ldb + j * bstep: panels (ldb = 16, bstep = panel_stride) or a
// row-major matrix (ldb its row stride, bstep = 16). op(A) = A or A^T (TransA). MR x NP zmm
// accumulators, NP B loads and MR broadcasts per k step. 6 x 4 (24 of the 32 registers) covers a
// 64-wide head_dim in one block; with fewer broadcasts and loads per FMA than narrower blocks it ran
// at ~170 GFLOP/s per core on the Xeon (~77% of its FMA peak; 6 x 2, 8 x 2, 12 x 2 and 8 x 3 measured
// 155-170, the AVX2 6 x 16 block 108).
template <bool TransA, int MR, int NP>
inline void block_avx512(int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                         int64_t bstep, float* c, int64_t ldc, bool accumulate) {
  __m512 acc[MR][NP];
  _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r)
    _Pragma("GCC unroll 4") for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    __m512 bv[NP];
    _Pragma("GCC unroll 4") for (int j = 0; j < NP; ++j) bv[j] = _mm512_loadu_ps(b + p * ldb + j * bstep);
    _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(TransA ? a[p * lda + r] : a[r * lda + p]);
      _Pragma("GCC unroll 4") for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_fmadd_ps(av, bv[j], acc[r][j]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
  // Two loops, not one with a select: a select made GCC keep the accumulators in a stack array.
  if (accumulate) {
    _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r) _Pragma("GCC unroll 4") for (int j = 0; j < NP; ++j) {
      float* cp = c + r * ldc + j * 16;
      _mm512_storeu_ps(cp, _mm512_fmadd_ps(va, acc[r][j], _mm512_loadu_ps(cp)));
    }
  } else {
    _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r) _Pragma("GCC unroll 4") for (int j = 0; j < NP; ++j)
      _mm512_storeu_ps(c + r * ldc + j * 16, _mm512_mul_ps(va, acc[r][j]));
  }
}

using BlockFn = void (*)(int64_t, float, const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, bool);

template <bool TransA, int NP, int... R>
constexpr std::array<BlockFn, sizeof...(R)> block_row_table(std::integer_sequence<int, R...>) {
  return {block_avx512<TransA, R + 1, NP>...};
}

// block_avx512<TransA, mr, np> for mr 1..6, np 1..4, and (np = 1) mr 7..12.
template <bool TransA>
inline BlockFn block_fn(int64_t mr, int64_t np) {
  static constexpr std::array<BlockFn, 6> by_np[4] = {
      block_row_table<TransA, 1>(std::make_integer_sequence<int, 6>{}),
      block_row_table<TransA, 2>(std::make_integer_sequence<int, 6>{}),
      block_row_table<TransA, 3>(std::make_integer_sequence<int, 6>{}),
      block_row_table<TransA, 4>(std::make_integer_sequence<int, 6>{})};
  static constexpr std::array<BlockFn, 12> one = block_row_table<TransA, 1>(std::make_integer_sequence<int, 12>{});
  return np == 1 ? one[mr - 1] : by_np[np - 1][mr - 1];
}

// Size of the next register block along a dimension with `left` rows (or panels) to go and blocks of
// `full`: a remainder of 1-3 after a full block is merged with it and split evenly (6 + 1 rows run
// as 3 + 4, 4 + 1 panels as 3 + 2), since a block one row or panel thin has too few independent
// accumulators and the most loads per FMA (the L=680 diagonal tiles have 128, 100, 91, 41 rows and
// 17 panels).
inline int64_t balanced_block(int64_t left, int64_t full) {
  return left > full && left < full + 4 ? (left + 1) / 2 : std::min(left, full);
}

// C[m, n] += alpha * op(A)[m, k] * B[k, n] (row-major, n % 16 == 0): gemm_acc_narrow's AVX-512 path.
template <bool TransA>
inline void gemm_acc_narrow_avx512(int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                                   int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc) {
  for (int64_t j0 = 0, np; j0 < n; j0 += 16 * np) {
    np = balanced_block((n - j0) / 16, 4);
    for (int64_t i0 = 0, mr; i0 < m; i0 += mr) {
      mr = balanced_block(m - i0, 6);
      block_fn<TransA>(mr, np)(k, alpha, TransA ? a + i0 : a + i0 * lda, lda, b + j0, ldb, 16, c + i0 * ldc + j0,
                               ldc, true);
    }
  }
}
#endif

// C[m, n] += alpha * op(A) * B for the narrow (n = head_dim) attention GEMMs; see above.
inline void gemm_acc_narrow(bool trans_a, int64_t m, int64_t n, int64_t k, float alpha,
                            const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                            int64_t ldc) {
#ifdef HK_AVX2
  // HIERKERN_CPU_NARROW_GEMM=0 routes these through BLAS as well (A/B measurements).
  static const bool enabled = [] {
    const char* s = std::getenv("HIERKERN_CPU_NARROW_GEMM");
    return s == nullptr || s[0] != '0';
  }();
#ifdef HK_AVX512
  if (enabled && n % 16 == 0 && n <= 256) {
    if (trans_a) gemm_acc_narrow_avx512<true>(m, n, k, alpha, a, lda, b, ldb, c, ldc);
    else gemm_acc_narrow_avx512<false>(m, n, k, alpha, a, lda, b, ldb, c, ldc);
    return;
  }
#endif
  if (enabled && n % 8 == 0 && n <= 256) {
    if (trans_a) gemm_acc_narrow_avx2<true>(m, n, k, alpha, a, lda, b, ldb, c, ldc);
    else gemm_acc_narrow_avx2<false>(m, n, k, alpha, a, lda, b, ldb, c, ldc);
    return;
  }
#endif
  gemm_rm(trans_a, false, m, n, k, alpha, a, lda, b, ldb, 1.f, c, ldc);
}

// ---------------------------------------------------------------------------------------------
// Panel GEMM. B is stored as column panels of kPanel floats: panel j holds B[:, 16j : 16j + 16] as k
// rows of 16 contiguous floats, at bp + j * panel_stride. The forward attention packs K^T and V once
// per (batch, kv head) in this layout, so no GEMM packs an operand per tile (BLAS spent ~30% of its
// time there) and every B row the kernel streams is one cache line.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kPanel = 16;
// k rows per pass: the pass's B block (np panels x depth rows of 64 B) stays in L1 (48 KiB on the Xeon,
// 32 KiB on Zen) for all of the row blocks that stream it. 256 rows of one panel is 16 KiB; for the
// AVX-512 blocks' four panels the depth halves (4 x 128 x 64 B = 32 KiB): at 256, the 64 KiB block of
// P V (k = up to 512 keys) was refetched from L2 by every 6-row block, and 128 measured ~5% faster on
// the L=2240 forward (diagonal 52.5-55.2 vs 54.7-59.7 ms, causal 102.6-104.5 vs 106.1-113.6 ms in
// four alternating runs; L=680, whose keys per segment fit one 256-row pass of fewer panels: same).
constexpr int64_t kPanelDepth = 256;
inline int64_t panel_depth(int64_t np) { return np >= 4 ? kPanelDepth / 2 : kPanelDepth; }

#ifdef HK_AVX2
// C[MR rows, 16] (= or +=) alpha * A[MR rows, k] * panel.
template <int MR>
inline void panel_block_avx2(int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                             float* c, int64_t ldc, bool accumulate) {
  __m256 c0[MR], c1[MR];
  _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) { c0[r] = _mm256_setzero_ps(); c1[r] = _mm256_setzero_ps(); }
  for (int64_t p = 0; p < k; ++p) {
    const __m256 b0 = _mm256_loadu_ps(b + p * kPanel);
    const __m256 b1 = _mm256_loadu_ps(b + p * kPanel + 8);
    _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + p);
      c0[r] = _mm256_fmadd_ps(av, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(av, b1, c1[r]);
    }
  }
  const __m256 va = _mm256_set1_ps(alpha);
  _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) {
    float* cp = c + r * ldc;
    if (accumulate) {
      _mm256_storeu_ps(cp, _mm256_fmadd_ps(va, c0[r], _mm256_loadu_ps(cp)));
      _mm256_storeu_ps(cp + 8, _mm256_fmadd_ps(va, c1[r], _mm256_loadu_ps(cp + 8)));
    } else {
      _mm256_storeu_ps(cp, _mm256_mul_ps(va, c0[r]));
      _mm256_storeu_ps(cp + 8, _mm256_mul_ps(va, c1[r]));
    }
  }
}
#endif

inline void panel_block(int64_t mr, int64_t k, float alpha, const float* a, int64_t lda,
                        const float* b, float* c, int64_t ldc, bool accumulate) {
#ifdef HK_AVX2
  switch (mr) {
    case 6: return panel_block_avx2<6>(k, alpha, a, lda, b, c, ldc, accumulate);
    case 5: return panel_block_avx2<5>(k, alpha, a, lda, b, c, ldc, accumulate);
    case 4: return panel_block_avx2<4>(k, alpha, a, lda, b, c, ldc, accumulate);
    case 3: return panel_block_avx2<3>(k, alpha, a, lda, b, c, ldc, accumulate);
    case 2: return panel_block_avx2<2>(k, alpha, a, lda, b, c, ldc, accumulate);
    default: return panel_block_avx2<1>(k, alpha, a, lda, b, c, ldc, accumulate);
  }
#else
  for (int64_t r = 0; r < mr; ++r) {
    float acc[kPanel] = {};
    for (int64_t p = 0; p < k; ++p)
      for (int64_t j = 0; j < kPanel; ++j) acc[j] += a[r * lda + p] * b[p * kPanel + j];
    for (int64_t j = 0; j < kPanel; ++j)
      c[r * ldc + j] = alpha * acc[j] + (accumulate ? c[r * ldc + j] : 0.f);
  }
#endif
}

// C[m, 16 * n_panels] (= or +=) alpha * A[m, k] * B, B in panels (see above); A row-major.
// prefetch: `prefetch_rows` panel rows (one cache line each) from there are requested into L2, a share
// before each register block, for a caller whose next call streams B from memory (packed_linear: a
// step's weights; the first row block of a panel would otherwise wait for its lines).
inline void gemm_panels(int64_t m, int64_t n_panels, int64_t k, float alpha, const float* a,
                        int64_t lda, const float* bp, int64_t panel_stride, float* c, int64_t ldc,
                        bool accumulate, const float* prefetch = nullptr, int64_t prefetch_rows = 0) {
#ifdef HK_AVX512
  // Blocks of 6 rows x up to 4 panels; a single panel (packed_linear) takes 12 rows instead, so it
  // still keeps 12 accumulators in flight.
  const int64_t NP = std::min<int64_t>(n_panels, 4), MR = NP == 1 ? 12 : 6;
#else
  constexpr int64_t NP = 1, MR = 6;
#endif
  const int64_t depth = panel_depth(NP);
  const int64_t blocks = (m + MR - 1) / MR * ((n_panels + NP - 1) / NP) * ((k + depth - 1) / depth);
  [[maybe_unused]] const int64_t per_block = prefetch && blocks ? (prefetch_rows + blocks - 1) / blocks : 0;
  [[maybe_unused]] int64_t line = 0;
  for (int64_t p0 = 0; p0 < k; p0 += depth) {
    const int64_t kc = std::min(depth, k - p0);
    const bool acc = accumulate || p0 > 0;
#ifdef HK_AVX512
    for (int64_t j = 0, np; j < n_panels; j += np) {
      np = balanced_block(n_panels - j, NP);
#else
    for (int64_t j = 0, np = 1; j < n_panels; j += np) {
#endif
      const float* b = bp + j * panel_stride + p0 * kPanel;
      for (int64_t i0 = 0, mr; i0 < m; i0 += mr) {
#ifdef HK_AVX2
        for (const int64_t end = std::min(prefetch_rows, line + per_block); line < end; ++line)
          _mm_prefetch(reinterpret_cast<const char*>(prefetch + line * kPanel), _MM_HINT_T1);
#endif
#ifdef HK_AVX512
        mr = balanced_block(m - i0, MR);
        block_fn<false>(mr, np)(kc, alpha, a + i0 * lda + p0, lda, b, kPanel, panel_stride, c + i0 * ldc + j * kPanel,
                                ldc, acc);
#else
        mr = std::min(MR, m - i0);
        panel_block(mr, kc, alpha, a + i0 * lda + p0, lda, b, c + i0 * ldc + j * kPanel, ldc, acc);
#endif
      }
    }
  }
}

// exp(x) with ~2 ulp error on [-87, 88]; exactly 0 below (so masked -inf scores vanish). Written
// without branches so `#pragma omp simd` loops over it vectorise.
inline float fast_exp(float x) {
  const bool underflow = x < -87.0f;
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float t = x * 1.44269504088896341f;
  const float n = std::nearbyint(t);
  const float f = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;  // Cody-Waite
  // exp(f) on |f| <= ln2/2, degree-6 minimax-style Taylor.
  float p = 1.3888889e-3f;
  p = p * f + 8.3333338e-3f;
  p = p * f + 4.1666668e-2f;
  p = p * f + 1.6666667e-1f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? 0.0f : p * scale;
}

// PyTorch's GELU(approximate="tanh"): 0.5 y (1 + tanh(u)) = y s with s = 1 / (1 + exp(-2u)),
// u = sqrt(2 / pi) (y + 0.044715 y^3); the second form has no cancellation near u = 0. Its derivative
// is s + y * 2 s (1 - s) * du/dy (1 - tanh(u)^2 = 4 s (1 - s)).
constexpr float kGeluC = 0.7978845608028654f, kGeluA = 0.044715f;

inline float gelu_tanh(float y) {
  const float u = kGeluC * (y + kGeluA * y * y * y);
  return y / (1.f + fast_exp(-2.f * u));
}

inline float gelu_tanh_grad(float y) {
  const float u = kGeluC * (y + kGeluA * y * y * y);
  const float du = kGeluC * (1.f + 3.f * kGeluA * y * y);
  const float s = 1.f / (1.f + fast_exp(-2.f * u));
  return s + 2.f * y * s * (1.f - s) * du;
}

#ifdef HK_AVX2
// The vector operations exp_n needs, per register width, so the AVX2 and AVX-512 versions are one
// algorithm (and lane for lane the same bits).
struct Vec8 {
  using V = __m256;
  using M = __m256;  // lane mask
  static constexpr int64_t kLanes = 8;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
  // p 32-byte aligned (a Scratch array, a multiple of kLanes in): GCC tuned for Zen 1 splits every
  // 256-bit store it cannot prove aligned into two 128-bit halves, one more instruction per store.
  static void store_aligned(float* p, V x) { _mm256_store_ps(p, x); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static V clamp(V x, float lo, float hi) { return _mm256_min_ps(_mm256_max_ps(x, set1(lo)), set1(hi)); }
  static M less(V x, float y) { return _mm256_cmp_ps(x, set1(y), _CMP_LT_OQ); }
  static V zero_where(M m, V x) { return _mm256_andnot_ps(m, x); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  // Every lane of lo >= a and of hi <= b (false for NaN).
  static bool all_within(V lo, V hi, float a, float b) {
    return _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(lo, set1(a), _CMP_GE_OQ),
                                            _mm256_cmp_ps(hi, set1(b), _CMP_LE_OQ))) == 0xff;
  }
  // x * 2^(low bits of t's mantissa): the exponent field rebuilt from the integer in t's low bits.
  static V scale_by_low_bits(V x, V t) {
    return mul(x, _mm256_castsi256_ps(_mm256_slli_epi32(
                      _mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127)), 23)));
  }
  // x with the integer in t's low mantissa bits added to its exponent field (an integer add).
  static V add_to_exponent(V x, V t) {
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(x), _mm256_slli_epi32(_mm256_castps_si256(t), 23)));
  }
  static V fmsub(V a, V b, V c) { return _mm256_fmsub_ps(a, b, c); }
  static M within(V x, float lo, float hi) {  // lo <= x <= hi (false for NaN)
    return _mm256_and_ps(_mm256_cmp_ps(x, set1(lo), _CMP_GE_OQ), _mm256_cmp_ps(x, set1(hi), _CMP_LE_OQ));
  }
  static M not_ge(V x, float lo) { return _mm256_cmp_ps(x, set1(lo), _CMP_NGE_UQ); }  // x < lo or NaN
  static V select(M m, V a, V b) { return _mm256_blendv_ps(b, a, m); }              // m ? a : b
  static M greater(V x, float y) { return _mm256_cmp_ps(x, set1(y), _CMP_GT_OQ); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V neg_abs(V x) { return _mm256_or_ps(x, set1(-0.f)); }  // -|x| (the sign bit set)
};

#ifdef HK_AVX512
struct Vec16 {
  using V = __m512;
  using M = __mmask16;
  static constexpr int64_t kLanes = 16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V x) { _mm512_storeu_ps(p, x); }
  static void store_aligned(float* p, V x) { _mm512_store_ps(p, x); }  // p 64-byte aligned
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static V clamp(V x, float lo, float hi) { return _mm512_min_ps(_mm512_max_ps(x, set1(lo)), set1(hi)); }
  static M less(V x, float y) { return _mm512_cmp_ps_mask(x, set1(y), _CMP_LT_OQ); }
  static V zero_where(M m, V x) { return _mm512_maskz_mov_ps((M)~m, x); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static bool all_within(V lo, V hi, float a, float b) {
    return (_mm512_cmp_ps_mask(lo, set1(a), _CMP_GE_OQ) & _mm512_cmp_ps_mask(hi, set1(b), _CMP_LE_OQ)) == 0xffff;
  }
  static V scale_by_low_bits(V x, V t) {
    return mul(x, _mm512_castsi512_ps(_mm512_slli_epi32(
                      _mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(127)), 23)));
  }
  static V add_to_exponent(V x, V t) {
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(x), _mm512_slli_epi32(_mm512_castps_si512(t), 23)));
  }
  static V fmsub(V a, V b, V c) { return _mm512_fmsub_ps(a, b, c); }
  static M within(V x, float lo, float hi) {
    return _mm512_cmp_ps_mask(x, set1(lo), _CMP_GE_OQ) & _mm512_cmp_ps_mask(x, set1(hi), _CMP_LE_OQ);
  }
  static M not_ge(V x, float lo) { return _mm512_cmp_ps_mask(x, set1(lo), _CMP_NGE_UQ); }
  static V select(M m, V a, V b) { return _mm512_mask_blend_ps(m, b, a); }
  static M greater(V x, float y) { return _mm512_cmp_ps_mask(x, set1(y), _CMP_GT_OQ); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V neg_abs(V x) {  // integer or: _mm512_or_ps needs AVX512DQ
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(x), _mm512_set1_epi32(int(0x80000000u))));
  }
};
#endif

// Lanes of fast_exp (same polynomial, same error, same exact 0 below -87) for each of N vectors,
// in place, stage by stage across the N. One exp is a ~45-cycle dependency chain of ~20 uops;
// issued one after another, the out-of-order window holds only two or three of them, so a loop of
// single exps runs well below the FMA throughput. Interleaving N chains in program order hands the
// core N independent uops at every stage; the result is bit-identical for any N (and either width).
// N = 4 keeps the working set (x, t, f, p of each) inside the 16 ymm registers.
// n = round(x log2 e) comes from adding and subtracting 1.5 * 2^23 (round to nearest even, as
// nearbyint) and 2^n from the low bits of that sum: two adds on the FADD ports instead of vroundps
// and vcvtps2dq, which share a port with the polynomial's FMAs. Same n, same bits.
// Clamp = false skips the clamp to [-87, 88] and the underflow mask: for callers that have checked
// that every input lies in that range, where both are the identity (same bits again).
template <class O, int N, bool Clamp = true>
inline void exp_n(typename O::V* x) {
  using V = typename O::V;
  const V magic = O::set1(12582912.f);  // 1.5 * 2^23
  typename O::M under[N];
  V t[N], f[N], p[N];
  if constexpr (Clamp) {
    _Pragma("GCC unroll 8") for (int i = 0; i < N; ++i) {
      under[i] = O::less(x[i], -87.0f);
      x[i] = O::clamp(x[i], -87.0f, 88.0f);
    }
  }
  _Pragma("GCC unroll 8") for (int i = 0; i < N; ++i)
    t[i] = O::add(O::mul(x[i], O::set1(1.44269504088896341f)), magic);
  _Pragma("GCC unroll 8") for (int i = 0; i < N; ++i) {
    const V n = O::sub(t[i], magic);
    f[i] = O::fnmadd(n, O::set1(0.693145751953125f), x[i]);  // Cody-Waite
    f[i] = O::fnmadd(n, O::set1(1.428606765330187e-06f), f[i]);
  }
  _Pragma("GCC unroll 8") for (int i = 0; i < N; ++i) p[i] = O::set1(1.3888889e-3f);
  for (float c : {8.3333338e-3f, 4.1666668e-2f, 1.6666667e-1f, 0.5f, 1.0f, 1.0f})
    _Pragma("GCC unroll 8") for (int i = 0; i < N; ++i) p[i] = O::fmadd(p[i], f[i], O::set1(c));
  _Pragma("GCC unroll 8") for (int i = 0; i < N; ++i) {
    // The sum's low mantissa bits hold n (two's complement); << 23 keeps n + 127 as the exponent.
    x[i] = O::scale_by_low_bits(p[i], t[i]);
    if constexpr (Clamp) x[i] = O::zero_where(under[i], x[i]);
  }
}

template <int N, bool Clamp = true>
inline void exp8_n(__m256* x) { exp_n<Vec8, N, Clamp>(x); }

inline __m256 exp8(__m256 x) {
  exp8_n<1>(&x);
  return x;
}

inline __m256 gelu_tanh8(__m256 y) {
  const __m256 y3 = _mm256_mul_ps(_mm256_mul_ps(y, y), y);
  const __m256 u = _mm256_fmadd_ps(_mm256_set1_ps(kGeluA), y3, y);
  const __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.f * kGeluC), u));
  return _mm256_div_ps(y, _mm256_add_ps(_mm256_set1_ps(1.f), e));
}

inline __m256 gelu_tanh_grad8(__m256 y) {
  const __m256 y2 = _mm256_mul_ps(y, y);
  const __m256 u = _mm256_mul_ps(_mm256_fmadd_ps(_mm256_set1_ps(kGeluA), _mm256_mul_ps(y2, y), y),
                                 _mm256_set1_ps(kGeluC));
  const __m256 du = _mm256_mul_ps(_mm256_fmadd_ps(_mm256_set1_ps(3.f * kGeluA), y2, _mm256_set1_ps(1.f)),
                                  _mm256_set1_ps(kGeluC));
  const __m256 s = _mm256_div_ps(_mm256_set1_ps(1.f),
                                 _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_mul_ps(_mm256_set1_ps(-2.f), u))));
  const __m256 ys1s2 = _mm256_mul_ps(_mm256_mul_ps(_mm256_add_ps(y, y), s), _mm256_sub_ps(_mm256_set1_ps(1.f), s));
  return _mm256_fmadd_ps(ys1s2, du, s);
}

// dst[c * ldd + r] = src[r * lds + c] for an 8 x 8 block. Each register is loaded as two 128-bit
// halves, rows r and r + 4 side by side, so the two 4 x 4 transposes run within 128-bit lanes and no
// lane-crossing permute is needed (vperm2f128 is 8 macro-ops on Zen 1; selective_scan's forward
// transposes three inputs and its output in 8 x 8 blocks). AlignedDst: dst and ldd keep every row
// 32-byte aligned (see Vec8::store_aligned).
template <bool AlignedDst = false>
inline void transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 4; ++i)
    for (int h = 0; h < 2; ++h)  // r[i]: columns 0-3 of rows i, i + 4; r[i + 4]: columns 4-7
      r[i + 4 * h] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(src + i * lds + 4 * h)),
                                          _mm_loadu_ps(src + (i + 4) * lds + 4 * h), 1);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 8; ++i) {
    if constexpr (AlignedDst) _mm256_store_ps(dst + i * ldd, r[i]);
    else _mm256_storeu_ps(dst + i * ldd, r[i]);
  }
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#ifdef HK_AVX512
// op(low 8 lanes, high 8 lanes), in registers. Not _mm512_reduce_* or _mm512_castps512_ps256: those
// inline GCC 12's false maybe-uninitialized warning (see the top of this file) into every caller; the
// masked extract names its pass-through operand. (A version through a 64-byte stack buffer cost a
// store-forwarding stall per softmax row.)
template <class Op>
inline __m256 halves(__m512 v, Op op) {
  const __m512d d = _mm512_castps_pd(v);
  return op(_mm256_castpd_ps(_mm512_mask_extractf64x4_pd(_mm256_setzero_pd(), 0xF, d, 0)),
            _mm256_castpd_ps(_mm512_mask_extractf64x4_pd(_mm256_setzero_pd(), 0xF, d, 1)));
}
#endif

inline float row_max(const float* x, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
#ifdef HK_AVX512
  __m512 vw = _mm512_set1_ps(mx);
  for (; j + 16 <= n; j += 16) vw = _mm512_max_ps(vw, _mm512_loadu_ps(x + j));
  mx = hmax8(halves(vw, [](__m256 a, __m256 b) { return _mm256_max_ps(a, b); }));
#endif
#ifdef HK_AVX2
  __m256 vm = _mm256_set1_ps(mx);
  for (; j + 8 <= n; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + j));
  mx = hmax8(vm);
#endif
  for (; j < n; ++j) mx = std::max(mx, x[j]);
  return mx;
}

// sum_j a[j] * b[j], vectorised (a plain float sum loop compiles to one dependent add chain): the
// attention backwards' delta = rowsum(dO * O).
inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

#ifdef HK_AVX2
// x[j] = exp(x[j] - m) in place from j on, in chunks of four vectors of O's width (four exps
// interleaved, exp_n); with vs, their sum is added to *vs in order. Returns the first j not done.
template <class O>
inline int64_t exp_sub_chunks(float* x, int64_t j, int64_t n, float m, typename O::V* vs) {
  constexpr int64_t W = O::kLanes;
  const typename O::V vm = O::set1(m);
  for (; j + 4 * W <= n; j += 4 * W) {
    typename O::V p[4];
    for (int u = 0; u < 4; ++u) p[u] = O::sub(O::load(x + j + W * u), vm);
    // Softmax arguments are <= 0 and rarely below -87: then the clamp and underflow mask are the
    // identity and are skipped (same bits); a chunk with any lane outside (or NaN) keeps them.
    const typename O::V lo = O::min(O::min(p[0], p[1]), O::min(p[2], p[3]));
    const typename O::V hi = O::max(O::max(p[0], p[1]), O::max(p[2], p[3]));
    if (O::all_within(lo, hi, -87.0f, 88.0f)) exp_n<O, 4, false>(p);
    else exp_n<O, 4, true>(p);
    for (int u = 0; u < 4; ++u) {
      O::store(x + j + W * u, p[u]);
      if (vs) *vs = O::add(*vs, p[u]);
    }
  }
  return j;
}
#endif

// x[j] = exp(x[j] - m) in place; returns the sum.
inline float exp_sub_sum(float* x, int64_t n, float m) {
  float sum = 0.f;
  int64_t j = 0;
#ifdef HK_AVX512
  __m512 vw = _mm512_setzero_ps();
  j = exp_sub_chunks<Vec16>(x, j, n, m, &vw);
  sum = hsum8(halves(vw, [](__m256 a, __m256 b) { return _mm256_add_ps(a, b); }));
#endif
#ifdef HK_AVX2
  __m256 vs = _mm256_setzero_ps();
  j = exp_sub_chunks<Vec8>(x, j, n, m, &vs);
  for (const __m256 vm = _mm256_set1_ps(m); j + 8 <= n; j += 8) {
    const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm));
    _mm256_storeu_ps(x + j, p);
    vs = _mm256_add_ps(vs, p);
  }
  sum += hsum8(vs);
#endif
  for (; j < n; ++j) {
    x[j] = fast_exp(x[j] - m);
    sum += x[j];
  }
  return sum;
}

// x[j] = exp(x[j] - m) in place (the backward, with m the row's log-sum-exp).
inline void exp_sub(float* x, int64_t n, float m) {
  int64_t j = 0;
#ifdef HK_AVX512
  j = exp_sub_chunks<Vec16>(x, j, n, m, nullptr);
#endif
#ifdef HK_AVX2
  j = exp_sub_chunks<Vec8>(x, j, n, m, nullptr);
  for (const __m256 vm = _mm256_set1_ps(m); j + 8 <= n; j += 8)
    _mm256_storeu_ps(x + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm)));
#endif
  for (; j < n; ++j) x[j] = fast_exp(x[j] - m);
}

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }

// Pointer to a rows x cols float tile of `base` (strides in elements). float data with unit column
// stride is used in place (ld = row stride); anything else is converted into `buf` (ld = cols).
// With `pack`, float data is copied too: the narrow GEMMs stream the tile row by row, and rows a
// (heads * head_dim)-sized stride apart (4 KiB for 16 x 64 floats) alias in the L1 sets.
// `copy` always converts into `buf` (for callers that modify the tile).
template <typename T>
inline const float* load_tile(const T* base, int64_t rows, int64_t cols, int64_t row_stride,
                              int64_t col_stride, float* buf, int64_t* ld, bool pack = false,
                              bool copy = false) {
  if constexpr (std::is_same_v<T, float>) {
    if (!copy && col_stride == 1 && (!pack || row_stride == cols)) {
      *ld = row_stride;
      return base;
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    const T* src = base + i * row_stride;
    float* dst = buf + i * cols;
    if (col_stride == 1) {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) dst[j] = to_f(src[j]);
    } else {
      for (int64_t j = 0; j < cols; ++j) dst[j] = to_f(src[j * col_stride]);
    }
  }
  *ld = cols;
  return buf;
}

// Scales each row of a float tile to unit L2 norm times `mult` (the norm clamped below at 1e-12, as
// F.normalize): the cos-attention prologue, applied to q and k tiles as they are loaded.
inline void normalize_rows(float* x, int64_t rows, int64_t cols, int64_t ld, float mult) {
  for (int64_t i = 0; i < rows; ++i) {
    float* xi = x + i * ld;
    float ss = 0.f;  // summed in order, as the forward's panel packing does (same bits)
    for (int64_t j = 0; j < cols; ++j) ss += xi[j] * xi[j];
    const float f = mult / std::max(std::sqrt(ss), 1e-12f);
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) xi[j] *= f;
  }
}

// exp(min(t, ln 100)): VAR's clamped per-head logit multiplier.
inline float temperature_multiplier(float t) { return std::exp(std::min(t, std::log(100.f))); }

// Writes a rows x cols float tile (ld = cols) to `base` with any strides, converting to T.
template <typename T>
inline void store_tile(const float* tile, int64_t rows, int64_t cols, T* base, int64_t row_stride,
                       int64_t col_stride) {
  for (int64_t i = 0; i < rows; ++i) {
    T* dst = base + i * row_stride;
    const float* src = tile + i * cols;
    if (col_stride == 1) {
      for (int64_t j = 0; j < cols; ++j) dst[j] = static_cast<T>(src[j]);
    } else {
      for (int64_t j = 0; j < cols; ++j) dst[j * col_stride] = static_cast<T>(src[j]);
    }
  }
}

}  // namespace hierkern::cpu
#pragma GCC diagnostic pop
