// Axial attention, C++ CPU kernels (hierkern::axial_attn_fwd / axial_attn_bwd).
//
// q (B, H, W, heads, D), k / v (B, H, W, kv_heads, D), any strides. A "line" is one column (axis 1:
// positions along H at fixed w) or one row (axis 2: positions along W at fixed h); each (batch, line,
// kv head) is one task of at::parallel_for. A task packs its line's keys and values into float
// buffers once (reading them at the axis stride, so a column needs no permute of the tensor), then
// runs every query head of its GQA group over them, flash-style: query tiles of kBlockQ rows, key
// tiles of kBlockK with an online softmax, causal tiles cut at the tile's last row. The backward task
// owns its line's dk / dv (no atomics, GQA heads summed in place) and recomputes P from the saved lse.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/attn_pack.h"
#include "cpu/cpu_math.h"
#include "interval_checks.h"

namespace hierkern::cpu {
namespace {

constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 256;  // a whole line for the usual axis lengths: one pass, no rescaling
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Element offset of (batch b, line o, head h) and the strides along the axis and head_dim.
struct LineView {
  int64_t s_b, s_other, s_head, s_axis, s_d;
  LineView(const at::Tensor& t, int64_t axis)
      : s_b(t.stride(0)), s_other(t.stride(3 - axis)), s_head(t.stride(3)), s_axis(t.stride(axis)),
        s_d(t.dim() == 5 ? t.stride(4) : 0) {}
  int64_t at(int64_t b, int64_t o, int64_t h) const { return b * s_b + o * s_other + h * s_head; }
};

struct Geom {
  int64_t B, S, n_other, Hq, Hk, D, group;
};

Geom check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t axis) {
  TORCH_CHECK(axis == 1 || axis == 2, "hierkern::axial_attn: axis must be 1 (along H) or 2 (along W), got ", axis);
  TORCH_CHECK(q.dim() == 5 && k.dim() == 5 && v.dim() == 5,
              "hierkern::axial_attn: q, k, v must be 5-D (batch, H, W, heads, head_dim)");
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), "hierkern::axial_attn: the CPU kernel needs CPU tensors, got ", t->device());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "hierkern::axial_attn: q, k, v must share a dtype");
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "hierkern::axial_attn: dtype must be float32, bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), "hierkern::axial_attn: k and v must have the same shape");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(2) == q.size(2) &&
                  k.size(4) == q.size(4),
              "hierkern::axial_attn: k / v must match q in batch, H, W and head_dim");
  TORCH_CHECK(k.size(3) > 0 && q.size(3) % k.size(3) == 0,
              "hierkern::axial_attn: q heads must be a multiple of k / v heads (GQA)");
  Geom g{q.size(0), q.size(axis), q.size(3 - axis), q.size(3), k.size(3), q.size(4), 0};
  g.group = g.Hq / g.Hk;
  return g;
}

