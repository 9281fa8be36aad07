// Argument checks of the float32-only CPU ops behind the models' layers (packed_linear.cpp,
// fused_block.cpp): every message names the op and the argument.
#pragma once
#include <ATen/ATen.h>

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

}  // namespace hierkern::cpu
