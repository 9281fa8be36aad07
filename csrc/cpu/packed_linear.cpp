// Inference linear layers for small row blocks (hierkern/models/_linear.py): the per-step blocks of
// the diffusion LMs' cached strategies, 32 rows through a 128-wide model. At that size BLAS re-packs
// the (N, K) weight on every call (as much time as its FMAs, measured in a dual-cache step) and the
// bias, activation and residual add are three more passes over the output. Here the weight is packed
// once per generation into the panel layout of gemm_panels (cpu_math.h) and every call is one pass:
// per 16-column panel, the GEMM of all rows into an L1 tile, then bias, tanh-GELU and the residual
// while the tile is hot.
//
// pack_linear_weight(w (N, K)) -> (ceil(N / 16), K, 16): panel j holds W^T[:, 16j : 16j + 16], the
// columns past N zero.
// packed_linear(x (..., K), packed, N, bias (N,)?, gelu, residual (..., N)?) -> (..., N):
// residual + act(x W^T + bias), act PyTorch's GELU(approximate="tanh") when gelu, else the identity.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu/cpu_math.h"

namespace hierkern::cpu {
namespace {

constexpr int64_t kRowBlock = 96;  // rows of one task's tile (a multiple of gemm_panels' 6-row blocks)
// Calls below this many multiply-adds run on the calling thread: a 32-row block's GEMMs (0.5-2M) were
// slower with a second thread here (waking it costs more than half of the arithmetic).
constexpr int64_t kSerialMacs = int64_t{1} << 22;

// The row stride of t viewed as (rows, t.size(-1)) without a copy: the last dimension unit-stride and
// the leading ones collapsing into one uniformly strided index.
int64_t row_stride(const at::Tensor& t, const char* name) {
  const int64_t d = t.dim();
  TORCH_CHECK(d >= 1 && (t.size(-1) <= 1 || t.stride(-1) == 1), "hierkern::packed_linear: ", name,
              " must have a unit-stride last dimension, got sizes ", t.sizes(), " and strides ", t.strides());
  int64_t ld = -1, expect = 0;
  for (int64_t i = d - 2; i >= 0; --i) {
    if (t.size(i) == 1) continue;  // its stride is arbitrary
    TORCH_CHECK(ld < 0 || t.stride(i) == expect, "hierkern::packed_linear: ", name, " must view as (rows, ",
                t.size(-1), ") without a copy (leading dimensions collapsible), got sizes ", t.sizes(),
                " and strides ", t.strides());
    if (ld < 0) ld = t.stride(i);
    expect = t.stride(i) * t.size(i);
  }
  return ld < 0 ? t.size(-1) : ld;  // one row
}

void check_f32_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "hierkern::packed_linear: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "hierkern::packed_linear: ", name, " must be float32, got ",
              t.scalar_type());
}

at::Tensor pack_linear_weight_cpu(const at::Tensor& w) {
  check_f32_cpu(w, "weight");
  TORCH_CHECK(w.dim() == 2, "hierkern::pack_linear_weight: weight must be 2-D (out_features, in_features), got ",
              w.dim(), "-D");
  const int64_t N = w.size(0), K = w.size(1), P = (N + kPanel - 1) / kPanel;
  at::Tensor packed = at::zeros({P, K, kPanel}, w.options());
  const float* src = w.const_data_ptr<float>();
  float* dst = packed.mutable_data_ptr<float>();
  const int64_t s0 = w.stride(0), s1 = w.stride(1);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) dst[((n / kPanel) * K + k) * kPanel + n % kPanel] = src[n * s0 + k * s1];
  return packed;
}

// y <- GELU(y) with the tanh approximation: 0.5 y (1 + tanh(u)) = y / (1 + exp(-2u)),
// u = sqrt(2 / pi) (y + 0.044715 y^3); the second form has no cancellation near u = 0.
inline float gelu_tanh(float y) {
  const float u = 0.7978845608028654f * (y + 0.044715f * y * y * y);
  return y / (1.f + fast_exp(-2.f * u));
}

#ifdef HK_AVX2
inline __m256 gelu_tanh8(__m256 y) {
  const __m256 y3 = _mm256_mul_ps(_mm256_mul_ps(y, y), y);
  const __m256 u = _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), y3, y);
  const __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.f * 0.7978845608028654f), u));
  return _mm256_div_ps(y, _mm256_add_ps(_mm256_set1_ps(1.f), e));
}
#endif

// tile[rows, 16] = A[rows, K] * panel, and the K cache lines of `next` (the panel the following task
// streams, or nullptr) requested into L2 a share before each 6-row block. A step's weights come from
// memory (every layer's once per step); without this the first row block of each panel waits for its
// lines and the other blocks find them in L1, so memory time and FMA time added up.
void panel_gemm_prefetching(int64_t rows, int64_t K, const float* a, int64_t lda, const float* panel, float* tile,
                            const float* next) {
  constexpr int64_t MR = 6;
  const int64_t blocks = (rows + MR - 1) / MR * ((K + kPanelDepth - 1) / kPanelDepth);
  const int64_t per_block = next ? (K + blocks - 1) / blocks : 0;
  int64_t line = 0;
  if (K == 0) std::fill(tile, tile + rows * kPanel, 0.f);
  for (int64_t p0 = 0; p0 < K; p0 += kPanelDepth) {
    const int64_t kc = std::min(kPanelDepth, K - p0);
    for (int64_t i0 = 0; i0 < rows; i0 += MR) {
#ifdef HK_AVX2
      for (int64_t end = std::min(K, line + per_block); line < end; ++line)
        _mm_prefetch(reinterpret_cast<const char*>(next + line * kPanel), _MM_HINT_T1);
#endif
      panel_block(std::min(MR, rows - i0), kc, 1.f, a + i0 * lda + p0, lda, panel + p0 * kPanel, tile + i0 * kPanel,
                  kPanel, p0 > 0);
    }
  }
}

