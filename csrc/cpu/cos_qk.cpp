// The chain rule of the cos-attention prologue (q_hat = q / |q| * exp(min(t_h, ln 100)), k_hat =
// k / |k|) for float32 CPU tensors: the attention backward kernels return gradients with respect to
// q_hat and k_hat, and this finishes them to q, k and the per-head temperature in one pass over the
// rows. hierkern/ops/attention/cos_attention.py's backward is the same math in PyTorch (the
// specification, and the path of every other device and dtype); there it is ~12 elementwise kernels
// and three norms per call, ~13 ms of a 530 ms VAR training step at the default config on this
// project's 2-core machine.
//
// cos_qk_bwd(q (B, L, H, D), k (B, Lk, Hk, D), temperature (H,), d_qhat (B, L, H, D),
//            d_khat (B, Lk, Hk, D)) -> (dq, dk, dtemperature (H,)), any strides in, contiguous out:
//   per row x with norm |x| (clamped below at 1e-12, as F.normalize), n = x / max(|x|, 1e-12) and
//   g its upstream gradient (times m_h = exp(min(t_h, ln 100)) for q):
//   dx = (g - n (n . g)) / |x|, or g / 1e-12 where |x| <= 1e-12;
//   dtemperature_h = m_h * sum over (b, l) of d_qhat . n where t_h <= ln 100, else 0.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "cpu/cpu_math.h"
#include "cpu/f32_rows.h"

namespace hierkern::cpu {
namespace {

constexpr const char* kOp = "hierkern::cos_qk_bwd";
constexpr float kNormEps = 1e-12f;

void check_pair(const at::Tensor& x, const char* xname, const at::Tensor& g, const char* gname) {
  check_f32_cpu(kOp, x, xname);
  check_f32_cpu(kOp, g, gname);
  TORCH_CHECK(x.dim() == 4, kOp, ": ", xname, " must be (batch, seq, heads, head_dim), got ", x.dim(), "-D");
  TORCH_CHECK(g.sizes() == x.sizes(), kOp, ": ", gname, " must have ", xname, "'s shape ", x.sizes(), ", got ",
              g.sizes());
}

// dx for one row; returns d_hat . n (for the temperature's gradient), n = x / max(|x|, eps).
// x, g at strides xs, gs; g is scaled by `mult` first (the q multiplier; 1 for k).
float row_backward(const float* x, int64_t xs, const float* g, int64_t gs, int64_t D, float mult, float* dx) {
  float ss = 0.f, xg = 0.f;
  if (xs == 1 && gs == 1) {
#pragma omp simd reduction(+ : ss, xg)
    for (int64_t j = 0; j < D; ++j) {
      ss += x[j] * x[j];
      xg += x[j] * g[j];
    }
  } else {
    for (int64_t j = 0; j < D; ++j) {
      ss += x[j * xs] * x[j * xs];
      xg += x[j * xs] * g[j * gs];
    }
  }
  const float norm = std::sqrt(ss);
  const float inv = 1.f / std::max(norm, kNormEps);
  // (g - n (n . g)) / |x| = (g - x c) / |x| with c = (x . g) / |x|^2; g / eps for a zero row
  const float c = norm <= kNormEps ? 0.f : xg * inv * inv, f = mult * inv;
  if (xs == 1 && gs == 1) {
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) dx[j] = (g[j] - x[j] * c) * f;
  } else {
    for (int64_t j = 0; j < D; ++j) dx[j] = (g[j * gs] - x[j * xs] * c) * f;
  }
  return xg * inv;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cos_qk_bwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& temperature, const at::Tensor& d_qhat,
                                                              const at::Tensor& d_khat) {
  check_pair(q, "q", d_qhat, "d_qhat");
  check_pair(k, "k", d_khat, "d_khat");
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), D = q.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, kOp, ": k must be (", B, ", seq, heads, ", D, ") like q, got ",
              k.sizes());
  const std::vector<float> t = dense_param(kOp, temperature, H, "temperature", "heads");
  std::vector<float> mult(H);
  for (int64_t h = 0; h < H; ++h) mult[h] = temperature_multiplier(t[h]);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dt = at::empty({H}, q.options());

  // q rows, each position's heads adding to the per-head sums of d_qhat . n
  const float* qp = q.const_data_ptr<float>();
  const float* gq = d_qhat.const_data_ptr<float>();
  float* dqp = dq.mutable_data_ptr<float>();
  const auto qs = q.strides(), gqs = d_qhat.strides();
  const std::vector<float> sums = chunked_row_sums(1, B * L, H, [&](int64_t, int64_t p, float* acc, float*) {
    const int64_t b = p / L, l = p % L;
    for (int64_t h = 0; h < H; ++h)
      acc[h] += row_backward(qp + b * qs[0] + l * qs[1] + h * qs[2], qs[3], gq + b * gqs[0] + l * gqs[1] + h * gqs[2],
                             gqs[3], D, mult[h], dqp + (p * H + h) * D);
  });
  float* dtp = dt.mutable_data_ptr<float>();
  // d q_hat / d t = q_hat while t < ln 100; the clamp passes the gradient at equality, as torch's
  for (int64_t h = 0; h < H; ++h)
    dtp[h] = t[h] <= std::log(100.f) ? sums[h] * mult[h] : 0.f;

  const int64_t Lk = k.size(1), Hk = k.size(2), krows = B * Lk * Hk;
  const float* kp = k.const_data_ptr<float>();
  const float* gp = d_khat.const_data_ptr<float>();
  float* dp = dk.mutable_data_ptr<float>();
  const auto ks = k.strides(), gs = d_khat.strides();
  at::parallel_for(0, krows, rows_per_task(D), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t h = r % Hk, l = (r / Hk) % Lk, b = r / (Hk * Lk);
      row_backward(kp + b * ks[0] + l * ks[1] + h * ks[2], ks[3], gp + b * gs[0] + l * gs[1] + h * gs[2], gs[3], D, 1.f,
                   dp + r * D);
    }
  });
  return {dq, dk, dt};
}

}  // namespace

TORCH_LIBRARY_IMPL(hierkern, CPU, m) { m.impl("cos_qk_bwd", &cos_qk_bwd_cpu); }

}  // namespace hierkern::cpu
