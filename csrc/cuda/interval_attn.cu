// CUDA registrations of the interval-attention ops (impl="cuda"); kernels in interval_attn_kernels.cuh,
// instantiated per dtype in interval_attn_{fp32,fp16,bf16}.cu. Offsets on the device are trusted: the
// public wrappers build them from a validated layout (checking them here would cost a host sync).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/interval_attn_kernels.cuh"
#include "interval_checks.h"

namespace hierkern::cuda {

extern template void launch_fwd<float>(const AttnArgs&, cudaStream_t);
extern template void launch_fwd<at::Half>(const AttnArgs&, cudaStream_t);
extern template void launch_fwd<at::BFloat16>(const AttnArgs&, cudaStream_t);
extern template void launch_bwd<float>(const AttnArgs&, cudaStream_t);
extern template void launch_bwd<at::Half>(const AttnArgs&, cudaStream_t);
extern template void launch_bwd<at::BFloat16>(const AttnArgs&, cudaStream_t);

namespace {

Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& offsets,
           int64_t pattern) {
  check_interval_inputs(q, k, v, offsets, pattern, c10::DeviceType::CUDA, "cuda");
  // The warp-per-row kernels visit both of a row's ranges but derive them with the segment patterns'
  // helpers only (segment_row_key_ranges: the full range code makes the widest instantiation spill),
  // and the block patterns (skip-causal, block-causal) have not been run on a GPU: refuse them.
  TORCH_CHECK_NOT_IMPLEMENTED(!is_block_pattern(pattern), "hierkern::interval_attn (cuda): pattern ",
                              pattern, " (skip-causal / block-causal) has no tested CUDA kernel yet; "
                              "use impl='cpu' or impl='reference'");
  TORCH_CHECK(q.size(3) <= 256, "hierkern::interval_attn (cuda): head_dim must be <= 256");
}

void fill_common(AttnArgs& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& offsets, int64_t pattern, int64_t block_size, double scale) {
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.off = offsets.data_ptr<int32_t>();
  a.nseg = offsets.numel() - 1;
  a.pattern = pattern;
  a.block_size = block_size;
  a.B = q.size(0);
  a.L = q.size(1);
  a.H = q.size(2);
  a.Hk = k.size(2);
  a.D = q.size(3);
  a.scale = (float)scale;
  a.qs = strides_of(q);
  a.ks = strides_of(k);
  a.vs = strides_of(v);
}

// This warp-per-row fallback has no cos-attention prologue; the Triton kernels have one.
void no_qk_norm(const c10::optional<at::Tensor>& temperature, const char* op) {
  TORCH_CHECK_NOT_IMPLEMENTED(!temperature.has_value(), "hierkern::", op,
                              ": qk_norm (temperature) has no CUDA C++ kernel; use impl='triton'");
}

std::tuple<at::Tensor, at::Tensor> interval_attn_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v,
                                                          const at::Tensor& offsets, int64_t pattern,
                                                          int64_t block_size, double scale,
                                                          const c10::optional<at::Tensor>& temperature) {
  check(q, k, v, offsets, pattern);
  no_qk_norm(temperature, "interval_attn_fwd");
  const c10::cuda::CUDAGuard guard(q.device());
  const int B = q.size(0), L = q.size(1), H = q.size(2);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({B, H, L}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  AttnArgs a{};
  fill_common(a, q, k, v, offsets, pattern, block_size, scale);
  a.o = out.data_ptr();
  a.lse_out = lse.data_ptr<float>();
  a.os = strides_of(out);
  const auto stream = at::cuda::getCurrentCUDAStream();
  by_dtype(q.scalar_type(), "hierkern::interval_attn_fwd (cuda)", [&](auto tag) { launch_fwd<decltype(tag)>(a, stream); });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> interval_attn_bwd_cuda(
    const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& offsets, int64_t pattern,
    int64_t block_size, double scale, const c10::optional<at::Tensor>& temperature) {
  check(q, k, v, offsets, pattern);
  no_qk_norm(temperature, "interval_attn_bwd");
  TORCH_CHECK(g.sizes() == out.sizes() && g.scalar_type() == q.scalar_type(),
              "hierkern::interval_attn_bwd: grad_out must match out in shape and dtype");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat,
              "hierkern::interval_attn_bwd: lse must be contiguous float32");
  const c10::cuda::CUDAGuard guard(q.device());
  const int B = q.size(0), L = q.size(1), H = q.size(2);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor delta = at::empty({B, H, L}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {dq, dk, dv};
  AttnArgs a{};
  fill_common(a, q, k, v, offsets, pattern, block_size, scale);
  a.g = g.data_ptr();
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  a.delta = delta.data_ptr<float>();
  a.gs = strides_of(g);
  a.os = strides_of(out);
  a.dqs = strides_of(dq);
  a.dks = strides_of(dk);
  a.dvs = strides_of(dv);
  const auto stream = at::cuda::getCurrentCUDAStream();
  by_dtype(q.scalar_type(), "hierkern::interval_attn_bwd (cuda)", [&](auto tag) { launch_bwd<decltype(tag)>(a, stream); });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(hierkern, CUDA, m) {
  m.impl("interval_attn_fwd", &interval_attn_fwd_cuda);
  m.impl("interval_attn_bwd", &interval_attn_bwd_cuda);
}

}  // namespace hierkern::cuda
