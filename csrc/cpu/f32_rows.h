// Shared pieces of the float32-only row-wise CPU ops behind the models' layers (packed_linear.cpp,
// fused_block.cpp, cross_entropy.cpp, cos_qk.cpp): argument checks whose messages name the op and the
// argument, dense copies of strided parameter vectors, the rows per parallel task, and row sums that do
// not depend on the thread count.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace hierkern::cpu {

inline void check_f32_cpu(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
}

// A (d,) float32 vector (any stride) as dense floats; `what` names d in the message.
inline std::vector<float> dense_param(const char* op, const at::Tensor& t, int64_t d, const char* name,
                                      const char* what) {
  check_f32_cpu(op, t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == d, op, ": ", name, " must be (", what, ",) = (", d, ",), got ",
              t.sizes());
  std::vector<float> out(d);
  const float* p = t.const_data_ptr<float>();
  for (int64_t j = 0; j < d; ++j) out[j] = p[j * t.stride(0)];
  return out;
}

// Rows of `cols` floats per at::parallel_for task: ~16K elements, a few microseconds of elementwise work
// (fewer and the task overhead shows; more and a 2-row call runs on one thread).
inline int64_t rows_per_task(int64_t cols) {
  return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(cols, 1));
}

// Parameter gradients (sums over rows) with the same bits for any thread count: rows are taken in fixed
// chunks of kChunkRows rows of one batch row, each chunk's partial sums added in chunk order.
constexpr int64_t kChunkRows = 64;

// Sums `chunks` partial rows of n floats (row k at part + k * n) into out, in chunk order.
inline void sum_chunks(const float* part, int64_t chunks, int64_t n, float* out) {
  std::fill(out, out + n, 0.f);
  for (int64_t k = 0; k < chunks; ++k) {
    const float* p = part + k * n;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) out[c] += p[c];
  }
}

// Calls row(b, i, p, scratch) for every row i = b * L + l of a (B, L) row grid, in parallel over the
// chunks, p the chunk's `width` partial sums (zeroed) and scratch `width` floats of the task's; returns
// each batch row's sum of its chunks' partials, (B, width).
template <typename Row>
std::vector<float> chunked_row_sums(int64_t B, int64_t L, int64_t width, const Row& row) {
  const int64_t per_b = (L + kChunkRows - 1) / kChunkRows, chunks = B * per_b;
  std::vector<float> part(chunks * width);
  at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> scratch(width);
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t b = k / per_b, l0 = (k % per_b) * kChunkRows, l1 = std::min(L, l0 + kChunkRows);
      float* p = part.data() + k * width;
      std::fill(p, p + width, 0.f);
      for (int64_t l = l0; l < l1; ++l) row(b, b * L + l, p, scratch.data());
    }
  });
  std::vector<float> sums(B * width);
  for (int64_t b = 0; b < B; ++b) sum_chunks(part.data() + b * per_b * width, per_b, width, sums.data() + b * width);
  return sums;
}

}  // namespace hierkern::cpu