template <typename T>
void fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t axis, bool causal,
                float scale, at::Tensor& out, at::Tensor& lse) {
  const Geom g = check_inputs(q, k, v, axis);
  const LineView qv(q, axis), kv(k, axis), vv(v, axis), ov(out, axis), lv(lse, axis);
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  float* lp = lse.mutable_data_ptr<float>();
  const int64_t S = g.S, D = g.D, n_tasks = g.B * g.n_other * g.Hk, n_kpanels = (S + kPanel - 1) / kPanel;

  at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kpanels(n_kpanels * D * kPanel), vbuf(S * D), qbuf(kBlockQ * D),
        sbuf(kBlockQ * kBlockK), acc(kBlockQ * D), m(kBlockQ), l(kBlockQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t hk = task % g.Hk, line = task / g.Hk, o = line % g.n_other, b = line / g.n_other;
      int64_t ldv;
      // Packed (copied even for float): a column's positions are a whole image row apart and would
      // alias in the L1 sets; the copy is read once per query tile of every head of the group.
      pack_kt_panels(kp + kv.at(b, o, hk), S, D, kv.s_axis, kv.s_d, kpanels.data(), false);
      const float* vt = load_tile(vp + vv.at(b, o, hk), S, D, vv.s_axis, vv.s_d, vbuf.data(), &ldv, true);
      for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h) {
        for (int64_t r0 = 0; r0 < S; r0 += kBlockQ) {
          const int64_t r1 = std::min(S, r0 + kBlockQ), nr = r1 - r0, kend = causal ? r1 : S;
          int64_t ldq;
          const float* qt = load_tile(qp + qv.at(b, o, h) + r0 * qv.s_axis, nr, D, qv.s_axis, qv.s_d,
                                      qbuf.data(), &ldq, true);
          std::fill(acc.begin(), acc.begin() + nr * D, 0.f);
          std::fill(m.begin(), m.end(), kNegInf);
          std::fill(l.begin(), l.end(), 0.f);
          for (int64_t c0 = 0; c0 < kend; c0 += kBlockK) {
            const int64_t nc = std::min(kBlockK, kend - c0);
            float* s = sbuf.data();
            // Key tiles start on a panel boundary (kBlockK % kPanel == 0); padded keys are zero.
            gemm_panels(nr, (nc + kPanel - 1) / kPanel, D, scale, qt, ldq, kpanels.data() + c0 * D, D * kPanel, s,
                        kBlockK, /*accumulate=*/false);
            if (causal && c0 + nc - 1 > r0)  // some key of the tile lies after some row
              for (int64_t i = 0; i < nr; ++i)
                for (int64_t j = std::max<int64_t>(0, r0 + i + 1 - c0); j < nc; ++j) s[i * kBlockK + j] = kNegInf;
            for (int64_t i = 0; i < nr; ++i) {
              float* si = s + i * kBlockK;
              const float m_new = std::max(m[i], row_max(si, nc));
              if (m_new == kNegInf) {  // every key of this tile is masked for the row (and none seen yet)
                std::fill(si, si + nc, 0.f);
                continue;
              }
              const float sum = exp_sub_sum(si, nc, m_new);
              const float alpha = fast_exp(m[i] - m_new);
              if (alpha != 1.f)
                for (int64_t j = 0; j < D; ++j) acc[i * D + j] *= alpha;
              l[i] = l[i] * alpha + sum;
              m[i] = m_new;
            }
            gemm_acc_narrow(false, nr, D, nc, 1.f, s, kBlockK, vt + c0 * ldv, ldv, acc.data(), D);
          }
          float* lrow = lp + lv.at(b, o, h) + r0 * lv.s_axis;
          for (int64_t i = 0; i < nr; ++i) {
            const float inv = 1.f / l[i];  // every row sees at least its own position
            for (int64_t j = 0; j < D; ++j) acc[i * D + j] *= inv;
            lrow[i * lv.s_axis] = m[i] + std::log(l[i]);
          }
          store_tile(acc.data(), nr, D, op + ov.at(b, o, h) + r0 * ov.s_axis, ov.s_axis, ov.s_d);
        }
      }
    }
  });
}