struct Epilogue {
  const float* bias;  // (N,) dense, or nullptr
  bool gelu;
  const float* res;   // residual rows, or nullptr
  int64_t ldr;
};

// out[i, j0 + c] = res + act(tile[i, c] + bias[j0 + c]) for the w <= 16 valid columns of a panel.
void finish_panel(const float* tile, int64_t rows, int64_t j0, int64_t w, const Epilogue& e, int64_t i0,
                  float* out, int64_t ldo) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* t = tile + i * kPanel;
    float* o = out + (i0 + i) * ldo + j0;
    const float* r = e.res ? e.res + (i0 + i) * e.ldr + j0 : nullptr;
    int64_t c = 0;
#ifdef HK_AVX2
    for (; c + 8 <= w; c += 8) {
      __m256 y = _mm256_loadu_ps(t + c);
      if (e.bias) y = _mm256_add_ps(y, _mm256_loadu_ps(e.bias + j0 + c));
      if (e.gelu) y = gelu_tanh8(y);
      if (r) y = _mm256_add_ps(y, _mm256_loadu_ps(r + c));
      _mm256_storeu_ps(o + c, y);
    }
#endif
    for (; c < w; ++c) {
      float y = t[c] + (e.bias ? e.bias[j0 + c] : 0.f);
      if (e.gelu) y = gelu_tanh(y);
      o[c] = r ? r[c] + y : y;
    }
  }
}

at::Tensor packed_linear_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                             const std::optional<at::Tensor>& bias, bool gelu_tanh_act,
                             const std::optional<at::Tensor>& residual) {
  check_f32_cpu(x, "x");
  check_f32_cpu(packed, "packed");
  const int64_t K = x.size(-1), N = out_features, P = (N + kPanel - 1) / kPanel;
  TORCH_CHECK(N >= 1, "hierkern::packed_linear: out_features must be >= 1, got ", N);
  TORCH_CHECK(packed.dim() == 3 && packed.size(0) == P && packed.size(1) == K && packed.size(2) == kPanel &&
                  packed.is_contiguous(),
              "hierkern::packed_linear: packed must be pack_linear_weight's contiguous (", P, ", ", K, ", ", kPanel,
              ") panels for out_features ", N, " and x's in_features ", K, ", got ", packed.sizes());
  const int64_t lda = row_stride(x, "x");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  std::vector<float> b;
  if (bias.has_value()) {
    check_f32_cpu(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "hierkern::packed_linear: bias must be (out_features,) = (",
                N, ",), got ", bias->sizes());
    b.resize(N);
    const float* bp = bias->const_data_ptr<float>();
    for (int64_t j = 0; j < N; ++j) b[j] = bp[j * bias->stride(0)];
  }
  Epilogue e{b.empty() ? nullptr : b.data(), gelu_tanh_act, nullptr, 0};
  if (residual.has_value()) {
    check_f32_cpu(*residual, "residual");
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out_shape), "hierkern::packed_linear: residual must have the ",
                "output's shape ", at::IntArrayRef(out_shape), ", got ", residual->sizes());
    e.res = residual->const_data_ptr<float>();
    e.ldr = row_stride(*residual, "residual");
  }
  at::Tensor out = at::empty(out_shape, x.options());
  const int64_t M = K == 0 ? out.numel() / N : x.numel() / K;
  if (M == 0) return out;
  const float* a = x.const_data_ptr<float>();
  const float* w = packed.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  const int64_t row_blocks = (M + kRowBlock - 1) / kRowBlock, tasks = row_blocks * P;
  // Panels outer, row blocks inner within a task range: consecutive tasks share a weight panel.
  const int64_t grain = M * K * N < kSerialMacs ? tasks : 1;
  at::parallel_for(0, tasks, grain, [&](int64_t lo, int64_t hi) {
    float tile[kRowBlock * kPanel];
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t j = t / row_blocks, i0 = (t % row_blocks) * kRowBlock;
      const int64_t rows = std::min(kRowBlock, M - i0);
      const float* next = t + 1 < hi && (t + 1) % row_blocks == 0 ? w + (j + 1) * K * kPanel : nullptr;
      panel_gemm_prefetching(rows, K, a + i0 * lda, lda, w + j * K * kPanel, tile, next);
      finish_panel(tile, rows, j * kPanel, std::min(kPanel, N - j * kPanel), e, i0, o, N);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hierkern, CPU, m) {
  m.impl("pack_linear_weight", &pack_linear_weight_cpu);
  m.impl("packed_linear", &packed_linear_cpu);
}

}  // namespace hierkern::cpu
