// Inference linear layers for small row blocks (hierkern/models/_linear.py): the per-step blocks of
// the diffusion LMs' cached strategies, 32 rows through a 128-wide model. At that size BLAS re-packs
// the (N, K) weight on every call (as much time as its FMAs, measured in a dual-cache step) and the
// pre-norm, bias, activation and residual add are four more calls. Here the weight is packed once per
// generation into the panel layout of gemm_panels (cpu_math.h) and one call does the rest: the rows
// normalised once (with the pre-norm) into a packed copy, then per 16-column panel the GEMM of all rows
// into an L1 tile and bias, tanh-GELU and the residual while the tile is hot.
//
// pack_linear_weight(w (N, K)) -> (ceil(N / 16), K, 16): panel j holds W^T[:, 16j : 16j + 16], the
// columns past N zero.
// packed_linear(x (..., K), packed, N, bias (N,)?, gelu, residual (..., N)?, norm_weight (K,)?,
// norm_bias (K,)?, eps) -> (..., N): residual + act(n(x) W^T + bias), act PyTorch's
// GELU(approximate="tanh") when gelu, else the identity; n the LayerNorm(K, eps) with norm_weight /
// norm_bias when norm_weight is given (a pre-norm block's norm and projection in one call), else the
// identity.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu/cpu_math.h"
#include "cpu/f32_rows.h"

namespace hierkern::cpu {
namespace {

constexpr int64_t kRowBlock = 96;  // rows of one task's tile (a multiple of gemm_panels' 6-row blocks)
// Calls below this many multiply-adds run on the calling thread: a 32-row block's GEMMs (0.5-2M) were
// slower with a second thread here (waking it costs more than half of the arithmetic).
constexpr int64_t kSerialMacs = int64_t{1} << 22;

// The offset of each row of t viewed as (rows, t.size(-1)): any strides but a unit-stride last
// dimension (a row is read as K contiguous floats). A slice of a batch of sequences (x[:, s:e]) is
// not one uniformly strided matrix; the GEMM then reads a packed copy of its rows (see below).
std::vector<int64_t> row_offsets(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 1 && (t.size(-1) <= 1 || t.stride(-1) == 1), "hierkern::packed_linear: ", name,
              " must have a unit-stride last dimension, got sizes ", t.sizes(), " and strides ", t.strides());
  std::vector<int64_t> off{0};
  for (int64_t i = t.dim() - 2; i >= 0; --i) {  // innermost leading dimension first
    const size_t m = off.size();
    off.resize(m * t.size(i));
    for (int64_t r = t.size(i) - 1; r >= 0; --r)
      for (size_t q = 0; q < m; ++q) off[r * m + q] = off[q] + r * t.stride(i);
  }
  return off;
}

// The common stride of rows at offsets off (0 for fewer than two rows), or -1 if they are not evenly
// spaced.
int64_t uniform_stride(const std::vector<int64_t>& off) {
  if (off.size() < 2) return 0;
  const int64_t ld = off[1] - off[0];
  for (size_t i = 1; i < off.size(); ++i)
    if (off[i] - off[i - 1] != ld) return -1;
  return ld;
}

constexpr const char* kOp = "hierkern::packed_linear";

at::Tensor pack_linear_weight_cpu(const at::Tensor& w) {
  check_f32_cpu("hierkern::pack_linear_weight", w, "weight");
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

struct Epilogue {
  const float* bias;  // (N,) dense, or nullptr
  bool gelu;
  const float* res;   // residual rows, or nullptr
  const int64_t* res_off;  // its row offsets
};

// out[i, j0 + c] = res + act(tile[i, c] + bias[j0 + c]) for the w <= 16 valid columns of a panel.
void finish_panel(const float* tile, int64_t rows, int64_t j0, int64_t w, const Epilogue& e, int64_t i0,
                  float* out, int64_t ldo) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* t = tile + i * kPanel;
    float* o = out + (i0 + i) * ldo + j0;
    const float* r = e.res ? e.res + e.res_off[i0 + i] + j0 : nullptr;
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

// dst[i, :] = LayerNorm(row i) * w + b (b optional) for rows [lo, hi) at src + off[i]: mean, then the variance
// of the centred row (two passes over a row in L1), as torch.layer_norm in float32.
void layer_norm_rows(const float* src, const int64_t* off, int64_t lo, int64_t hi, int64_t K, const float* w,
                     const float* b, float eps, float* dst) {
  for (int64_t i = lo; i < hi; ++i) {
    const float* x = src + off[i];
    float* y = dst + i * K;
    double sum = 0.0;
    for (int64_t k = 0; k < K; ++k) sum += x[k];
    const float mean = static_cast<float>(sum / K);
    double sq = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      const float c = x[k] - mean;
      sq += static_cast<double>(c) * c;
    }
    const float rstd = 1.f / std::sqrt(static_cast<float>(sq / K) + eps);
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) y[k] = (x[k] - mean) * rstd * w[k] + (b ? b[k] : 0.f);
  }
}

