// CUDA registrations of hierkern::selective_scan_fwd / _bwd (impl="cuda"). The kernels live in
// selective_scan_kernels.cuh, which NVRTC also compiles for builds without CUDA
// (hierkern/ops/scan/cuda_nvrtc.py mirrors this launcher in Python: keep the two in step).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "cuda/selective_scan_kernels.cuh"

namespace hierkern::cuda_scan {
namespace {

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check_cuda(const char* name, const at::Tensor& t, const at::Tensor& u) {
  TORCH_CHECK(t.is_cuda() && t.device() == u.device(), "hierkern::selective_scan (cuda): ", name,
              " must be on u's device ", u.device(), ", got ", t.device());
}

void check_bdl(const char* name, const at::Tensor& t, const at::Tensor& u) {
  check_cuda(name, t, u);
  TORCH_CHECK(t.sizes() == u.sizes() && t.scalar_type() == u.scalar_type(), "hierkern::selective_scan: ",
              name, " must match u's shape ", u.sizes(), " and dtype ", u.scalar_type(), ", got ", t.sizes(),
              " ", t.scalar_type());
}

void check_f32(const char* name, const std::optional<at::Tensor>& t, at::IntArrayRef shape, const at::Tensor& u) {
  if (!present(t)) return;
  check_cuda(name, *t, u);
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->sizes() == shape, "hierkern::selective_scan (cuda): ", name,
              " must be float32 of shape ", shape, ", got ", t->scalar_type(), " ", t->sizes());
}

// Fills the B or C fields of p; see ScanParams for the index convention.
void set_bc(const char* name, const at::Tensor& X, const at::Tensor& u, int64_t n, hk_i64& var, hk_i64& groups,
            hk_i64& f32, hk_i64& sb, hk_i64& sg, hk_i64& sn, hk_i64& sl) {
  check_cuda(name, X, u);
  const int64_t b = u.size(0), d = u.size(1), l = u.size(2);
  TORCH_CHECK(X.scalar_type() == at::kFloat || X.scalar_type() == u.scalar_type(), "hierkern::selective_scan: ",
              name, " must be float32 or u's dtype, got ", X.scalar_type());
  f32 = X.scalar_type() == at::kFloat;
  if (X.dim() == 2) {
    TORCH_CHECK(X.size(0) == d && X.size(1) == n, "hierkern::selective_scan: time-invariant ", name,
                " must be (dim, dstate) = (", d, ", ", n, "), got ", X.sizes());
    var = 0, groups = d, sb = 0, sg = X.stride(0), sn = X.stride(1), sl = 0;
  } else if (X.dim() == 3) {
    TORCH_CHECK(X.size(0) == b && X.size(1) == n && X.size(2) == l, "hierkern::selective_scan: ", name,
                " must be (batch, dstate, seqlen) = (", b, ", ", n, ", ", l, "), got ", X.sizes());
    var = 1, groups = 1, sb = X.stride(0), sg = 0, sn = X.stride(1), sl = X.stride(2);
  } else {
    TORCH_CHECK(X.dim() == 4 && X.size(0) == b && X.size(2) == n && X.size(3) == l && X.size(1) >= 1 &&
                    d % X.size(1) == 0,
                "hierkern::selective_scan: ", name, " must be 2-D (dim, dstate), 3-D (batch, dstate, seqlen) or "
                "grouped (batch, g, dstate, seqlen) with dim % g == 0, got ", X.sizes());
    var = 1, groups = X.size(1), sb = X.stride(0), sg = X.stride(1), sn = X.stride(2), sl = X.stride(3);
  }
}

ScanParams make_params(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                       const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                       const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& init,
                       bool softplus) {
  TORCH_CHECK(u.is_cuda() && u.dim() == 3, "hierkern::selective_scan (cuda): u must be a 3-D CUDA tensor");
  const auto st = u.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "hierkern::selective_scan (cuda): u has dtype ",
              st, "; expected float32, float16 or bfloat16");
  check_bdl("delta", delta, u);
  if (present(z)) check_bdl("z", *z, u);
  check_cuda("A", A, u);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1) && A.size(1) >= 1 && A.scalar_type() == at::kFloat,
              "hierkern::selective_scan (cuda): A must be float32 (dim, dstate), got ", A.scalar_type(), " ", A.sizes());
  TORCH_CHECK(u.size(0) >= 1 && u.size(1) >= 1 && u.size(2) >= 1, "hierkern::selective_scan: empty u ", u.sizes());
  const int64_t b = u.size(0), d = u.size(1), l = u.size(2), n = A.size(1);
  check_f32("D", D, {d}, u);
  check_f32("delta_bias", delta_bias, {d}, u);
  check_f32("initial_state", init, {b, d, n}, u);
  ScanParams p{};
  set_bc("B", B, u, n, p.B_var, p.B_groups, p.B_f32, p.sB_b, p.sB_g, p.sB_n, p.sB_l);
  set_bc("C", C, u, n, p.C_var, p.C_groups, p.C_f32, p.sC_b, p.sC_g, p.sC_n, p.sC_l);
  p.u = u.data_ptr();
  p.delta = delta.data_ptr();
  p.A = A.data_ptr();
  p.B = B.data_ptr();
  p.C = C.data_ptr();
  p.batch = b, p.dim = d, p.seqlen = l, p.dstate = n;
  p.softplus = softplus;
  p.su_b = u.stride(0), p.su_d = u.stride(1), p.su_l = u.stride(2);
  p.sdl_b = delta.stride(0), p.sdl_d = delta.stride(1), p.sdl_l = delta.stride(2);
  p.sA_d = A.stride(0), p.sA_n = A.stride(1);
  if (present(z)) p.z = z->data_ptr(), p.sz_b = z->stride(0), p.sz_d = z->stride(1), p.sz_l = z->stride(2);
  if (present(D)) p.D = D->data_ptr(), p.sD = D->stride(0);
  if (present(delta_bias)) p.delta_bias = delta_bias->data_ptr(), p.sbias = delta_bias->stride(0);
  if (present(init)) p.init = init->data_ptr(), p.si_b = init->stride(0), p.si_d = init->stride(1), p.si_n = init->stride(2);
  return p;
}

