// Cross-entropy of float32 logit rows against integer targets (hierkern/models/_fused.py: the
// next-scale models' training loss on the impl="kernels" path), without the (R, V) log-probabilities
// PyTorch's F.cross_entropy materialises: log_softmax forward and backward, nll_loss's zero-filled
// (R, V) gradient and its scatter are each a full pass over the logits (a VAR step's 1360 x 4096
// logits: ~30 ms of passes on this project's 2-core machine). Here the forward reads each row once
// (in L1 while it is reduced) and the backward recomputes the softmax from the saved log-sum-exp.
//
// cross_entropy_fwd(logits (R, V) contiguous, target (R,) int64 in [0, V), bias (V,) or None)
//   -> (loss (R,), lse (R,)), with z = logits + bias (the bias of the linear layer that made the logits):
//   loss[r] = lse[r] - z[r, target[r]], lse[r] = log sum_j exp(z[r, j]).
// cross_entropy_bwd(grad_loss (R,), logits, target, lse, bias) -> (dlogits (R, V), dbias):
//   dlogits[r] = grad_loss[r] * (softmax(z[r]) - onehot(target[r])); dbias = sum_r dlogits[r] ((V,), or
//   (0,) without a bias), in fixed row chunks (f32_rows.h) so its bits do not depend on the thread count.
// Taking the bias here spares the addmm's broadcast copy of it into the (R, V) output and the separate
// column sum of its gradient: ~12 ms of a VAR training step (1360 x 4096 logits) on the 2-core machine.
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

std::vector<int64_t> checked_targets(const char* op, const at::Tensor& logits, const at::Tensor& target) {
  check_f32_cpu(op, logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), op, ": logits must be contiguous (rows, classes), got ",
              "sizes ", logits.sizes(), " and strides ", logits.strides());
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V >= 1, op, ": logits need at least one class");
  TORCH_CHECK(target.device().is_cpu() && target.scalar_type() == at::kLong, op,
              ": target must be an int64 CPU tensor, got ", target.scalar_type(), " on ", target.device());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == R, op, ": target must be (rows,) = (", R, ",), got ",
              target.sizes());
  std::vector<int64_t> t(R);
  const int64_t* p = target.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    t[r] = p[r * target.stride(0)];
    TORCH_CHECK(t[r] >= 0 && t[r] < V, op, ": target[", r, "] = ", t[r], " is not a class index in [0, ", V, ")");
  }
  return t;
}

void check_rows_vec(const char* op, const at::Tensor& t, int64_t R, const char* name) {
  check_f32_cpu(op, t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == R, op, ": ", name, " must be (rows,) = (", R, ",), got ", t.sizes());
}

std::vector<float> checked_bias(const char* op, const c10::optional<at::Tensor>& bias, int64_t V) {
  if (!bias.has_value()) return {};
  return dense_param(op, *bias, V, "bias", "classes");
}

// dst = x + b (x when b is null) for a row of V floats; dst may be x.
inline void biased_row(const float* x, const float* b, int64_t V, float* dst) {
  if (b) {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) dst[j] = x[j] + b[j];
  } else if (dst != x) {
    std::copy(x, x + V, dst);
  }
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                         const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "hierkern::cross_entropy_fwd";
  const std::vector<int64_t> t = checked_targets(op, logits, target);
  const int64_t R = logits.size(0), V = logits.size(1);
  const std::vector<float> bv = checked_bias(op, bias, V);
  const float* bp = bv.empty() ? nullptr : bv.data();
  at::Tensor loss = at::empty({R}, logits.options());
  at::Tensor lse = at::empty({R}, logits.options());
  const float* x = logits.const_data_ptr<float>();
  float* lp = loss.mutable_data_ptr<float>();
  float* sp = lse.mutable_data_ptr<float>();
  at::parallel_for(0, R, rows_per_task(V), [&](int64_t lo, int64_t hi) {
    std::vector<float> row(V);  // exp_sub_sum works in place: a copy of the row, in L1
    for (int64_t r = lo; r < hi; ++r) {
      biased_row(x + r * V, bp, V, row.data());
      const float zt = row[t[r]];
      const float m = row_max(row.data(), V);
      // a row whose max is not finite gives a non-finite loss (PyTorch: NaN), never a wrong finite one
      const float s = std::isfinite(m) ? exp_sub_sum(row.data(), V, m) : 1.f;
      sp[r] = m + std::log(s);
      lp[r] = sp[r] - zt;
    }
  });
  return {loss, lse};
}

// dlogits rows into `out` (which may be logits itself: each row is read before it is written); returns
// dbias ((0,) without a bias).
at::Tensor cross_entropy_bwd_rows(const char* op, const at::Tensor& grad_loss, const at::Tensor& logits,
                                  const at::Tensor& target, const at::Tensor& lse,
                                  const c10::optional<at::Tensor>& bias, float* out) {
  const std::vector<int64_t> t = checked_targets(op, logits, target);
  const int64_t R = logits.size(0), V = logits.size(1);
  check_rows_vec(op, grad_loss, R, "grad_loss");
  check_rows_vec(op, lse, R, "lse");
  const std::vector<float> bv = checked_bias(op, bias, V);
  const float* x = logits.const_data_ptr<float>();
  const float* gp = grad_loss.const_data_ptr<float>();
  const float* sp = lse.const_data_ptr<float>();
  const int64_t gs = grad_loss.stride(0), ss = lse.stride(0);
  auto grad_row = [&](int64_t r, const float* b) {
    float* dr = out + r * V;
    const float g = gp[r * gs];
    biased_row(x + r * V, b, V, dr);
    exp_sub(dr, V, sp[r * ss]);
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) dr[j] *= g;
    dr[t[r]] -= g;
  };
  if (bv.empty()) {
    at::parallel_for(0, R, rows_per_task(V), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) grad_row(r, nullptr);
    });
    return at::empty({0}, logits.options());
  }
  // dbias summed while each row is still in L1
  const std::vector<float> sums = chunked_row_sums(1, R, V, [&](int64_t, int64_t r, float* p, float*) {
    grad_row(r, bv.data());
    const float* dr = out + r * V;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) p[j] += dr[j];
  });
  at::Tensor dbias = at::empty({V}, logits.options());
  std::copy(sums.begin(), sums.end(), dbias.mutable_data_ptr<float>());
  return dbias;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                                         const at::Tensor& target, const at::Tensor& lse,
                                                         const c10::optional<at::Tensor>& bias) {
  at::Tensor d = at::empty_like(logits, at::MemoryFormat::Contiguous);
  at::Tensor dbias = cross_entropy_bwd_rows("hierkern::cross_entropy_bwd", grad_loss, logits, target, lse, bias,
                                            d.mutable_data_ptr<float>());
  return {d, dbias};
}

// The gradient written over the logits: no fresh (R, V) buffer, whose first-touch page faults cost
// as much as the arithmetic (a 1360 x 4096 gradient: ~12 ms out of place, in a VAR training step).
at::Tensor cross_entropy_bwd__cpu(const at::Tensor& grad_loss, at::Tensor& logits, const at::Tensor& target,
                                  const at::Tensor& lse, const c10::optional<at::Tensor>& bias) {
  return cross_entropy_bwd_rows("hierkern::cross_entropy_bwd_", grad_loss, logits, target, lse, bias,
                                logits.mutable_data_ptr<float>());
}

}  // namespace

TORCH_LIBRARY_IMPL(hierkern, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cpu);
  m.impl("cross_entropy_bwd_", &cross_entropy_bwd__cpu);
}

}  // namespace hierkern::cpu
