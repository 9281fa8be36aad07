// Host-side argument checks and dtype dispatch shared by the CPU and CUDA interval-attention ops.
#pragma once
#include <ATen/ATen.h>

#include "interval.h"

namespace hierkern {

// q (B, L, H, D), k/v (B, L, Hkv, D) with H % Hkv == 0, one dtype, all on `device` with offsets a
// contiguous 1-D int32 tensor, and a known pattern. Offset values are checked by the CPU op only:
// reading device memory here would cost a host sync (the public wrappers validate the layout).
inline void check_interval_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& offsets, int64_t pattern,
                                  c10::DeviceType device, const char* backend) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "hierkern::interval_attn: q, k, v must be 4-D (batch, seq, heads, head_dim)");
  TORCH_CHECK(q.device().type() == device && k.device().type() == device &&
                  v.device().type() == device && offsets.device().type() == device,
              "hierkern::interval_attn (", backend, "): q, k, v and offsets must be ", backend,
              " tensors");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "hierkern::interval_attn: q, k, v must share a dtype");
  TORCH_CHECK(k.sizes() == v.sizes(), "hierkern::interval_attn: k and v must have the same shape");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "hierkern::interval_attn: q and k must agree in batch, seq and head_dim");
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0,
              "hierkern::interval_attn: q heads must be a multiple of k/v heads (GQA)");
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.dim() == 1 && offsets.numel() >= 2 &&
                  offsets.is_contiguous(),
              "hierkern::interval_attn: offsets must be a contiguous 1-D int32 tensor");
  TORCH_CHECK(pattern >= 0 && pattern < kNumPatterns, "hierkern::interval_attn: unknown pattern ",
              pattern);
}

// The optional cos-attention temperature: float32, one value per query head, on the inputs' device.
inline void check_temperature(const c10::optional<at::Tensor>& temperature, const at::Tensor& q) {
  if (!temperature.has_value()) return;
  const at::Tensor& t = *temperature;
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == q.size(2) &&
                  t.device() == q.device(),
              "hierkern::interval_attn: temperature must be a float32 (heads,) tensor on q's device, "
              "got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// Calls f(scalar_t{}) for the floating dtypes the kernels support (every op's CPU and CUDA entry points
// dispatch through here). With `arg`, the error names the argument whose dtype it is.
template <typename F>
void by_dtype(at::ScalarType dtype, const char* op, const char* arg, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default:
      if (arg != nullptr)
        TORCH_CHECK(false, op, ": ", arg, " has dtype ", dtype, "; expected float32, bfloat16 or float16");
      TORCH_CHECK(false, op, ": unsupported dtype ", dtype, "; expected float32, bfloat16 or float16");
  }
}

template <typename F>
void by_dtype(at::ScalarType dtype, const char* op, F&& f) {
  by_dtype(dtype, op, nullptr, std::forward<F>(f));
}

}  // namespace hierkern