template <typename T>
void bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& out, const at::Tensor& lse, int64_t axis, bool causal, float scale,
                at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const Geom g = check_inputs(q, k, v, axis);
  const LineView qv(q, axis), kv(k, axis), vv(v, axis), ov(out, axis), gv(dout, axis), lv(lse, axis),
      dqv(dq, axis), dkv(dk, axis), dvv(dv, axis);
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const T* op = out.const_data_ptr<T>();
  const T* gp = dout.const_data_ptr<T>();
  const float* lp = lse.const_data_ptr<float>();
  T* dqp = dq.mutable_data_ptr<T>();
  T* dkp = dk.mutable_data_ptr<T>();
  T* dvp = dv.mutable_data_ptr<T>();
  const int64_t S = g.S, D = g.D, n_tasks = g.B * g.n_other * g.Hk, n_kpanels = (S + kPanel - 1) / kPanel;

  at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kbuf(S * D), kpanels(n_kpanels * D * kPanel), vpanels(n_kpanels * D * kPanel), dka(S * D),
        dva(S * D), qbuf(kBlockQ * D), gbuf(kBlockQ * D), obuf(kBlockQ * D), dqa(kBlockQ * D),
        pbuf(kBlockQ * kBlockK), dsbuf(kBlockQ * kBlockK), delta(kBlockQ), lrow(kBlockQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t hk = task % g.Hk, line = task / g.Hk, o = line % g.n_other, b = line / g.n_other;
      int64_t ldk;
      // K row-major for dS K, K^T and V^T panels for the two score-shaped products Q K^T and dO V^T.
      const float* kt = load_tile(kp + kv.at(b, o, hk), S, D, kv.s_axis, kv.s_d, kbuf.data(), &ldk, true);
      pack_kt_panels(kp + kv.at(b, o, hk), S, D, kv.s_axis, kv.s_d, kpanels.data(), false);
      pack_kt_panels(vp + vv.at(b, o, hk), S, D, vv.s_axis, vv.s_d, vpanels.data(), false);
      std::fill(dka.begin(), dka.end(), 0.f);
      std::fill(dva.begin(), dva.end(), 0.f);
      for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h) {
        for (int64_t r0 = 0; r0 < S; r0 += kBlockQ) {
          const int64_t r1 = std::min(S, r0 + kBlockQ), nr = r1 - r0, kend = causal ? r1 : S;
          int64_t ldq, ldg, ldo;
          const float* qt = load_tile(qp + qv.at(b, o, h) + r0 * qv.s_axis, nr, D, qv.s_axis, qv.s_d,
                                      qbuf.data(), &ldq, true);
          const float* gt = load_tile(gp + gv.at(b, o, h) + r0 * gv.s_axis, nr, D, gv.s_axis, gv.s_d,
                                      gbuf.data(), &ldg, true);
          const float* ot = load_tile(op + ov.at(b, o, h) + r0 * ov.s_axis, nr, D, ov.s_axis, ov.s_d,
                                      obuf.data(), &ldo, true);
          for (int64_t i = 0; i < nr; ++i) {
            delta[i] = dot(gt + i * ldg, ot + i * ldo, D);
            lrow[i] = lp[lv.at(b, o, h) + (r0 + i) * lv.s_axis];
          }
          std::fill(dqa.begin(), dqa.begin() + nr * D, 0.f);
          for (int64_t c0 = 0; c0 < kend; c0 += kBlockK) {
            const int64_t nc = std::min(kBlockK, kend - c0);
            float* p = pbuf.data();
            float* ds = dsbuf.data();
            gemm_panels(nr, (nc + kPanel - 1) / kPanel, D, scale, qt, ldq, kpanels.data() + c0 * D, D * kPanel, p,
                        kBlockK, /*accumulate=*/false);
            if (causal && c0 + nc - 1 > r0)
              for (int64_t i = 0; i < nr; ++i)
                for (int64_t j = std::max<int64_t>(0, r0 + i + 1 - c0); j < nc; ++j) p[i * kBlockK + j] = kNegInf;
            for (int64_t i = 0; i < nr; ++i) exp_sub(p + i * kBlockK, nc, lrow[i]);
            gemm_acc_narrow(true, nc, D, nr, 1.f, p, kBlockK, gt, ldg, dva.data() + c0 * D, D);
            gemm_panels(nr, (nc + kPanel - 1) / kPanel, D, 1.f, gt, ldg, vpanels.data() + c0 * D, D * kPanel, ds,
                        kBlockK, /*accumulate=*/false);
            for (int64_t i = 0; i < nr; ++i) {
              float* dsi = ds + i * kBlockK;
              const float* pi = p + i * kBlockK;
              const float di = delta[i];
#pragma omp simd
              for (int64_t j = 0; j < nc; ++j) dsi[j] = pi[j] * (dsi[j] - di);
            }
            gemm_acc_narrow(false, nr, D, nc, scale, ds, kBlockK, kt + c0 * ldk, ldk, dqa.data(), D);
            gemm_acc_narrow(true, nc, D, nr, scale, ds, kBlockK, qt, ldq, dka.data() + c0 * D, D);
          }
          store_tile(dqa.data(), nr, D, dqp + dqv.at(b, o, h) + r0 * dqv.s_axis, dqv.s_axis, dqv.s_d);
        }
      }
      store_tile(dka.data(), S, D, dkp + dkv.at(b, o, hk), dkv.s_axis, dkv.s_d);
      store_tile(dva.data(), S, D, dvp + dvv.at(b, o, hk), dvv.s_axis, dvv.s_d);
    }
  });
}


std::tuple<at::Tensor, at::Tensor> axial_attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v, int64_t axis, bool causal,
                                                      double scale) {
  check_inputs(q, k, v, axis);
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous = channel-last (B, H, W, heads, D)
  at::Tensor lse = at::empty(q.sizes().slice(0, 4), q.options().dtype(at::kFloat));
  by_dtype(q.scalar_type(), "hierkern::axial_attn_fwd (cpu)", [&](auto tag) {
    fwd_kernel<decltype(tag)>(q, k, v, axis, causal, (float)scale, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> axial_attn_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, int64_t axis, bool causal, double scale) {
  check_inputs(q, k, v, axis);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() &&
                  grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "hierkern::axial_attn_bwd: grad_out and out must have q's shape and dtype");
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, 4) && lse.scalar_type() == at::kFloat,
              "hierkern::axial_attn_bwd: lse must be float32 (B, H, W, heads)");
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  by_dtype(q.scalar_type(), "hierkern::axial_attn_bwd (cpu)", [&](auto tag) {
    bwd_kernel<decltype(tag)>(grad_out, q, k, v, out, lse, axis, causal, (float)scale, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(hierkern, CPU, m) {
  m.impl("axial_attn_fwd", &axial_attn_fwd_cpu);
  m.impl("axial_attn_bwd", &axial_attn_bwd_cpu);
}

}  // namespace hierkern::cpu