// Threads per block: enough for one chunk to cover short sequences, 32..128 in warps.
int threads_for(int64_t l) {
  const int64_t want = (l + hk_ss::kItems - 1) / hk_ss::kItems;
  return (int)std::min<int64_t>(hk_ss::kMaxThreads, std::max<int64_t>(32, (want + 31) / 32 * 32));
}

template <typename F>
void by_dtype(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(hk_selective_scan_fwd_f32, hk_selective_scan_bwd_f32); break;
    case at::kHalf: f(hk_selective_scan_fwd_f16, hk_selective_scan_bwd_f16); break;
    default: f(hk_selective_scan_fwd_bf16, hk_selective_scan_bwd_bf16); break;
  }
}

std::tuple<at::Tensor, at::Tensor> selective_scan_fwd_cuda(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& initial_state,
    bool delta_softplus) {
  ScanParams p = make_params(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus);
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor out = at::empty({p.batch, p.dim, p.seqlen}, u.options());
  at::Tensor last = at::empty({p.batch, p.dim, p.dstate}, u.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.last = last.data_ptr();
  const int threads = threads_for(p.seqlen);
  const auto stream = at::cuda::getCurrentCUDAStream();
  by_dtype(u.scalar_type(), [&](auto fwd, auto) { fwd<<<p.batch * p.dim, threads, 0, stream>>>(p); });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, last};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
selective_scan_bwd_cuda(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_last_state,
                        const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                        const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                        const std::optional<at::Tensor>& delta_bias,
                        const std::optional<at::Tensor>& initial_state, bool delta_softplus) {
  ScanParams p = make_params(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus);
  check_bdl("grad_out", grad_out, u);
  check_f32("grad_last_state", grad_last_state, {p.batch, p.dim, p.dstate}, u);
  const c10::cuda::CUDAGuard guard(u.device());
  const int64_t b = p.batch, d = p.dim, l = p.seqlen, n = p.dstate;
  const int threads = threads_for(l);
  p.nchunks = (l + threads * hk_ss::kItems - 1) / (threads * hk_ss::kItems);
  const auto f32 = u.options().dtype(at::kFloat);
  at::Tensor du = at::empty({b, d, l}, u.options()), ddelta = at::empty({b, d, l}, u.options());
  at::Tensor dz = present(z) ? at::empty({b, d, l}, u.options()) : at::empty({0}, u.options());
  at::Tensor dinit = at::empty({b, d, n}, f32), dA_part = at::empty({b, d, n}, f32);
  at::Tensor dD_part = at::empty({b, d}, f32), dbias_part = at::empty({b, d}, f32);
  at::Tensor ckpt = at::empty({b, d, p.nchunks, n}, f32);
  // Time-varying dB / dC are accumulated atomically over a group's channels: float32 zeros.
  at::Tensor dB_acc = p.B_var ? at::zeros({b, p.B_groups, n, l}, f32) : at::empty({b, d, n}, f32);
  at::Tensor dC_acc = p.C_var ? at::zeros({b, p.C_groups, n, l}, f32) : at::empty({b, d, n}, f32);
  p.gout = grad_out.data_ptr();
  p.sg_b = grad_out.stride(0), p.sg_d = grad_out.stride(1), p.sg_l = grad_out.stride(2);
  if (present(grad_last_state)) {
    p.glast = grad_last_state->data_ptr();
    p.sgl_b = grad_last_state->stride(0), p.sgl_d = grad_last_state->stride(1), p.sgl_n = grad_last_state->stride(2);
  }
  p.du = du.data_ptr(), p.ddelta = ddelta.data_ptr(), p.dz = present(z) ? dz.data_ptr() : nullptr;
  p.dA = dA_part.data_ptr(), p.dB = dB_acc.data_ptr(), p.dC = dC_acc.data_ptr();
  p.dD = dD_part.data_ptr(), p.dbias = dbias_part.data_ptr(), p.dinit = dinit.data_ptr(), p.ckpt = ckpt.data_ptr();
  const auto stream = at::cuda::getCurrentCUDAStream();
  by_dtype(u.scalar_type(), [&](auto, auto bwd) { bwd<<<b * d, threads, 0, stream>>>(p); });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor dB = (p.B_var ? dB_acc.view(B.sizes()) : dB_acc.sum(0)).to(B.scalar_type());
  at::Tensor dC = (p.C_var ? dC_acc.view(C.sizes()) : dC_acc.sum(0)).to(C.scalar_type());
  return {du, ddelta, dA_part.sum(0), dB, dC, dD_part.sum(0), dz, dbias_part.sum(0), dinit};
}

}  // namespace
}  // namespace hierkern::cuda_scan

TORCH_LIBRARY_IMPL(hierkern, CUDA, m) {
  m.impl("selective_scan_fwd", &hierkern::cuda_scan::selective_scan_fwd_cuda);
  m.impl("selective_scan_bwd", &hierkern::cuda_scan::selective_scan_bwd_cuda);
}