at::Tensor packed_linear_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                             const std::optional<at::Tensor>& bias, bool gelu_tanh_act,
                             const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& norm_weight,
                             const std::optional<at::Tensor>& norm_bias, double eps) {
  check_f32_cpu(kOp, x, "x");
  check_f32_cpu(kOp, packed, "packed");
  const int64_t K = x.size(-1), N = out_features, P = (N + kPanel - 1) / kPanel;
  TORCH_CHECK(N >= 1, "hierkern::packed_linear: out_features must be >= 1, got ", N);
  TORCH_CHECK(packed.dim() == 3 && packed.size(0) == P && packed.size(1) == K && packed.size(2) == kPanel &&
                  packed.is_contiguous(),
              "hierkern::packed_linear: packed must be pack_linear_weight's contiguous (", P, ", ", K, ", ", kPanel,
              ") panels for out_features ", N, " and x's in_features ", K, ", got ", packed.sizes());
  const std::vector<int64_t> xoff = row_offsets(x, "x");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const std::vector<float> b = bias.has_value() ? dense_param(kOp, *bias, N, "bias", "out_features") : std::vector<float>();
  TORCH_CHECK(!norm_weight.has_value() || K >= 1, "hierkern::packed_linear: the layer norm needs in_features >= 1");
  TORCH_CHECK(norm_weight.has_value() || !norm_bias.has_value(),
              "hierkern::packed_linear: norm_bias needs norm_weight (the layer norm runs when norm_weight is given)");
  const std::vector<float> nw = norm_weight.has_value() ? dense_param(kOp, *norm_weight, K, "norm_weight", "in_features")
                                                        : std::vector<float>();
  const std::vector<float> nb = norm_bias.has_value() ? dense_param(kOp, *norm_bias, K, "norm_bias", "in_features")
                                                      : std::vector<float>();
  Epilogue e{b.empty() ? nullptr : b.data(), gelu_tanh_act, nullptr, nullptr};
  std::vector<int64_t> roff;
  if (residual.has_value()) {
    check_f32_cpu(kOp, *residual, "residual");
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out_shape), "hierkern::packed_linear: residual must have the ",
                "output's shape ", at::IntArrayRef(out_shape), ", got ", residual->sizes());
    e.res = residual->const_data_ptr<float>();
    roff = row_offsets(*residual, "residual");
    e.res_off = roff.data();
  }
  at::Tensor out = at::empty(out_shape, x.options());
  const int64_t M = K == 0 ? out.numel() / N : x.numel() / K;
  if (M == 0) return out;
  const float* a = x.const_data_ptr<float>();
  const float* w = packed.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  const int64_t row_blocks = (M + kRowBlock - 1) / kRowBlock, tasks = row_blocks * P;
  // Panels outer, row blocks inner within a task range: consecutive tasks share a weight panel.
  const bool serial = M * K * N < kSerialMacs;
  const int64_t grain = serial ? tasks : 1;
  // A: x's rows in place when evenly spaced; else (a slice across a batch) or with the pre-norm, a
  // packed (M, K) copy made once, before the panels read it.
  int64_t ld = uniform_stride(xoff);
  FloatBuf packed_rows;
  if (!nw.empty() || ld < 0) {
    packed_rows = scratch_floats(M * K);
    float* dst = packed_rows.get();
    at::parallel_for(0, M, serial ? M : 16, [&](int64_t lo, int64_t hi) {
      if (!nw.empty())
        layer_norm_rows(a, xoff.data(), lo, hi, K, nw.data(), nb.empty() ? nullptr : nb.data(),
                        static_cast<float>(eps), dst);
      else
        for (int64_t i = lo; i < hi; ++i) std::memcpy(dst + i * K, a + xoff[i], K * sizeof(float));
    });
    a = dst;
    ld = K;
  }
  at::parallel_for(0, tasks, grain, [&](int64_t lo, int64_t hi) {
    float tile[kRowBlock * kPanel];
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t j = t / row_blocks, i0 = (t % row_blocks) * kRowBlock;
      const int64_t rows = std::min(kRowBlock, M - i0);
      // the weight panel the next task starts, fetched while this one computes
      const float* next = t + 1 < hi && (t + 1) % row_blocks == 0 ? w + (j + 1) * K * kPanel : nullptr;
      if (K == 0) std::fill(tile, tile + rows * kPanel, 0.f);
      gemm_panels(rows, 1, K, 1.f, a + i0 * ld, ld, w + j * K * kPanel, K * kPanel, tile, kPanel, false, next, K);
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
