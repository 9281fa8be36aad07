// Every hierkern operator schema, in one place. Kernels register against these names from
// csrc/cpu/*.cpp, csrc/cuda/*.cu (C++) and hierkern/ops/*/triton.py (Triton, via torch.library).
#include <Python.h>
#include <torch/library.h>

#include "cpu/output_cache.h"

namespace {
PyObject* empty_cpu_cache(PyObject*, PyObject*) {
  return PyLong_FromLongLong(hierkern::cpu::release_cached_blocks());
}
PyMethodDef methods[] = {
    {"empty_cpu_cache", empty_cpu_cache, METH_NOARGS,
     "Free every block of the CPU output cache (csrc/cpu/output_cache.h); returns the bytes freed."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
// `import hierkern._C` loads this library, which runs the TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(hierkern, m) {
  // Interval attention: query row r sees the (at most two) key ranges that `pattern` derives from the
  // segment `offsets` (int32, cumulative, offsets[0] == 0, offsets[-1] == seq len) and `block_size`.
  // q (B, L, H, D), k/v (B, L, Hkv, D) with H % Hkv == 0; returns out (B, L, H, D) and the float32
  // log-sum-exp (B, H, L) that the backward pass needs.
  // With `temperature` (float32, (H,)) the kernels run VAR's cos-attention prologue on every q / k
  // tile they load: q_hat = q / |q| * exp(min(temperature[h], ln 100)), k_hat = k / |k| (|x| clamped
  // below at 1e-12, as F.normalize), and attend with q_hat, k_hat. The backward then returns the
  // gradients with respect to q_hat and k_hat (and v); the chain rule through the normalisation and
  // the temperature is elementwise per row and runs in the Python autograd function.
  m.def("interval_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor offsets, int pattern, int block_size, "
        "float scale, Tensor? temperature=None) -> (Tensor, Tensor)");
  m.def("interval_attn_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor offsets, int pattern, int block_size, float scale, Tensor? temperature=None) "
        "-> (Tensor, Tensor, Tensor)");
  // The Triton kernels take host-built tile schedules as extra metadata (hierkern/ops/attention/
  // tiling.py): q_tiles / dq_tiles are (n, 4) int32 rows (q_start, q_end, k_start, k_end) for the
  // forward and dQ passes, k_tiles rows (k_start, k_end, q_start, q_end) for the dK/dV pass. The
  // forward takes the backward's schedules too so autograd can hand them on without a host sync.
  m.def("interval_attn_fwd_triton(Tensor q, Tensor k, Tensor v, Tensor offsets, Tensor q_tiles, "
        "Tensor dq_tiles, Tensor k_tiles, int pattern, int block_size, float scale, "
        "Tensor? temperature=None) -> (Tensor, Tensor)");
  m.def("interval_attn_bwd_triton(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, Tensor offsets, Tensor dq_tiles, Tensor k_tiles, int pattern, int block_size, "
        "float scale, Tensor? temperature=None) -> (Tensor, Tensor, Tensor)");

  // Cached attention: q (B, Lq, H, D) over rows [0, kv_len) of k_cache / v_cache (B, max_len, Hkv, D)
  // with no mask; rows from kv_len on are never read. Returns out (B, Lq, H, D) and the float32
  // log-sum-exp (B, H, Lq). qk_norm fuses the cos-attention prologue: q and k are L2-normalised over
  // head_dim and q is multiplied by exp(min(temperature[h], ln 100)) (temperature: (H,) float32).
  // num_splits: key chunks of the split-KV path, whose partial results are merged by log-sum-exp;
  // 0 picks a count from the available parallelism, 1 disables it (tests force both paths).
  // The backward returns (dq, dk_cache, dv_cache), the cache gradients dense with zeros from kv_len on.
  // With qk_norm, dq and dk are the float32 gradients w.r.t. the normalised (and, for q,
  // temperature-scaled) q and k: the chain rule through the prologue is applied by the caller (hierkern/ops/
  // cached_attention/op.py), which needs only row-local torch ops for it.
  m.def("cached_attn_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? temperature, SymInt kv_len, "
        "bool qk_norm, float scale, int num_splits) -> (Tensor, Tensor)");
  m.def("cached_attn_bwd(Tensor grad_out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor? temperature, "
        "Tensor out, Tensor lse, SymInt kv_len, bool qk_norm, float scale) -> (Tensor, Tensor, Tensor)");
  // The same ops for the Triton kernels (registered from Python for CUDA, and for CPU tensors under
  // TRITON_INTERPRET=1, where the CPU dispatch key of the ops above is taken by the C++ kernels).
  m.def("cached_attn_fwd_triton(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? temperature, "
        "SymInt kv_len, bool qk_norm, float scale, int num_splits) -> (Tensor, Tensor)");
  m.def("cached_attn_bwd_triton(Tensor grad_out, Tensor q, Tensor k_cache, Tensor v_cache, "
        "Tensor? temperature, Tensor out, Tensor lse, SymInt kv_len, bool qk_norm, float scale) "
        "-> (Tensor, Tensor, Tensor)");

  // Selective scan (Mamba-1; mamba-ssm's selective_scan_fn plus an initial state). u / delta / z
  // (b, d, l) share a dtype; A (d, n) float32; B / C (d, n) time-invariant, (b, n, l) or grouped
  // (b, g, n, l) with d % g == 0, in float32 or u's dtype; D, delta_bias (d,) and initial_state
  // (b, d, n) float32. Returns out (b, d, l) in u's dtype and the float32 last state (b, d, n).
  // The backward recomputes the states from initial_state (nothing else is saved) and returns
  // (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state): dB / dC in B / C's shape and dtype,
  // dA, dD, ddelta_bias, dinitial_state float32 and always dense (the caller drops those of absent
  // inputs); dz is empty (0,) without z. grad_last_state is None when last_state was unused.
  m.def("selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, Tensor? initial_state, bool delta_softplus) -> (Tensor, Tensor)");
  m.def("selective_scan_bwd(Tensor grad_out, Tensor? grad_last_state, Tensor u, Tensor delta, Tensor A, "
        "Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, Tensor? initial_state, "
        "bool delta_softplus) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Causal depthwise conv1d (the short conv of a Mamba block) with conv state in and out.
  // x (B, D, L) with any strides, weight (D, W) with 2 <= W <= 4, bias (D,) and initial_state
  // (B, D, W - 1) optional, all one dtype. out[b, c, t] = act(bias[c] + sum_k weight[c, k] *
  // xpad[b, c, t + k]) with xpad = cat(initial_state or zeros, x) along time and act = silu when
  // `silu`, accumulated in float32. Returns out (x's layout when x is dense, e.g. a channel-last
  // (B, L, D).transpose(1, 2) view; else contiguous) and final_state (B, D, W - 1), contiguous: the
  // last W - 1 columns of xpad, so passing it as the next chunk's initial_state continues the sequence.
  // The backward takes the final state's gradient (None when it was not used) and returns
  // (dx, dweight, dbias, dinitial_state); dbias and dinitial_state are computed even when bias /
  // initial_state were None (they are then the gradients of a zero bias / zero state, and unused).
  m.def("causal_conv1d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? initial_state, bool silu) "
        "-> (Tensor, Tensor)");
  m.def("causal_conv1d_bwd(Tensor grad_out, Tensor? grad_final_state, Tensor x, Tensor weight, "
        "Tensor? bias, Tensor? initial_state, bool silu) -> (Tensor, Tensor, Tensor, Tensor)");
  // The same ops for the Triton kernels (registered from Python, as cached_attn_fwd_triton).
  m.def("causal_conv1d_fwd_triton(Tensor x, Tensor weight, Tensor? bias, Tensor? initial_state, "
        "bool silu) -> (Tensor, Tensor)");
  m.def("causal_conv1d_bwd_triton(Tensor grad_out, Tensor? grad_final_state, Tensor x, Tensor weight, "
        "Tensor? bias, Tensor? initial_state, bool silu) -> (Tensor, Tensor, Tensor, Tensor)");

  // SSD scan (Mamba-2; mamba-ssm's mamba_chunk_scan_combined plus an initial state). x / z
  // (b, l, h, p) and dt (b, l, h) share a dtype; A (h,) float32; B / C (b, l, g, n) with h % g == 0
  // (head i reads group i / (h / g)), float32 or x's dtype; D (h,) or (h, p), dt_bias (h,) and
  // initial_states (b, h, p, n) float32. chunk_size (>= 1) blocks time only: results do not depend
  // on it beyond rounding. Returns out (b, l, h, p) in x's dtype and the float32 final states
  // (b, h, p, n). The backward recomputes the states from initial_states and returns (dx, ddt, dA,
  // dB, dC, dD, dz, ddt_bias, dinitial_states): dB / dC in B / C's dtype, dD in D's shape ((h,)
  // without D), dA, dD, ddt_bias and dinitial_states float32 and always dense (the caller drops those
  // of absent inputs); dz is empty (0,) without z. grad_final_states is None when unused.
  m.def("ssd_scan_fwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? dt_bias, Tensor? initial_states, bool dt_softplus, int chunk_size) -> (Tensor, Tensor)");
  m.def("ssd_scan_bwd(Tensor grad_out, Tensor? grad_final_states, Tensor x, Tensor dt, Tensor A, Tensor B, "
        "Tensor C, Tensor? D, Tensor? z, Tensor? dt_bias, Tensor? initial_states, bool dt_softplus, "
        "int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same ops for the chunked Triton kernels (hierkern/ops/scan/ssd_triton.py, registered from
  // Python, as cached_attn_fwd_triton).
  m.def("ssd_scan_fwd_triton(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? dt_bias, Tensor? initial_states, bool dt_softplus, int chunk_size) -> (Tensor, Tensor)");
  m.def("ssd_scan_bwd_triton(Tensor grad_out, Tensor? grad_final_states, Tensor x, Tensor dt, Tensor A, "
        "Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? dt_bias, Tensor? initial_states, bool dt_softplus, "
        "int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Approximate KV reuse (hierkern/ops/kv_reuse/reference.py has the conventions).
  // refresh_select: new / cached (B, S, H, D), one dtype; per-token cosine similarity over (H, D)
  // (float32 accumulation, NaN counted as -inf) fused with the choice of the k least similar tokens,
  // equal similarities lowest index first. Returns (B, k) int64, ascending; 0 <= k <= S.
  m.def("refresh_select(Tensor new, Tensor cached, int k) -> Tensor");
  m.def("refresh_select_triton(Tensor new, Tensor cached, int k) -> Tensor");
  // scatter_kv: in place, k_cache[b, index[b, i]] = rope(k[b, i]) and v_cache[b, index[b, i]] = v[b, i];
  // caches (B, max_len, Hkv, D), k / v (B, n, Hkv, D), index (B, n) int64 distinct per row and in
  // [0, max_len) (the C++ kernel checks; the Triton one relies on the Python wrapper's check).
  // cos / sin: rotate-half tables (max_len, D / 2) indexed by the destination slot, or None.
  m.def("scatter_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor index, Tensor k, Tensor v, "
        "Tensor? cos, Tensor? sin) -> ()");
  m.def("scatter_kv_triton(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor index, Tensor k, Tensor v, "
        "Tensor? cos, Tensor? sin) -> ()");

  // Token sampling of the generation loops (hierkern/models/_sampling.py has the rule): per row of
  // float32 logits (R, V), keep the top_k largest (ties with the k-th included; 0 or >= V: all), then
  // top-p's smallest set reaching top_p (0 or 1: off), and draw by inverse CDF in vocabulary order
  // with the uniform u[r] in [0, 1). Returns (ids (R,) int64, their probability (R,) float32).
  // With uncond (R, V), each row is first classifier-free guided: (1 + cfg_ratio) * logits - cfg_ratio *
  // uncond, rounded as that PyTorch expression is.
  m.def("sample_top_k_top_p(Tensor logits, Tensor u, int top_k, float top_p, Tensor? uncond=None, float cfg_ratio=0.0) -> (Tensor, Tensor)");

  // Inference linear layers of the generation loops (hierkern/models/_linear.py, csrc/cpu/packed_linear.cpp):
  // pack_linear_weight(weight (N, K) float32) -> (ceil(N / 16), K, 16) panels (W^T in 16-column panels,
  // zero past N); packed_linear(x (..., K) float32 whose rows view as (rows, K) without a copy, packed,
  // N, bias (N,)?, gelu, residual (..., N)?, norm_weight (K,)?, norm_bias (K,)?, eps) -> (..., N)
  // contiguous = residual + act(n(x) W^T + bias), act the tanh-approximated GELU when gelu, n the
  // LayerNorm(K, eps) with norm_weight / norm_bias when norm_weight is given. CPU only, no autograd
  // (generation runs without grad).
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed, int out_features, Tensor? bias, bool gelu, Tensor? residual, "
        "Tensor? norm_weight, Tensor? norm_bias, float eps) -> Tensor");

  // Fused elementwise pieces of the AdaLN blocks' impl="kernels" path (hierkern/models/_fused.py,
  // csrc/cpu/fused_block.cpp), float32, CPU, forward and backward: bias_gelu_fwd(h (..., N) contiguous,
  // bias (N,)) = GELU_tanh(h + bias), with bias_gelu_bwd -> (dh, dbias); adaln_norm_fwd(x (B, L, C)
  // contiguous, scale (B, C), shift (B, C), eps) = (LayerNorm(x) * (1 + scale) + shift, mean (B, L),
  // rstd (B, L)), with adaln_norm_bwd -> (dx, dscale, dshift).
  m.def("bias_gelu_fwd(Tensor h, Tensor bias) -> Tensor");
  m.def("bias_gelu_bwd(Tensor grad, Tensor h, Tensor bias) -> (Tensor, Tensor)");
  m.def("adaln_norm_fwd(Tensor x, Tensor scale, Tensor shift, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("adaln_norm_bwd(Tensor grad, Tensor x, Tensor scale, Tensor mean, Tensor rstd) "
        "-> (Tensor, Tensor, Tensor)");
  // gated_residual_fwd(x (B, L, C), y (B, L, C) contiguous, bias (C,), gamma (B, C)) = x + (y + bias) * gamma,
  // with gated_residual_bwd(grad, y, bias, gamma) -> (dy, dbias, dgamma) (dx is grad).
  m.def("gated_residual_fwd(Tensor x, Tensor y, Tensor bias, Tensor gamma) -> Tensor");
  m.def("gated_residual_bwd(Tensor grad, Tensor y, Tensor bias, Tensor gamma) -> (Tensor, Tensor, Tensor)");

  // Cross-entropy of the next-scale models' impl="kernels" training loss (hierkern/models/_fused.py,
  // csrc/cpu/cross_entropy.cpp), float32 CPU, of z = logits + bias (bias optional, (V,)):
  // cross_entropy_fwd(logits (R, V) contiguous, target (R,) int64 in [0, V), bias) -> (loss (R,), lse (R,));
  // cross_entropy_bwd(grad_loss (R,), logits, target, lse, bias) -> (dlogits (R, V) =
  // grad_loss * (softmax(z) - onehot), dbias (V,) = dlogits summed over rows, or (0,) without a bias).
  m.def("cross_entropy_fwd(Tensor logits, Tensor target, Tensor? bias=None) -> (Tensor, Tensor)");
  m.def("cross_entropy_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor lse, Tensor? bias=None) "
        "-> (Tensor, Tensor)");
  // ... dlogits written over the logits (for a caller that owns them and backpropagates once) -> dbias
  m.def("cross_entropy_bwd_(Tensor grad_loss, Tensor(a!) logits, Tensor target, Tensor lse, Tensor? bias=None) "
        "-> Tensor");

  // The cos-attention prologue's chain rule for float32 CPU tensors (csrc/cpu/cos_qk.cpp; the same math
  // as hierkern/ops/attention/cos_attention.py's backward): cos_qk_bwd(q (B, L, H, D), k (B, Lk, Hk, D),
  // temperature (H,), d_qhat, d_khat) -> (dq, dk, dtemperature (H,)).
  m.def("cos_qk_bwd(Tensor q, Tensor k, Tensor temperature, Tensor d_qhat, Tensor d_khat) -> (Tensor, Tensor, Tensor)");

  // Axial attention on channel-last (B, H, W, heads, D) tensors: attention along H inside each column
  // (axis = 1) or along W inside each row (axis = 2), causal along the axis when `causal`. k / v
  // (B, H, W, kv_heads, D) with heads % kv_heads == 0 (GQA: q head i reads kv head i / (heads /
  // kv_heads)); q, k, v share a dtype and may have any strides (kernels index by strides: no permute
  // or contiguous copies). Returns out (contiguous, i.e. channel-last (B, H, W, heads, D), q's dtype)
  // and the float32 log-sum-exp (B, H, W, heads). The backward recomputes the probabilities from lse
  // and returns (dq, dk, dv), contiguous, in the inputs' dtype.
  m.def("axial_attn_fwd(Tensor q, Tensor k, Tensor v, int axis, bool causal, float scale) -> (Tensor, Tensor)");
  m.def("axial_attn_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int axis, "
        "bool causal, float scale) -> (Tensor, Tensor, Tensor)");
  // The same ops for the Triton kernels (registered from Python, as cached_attn_fwd_triton).
  m.def("axial_attn_fwd_triton(Tensor q, Tensor k, Tensor v, int axis, bool causal, float scale) "
        "-> (Tensor, Tensor)");
  m.def("axial_attn_bwd_triton(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "int axis, bool causal, float scale) -> (Tensor, Tensor, Tensor)");
}
