// Shared pieces of the float32-only row-wise CPU ops behind the models' layers (packed_linear.cpp,
// fused_block.cpp, cross_entropy.cpp, cos_qk.cpp): argument checks whose messages name the op and the
// argument, dense copies of strided parameter vectors, and the rows per parallel task.
#pragma once
#include <ATen/ATen.h>

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
inline int64_t rows_per_task(int64_t cols) { return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(cols, 1)); }

}  // namespace hierkern::cpu
