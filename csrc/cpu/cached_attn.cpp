// Cached attention on the CPU: queries over the first kv_len rows of a preallocated K/V cache with no
// mask (VAR / ACDiT / SDAR inference). The query rows of one GQA group (every query of every head
// sharing a K/V head) are packed into one row set, so each K/V tile is loaded (and, with qk_norm,
// normalised) once for all of them and a decode step is one GEMM row block, not G separate rows.
//
// Forward: parallel over (batch, kv head, row tile, key split). With fewer such tasks than cores
// (short q, decode) the keys are split into chunks and a second pass merges the chunks' partial
// (out, lse), so every core works even at q_len 1.
// Backward: parallel over (batch, kv head, key chunk). All queries see all keys, so a chunk's dK/dV
// are complete in one task (no atomics); the chunks' dQ partials are summed by a second pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "cpu/attn_pack.h"
#include "cpu/cpu_math.h"
#include "interval_checks.h"

namespace hierkern::cpu {
namespace {

constexpr int64_t kRowsPerTile = 128;  // packed (query, head) rows per task
constexpr int64_t kBlockK = 512;       // keys per score tile
// Below this many keys per chunk the merge pass and the repeated Q loads cost more than the extra
// parallelism gains.
constexpr int64_t kMinSplitKeys = 128;
// Up to this many rows a task's P V reads float32 V in place: a few rows read each V row about once, so
// a packed copy only adds traffic (+13-37% at 1-4 rows over 680 keys, neutral from DRAM); taller row
// blocks stream the tile once per 16 output columns and gain from the contiguous copy.
constexpr int64_t kMaxRowsVInPlace = 8;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Dims {
  int64_t B, Lq, H, D, N, Hk, G;
  int64_t rows() const { return Lq * G; }  // packed rows of one (batch, kv head)
};

// Packed row p of kv head hk is query p / G of head hk * G + p % G: the G heads of one query sit next
// to each other in BSHD memory. `base` points at (batch b, query 0, head hk * G).
template <typename T>
void load_packed(const T* base, int64_t p0, int64_t n, int64_t G, int64_t D, int64_t s_l, int64_t s_h,
                 int64_t s_d, float* dst) {
  for (int64_t p = p0; p < p0 + n; ++p) {
    const T* src = base + (p / G) * s_l + (p % G) * s_h;
    float* row = dst + (p - p0) * D;
    if (s_d == 1) {
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) row[j] = to_f(src[j]);
    } else {
      for (int64_t j = 0; j < D; ++j) row[j] = to_f(src[j * s_d]);
    }
  }
}

template <typename T>
void store_packed(const float* tile, int64_t p0, int64_t n, int64_t G, int64_t D, T* base, int64_t s_l,
                  int64_t s_h, int64_t s_d) {
  for (int64_t p = p0; p < p0 + n; ++p)
    store_tile(tile + (p - p0) * D, 1, D, base + (p / G) * s_l + (p % G) * s_h, 0, s_d);
}

// The cos-attention prologue on packed rows: row i's multiplier is group_mult[(p0 + i) % G] (its
// head's), or 1 without group_mult.
void normalize_packed_rows(float* x, int64_t n, int64_t D, const float* group_mult, int64_t p0, int64_t G) {
  for (int64_t i = 0; i < n; ++i)
    normalize_rows(x + i * D, 1, D, D, group_mult ? group_mult[(p0 + i) % G] : 1.f);
}

// A K tile as float rows: float32 K is read in place (the score GEMM goes through BLAS, which packs
// it anyway); with qk_norm always a normalised copy in `buf` (the cache must not change).
template <typename T>
const float* load_keys(const T* base, int64_t n, int64_t D, int64_t s_l, int64_t s_d, float* buf,
                       int64_t* ld, bool qk_norm) {
  const float* t = load_tile(base, n, D, s_l, s_d, buf, ld, /*pack=*/false);
  if (!qk_norm) return t;
  if (t != buf) {
    for (int64_t i = 0; i < n; ++i) std::memcpy(buf + i * D, t + i * *ld, D * sizeof(float));
    *ld = D;
  }
  normalize_rows(buf, n, D, D, 1.f);
  return buf;
}

// Number of key chunks: enough tasks for `per_thread` per thread, chunks of at least kMinSplitKeys
// keys. `requested` > 0 (tests, tuning) overrides. Every chunk of the returned count is non-empty.
// The forward asks for one task per thread: its chunks cost a merge pass, and a call with a task per
// thread already (a 32-query diffusion block over 2 K/V heads on 2 threads) ran 15-25% slower split.
// The backward asks for two (its chunks own disjoint dK/dV rows; balance matters more).
int64_t key_chunks(int64_t requested, int64_t tasks, int64_t N, int64_t per_thread, int64_t* chunk) {
  int64_t n = requested;
  if (n <= 0) {
    const int64_t want = per_thread * at::get_num_threads();
    n = tasks >= want ? 1 : std::min((want + tasks - 1) / tasks, N / kMinSplitKeys);
  }
  n = std::max<int64_t>(1, std::min(n, N));
  *chunk = (N + n - 1) / n;
  return (N + *chunk - 1) / *chunk;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& temperature, int64_t kv_len, bool qk_norm) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "hierkern::cached_attn: q, k_cache, v_cache must be 4-D (batch, seq, heads, head_dim)");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "hierkern::cached_attn (cpu): q, k_cache and v_cache must be CPU tensors");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "hierkern::cached_attn: q, k_cache, v_cache must share a dtype");
  TORCH_CHECK(k.sizes() == v.sizes(), "hierkern::cached_attn: k_cache and v_cache must have the same shape");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3),
              "hierkern::cached_attn: q and k_cache must agree in batch and head_dim");
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0,
              "hierkern::cached_attn: q heads must be a multiple of k_cache heads (GQA)");
  TORCH_CHECK(kv_len >= 1 && kv_len <= k.size(1), "hierkern::cached_attn: kv_len must be in [1, max_len = ",
              k.size(1), "], got ", kv_len);
  if (qk_norm) {
    TORCH_CHECK(temperature.has_value() && temperature->defined(),
                "hierkern::cached_attn: qk_norm needs a temperature tensor");
    TORCH_CHECK(temperature->scalar_type() == at::kFloat && temperature->dim() == 1 &&
                    temperature->size(0) == q.size(2) && temperature->device().is_cpu(),
                "hierkern::cached_attn: temperature must be a float32 CPU tensor of shape (heads,) = (",
                q.size(2), ",)");
  }
}

Dims dims_of(const at::Tensor& q, const at::Tensor& k, int64_t kv_len) {
  Dims d{q.size(0), q.size(1), q.size(2), q.size(3), kv_len, k.size(2), 0};
  d.G = d.H / d.Hk;
  return d;
}

// exp(min(t, ln 100)) per head, or empty without qk_norm.
std::vector<float> head_multipliers(const std::optional<at::Tensor>& temperature, bool qk_norm) {
  std::vector<float> mult;
  if (!qk_norm) return mult;
  const auto t = temperature->accessor<float, 1>();
  for (int64_t h = 0; h < t.size(0); ++h) mult.push_back(temperature_multiplier(t[h]));
  return mult;
}

template <typename T>
void fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::vector<float>& mult,
                const Dims& d, float scale, bool qk_norm, int64_t requested_splits, at::Tensor& out,
                at::Tensor& lse) {
  const int64_t R = d.rows(), D = d.D;
  const int64_t n_pt = (R + kRowsPerTile - 1) / kRowsPerTile;
  int64_t chunk;
  const int64_t n_split = key_chunks(requested_splits, d.B * d.Hk * n_pt, d.N, 1, &chunk);
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  float* lp = lse.mutable_data_ptr<float>();
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides(), os = out.strides();
  // Split-KV partials: normalised out rows and their lse, per (split, batch, kv head, packed row).
  std::vector<float> part_o(n_split > 1 ? n_split * d.B * d.Hk * R * D : 0);
  std::vector<float> part_lse(n_split > 1 ? n_split * d.B * d.Hk * R : 0);

  at::parallel_for(0, d.B * d.Hk * n_pt * n_split, 1, [&](int64_t begin, int64_t end) {
    const int64_t tr = std::min(R, kRowsPerTile), tk = std::min(chunk, kBlockK);
    const int64_t lds = (tk + kPanel - 1) / kPanel * kPanel;  // score rows padded to whole key panels
    const FloatBuf qbuf = scratch_floats(tr * D), kbuf = scratch_floats(lds * D), vbuf = scratch_floats(tk * D);
    const FloatBuf s = scratch_floats(tr * lds), acc = scratch_floats(tr * D);
    const FloatBuf m = scratch_floats(tr), l = scratch_floats(tr);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t sp = task % n_split, pt = (task / n_split) % n_pt;
      const int64_t hk = (task / (n_split * n_pt)) % d.Hk, b = task / (n_split * n_pt * d.Hk);
      const int64_t p0 = pt * kRowsPerTile, np = std::min(R - p0, kRowsPerTile);
      load_packed(qp + b * qs[0] + hk * d.G * qs[2], p0, np, d.G, D, qs[1], qs[2], qs[3], qbuf.get());
      if (qk_norm) normalize_packed_rows(qbuf.get(), np, D, mult.data() + hk * d.G, p0, d.G);
      std::fill(acc.get(), acc.get() + np * D, 0.f);
      std::fill(m.get(), m.get() + np, kNegInf);
      std::fill(l.get(), l.get() + np, 0.f);
      const int64_t k0 = sp * chunk, k1 = std::min(d.N, k0 + chunk);
      for (int64_t c0 = k0; c0 < k1; c0 += kBlockK) {
        const int64_t nc = std::min(k1, c0 + kBlockK) - c0;
        int64_t ldk, ldv;
        const float* vt = load_tile(vp + b * vs[0] + c0 * vs[1] + hk * vs[2], nc, D, vs[1], vs[3],
                                    vbuf.get(), &ldv, /*pack=*/np > kMaxRowsVInPlace);
        const T* kt = kp + b * ks[0] + c0 * ks[1] + hk * ks[2];
        if (np > 1) {
          // K^T panels + the panel GEMM: BLAS repacks the tile's strided K on every call, which cost
          // 15-25% of a 4-16 query call (B 2, 16 heads, 680 keys) and ~6% of a 32-query diffusion block.
          pack_kt_panels(kt, nc, D, ks[1], ks[3], kbuf.get(), qk_norm);
          gemm_panels(np, (nc + kPanel - 1) / kPanel, D, scale, qbuf.get(), D, kbuf.get(), D * kPanel, s.get(), lds,
                      /*accumulate=*/false);
        } else {  // one row: BLAS's matrix-vector path reads K in place (the panels were ~16% slower)
          const float* kf = load_keys(kt, nc, D, ks[1], ks[3], kbuf.get(), &ldk, qk_norm);
          gemm_rm(false, true, np, nc, D, scale, qbuf.get(), D, kf, ldk, 0.f, s.get(), lds);
        }
        for (int64_t i = 0; i < np; ++i) {
          float* si = s.get() + i * lds;
          const float m_new = std::max(m[i], row_max(si, nc));
          if (m_new == kNegInf) {  // only -inf scores so far (infinite inputs): keep P = 0
            std::fill(si, si + nc, 0.f);
            continue;
          }
          const float sum = exp_sub_sum(si, nc, m_new);
          const float alpha = fast_exp(m[i] - m_new);
          float* ai = acc.get() + i * D;
          if (alpha != 1.f)
            for (int64_t j = 0; j < D; ++j) ai[j] *= alpha;
          l[i] = l[i] * alpha + sum;
          m[i] = m_new;
        }
        gemm_acc_narrow(false, np, D, nc, 1.f, s.get(), lds, vt, ldv, acc.get(), D);
      }
      for (int64_t i = 0; i < np; ++i) {
        const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
        for (int64_t j = 0; j < D; ++j) acc[i * D + j] *= inv;
        m[i] = l[i] > 0.f ? m[i] + std::log(l[i]) : kNegInf;  // now the row's lse
      }
      if (n_split == 1) {
        store_packed(acc.get(), p0, np, d.G, D, op + b * os[0] + hk * d.G * os[2], os[1], os[2], os[3]);
        for (int64_t i = 0; i < np; ++i) {
          const int64_t p = p0 + i;
          lp[(b * d.H + hk * d.G + p % d.G) * d.Lq + p / d.G] = m[i];
        }
      } else {
        const int64_t base = ((sp * d.B + b) * d.Hk + hk) * R + p0;
        std::memcpy(part_o.data() + base * D, acc.get(), np * D * sizeof(float));
        std::memcpy(part_lse.data() + base, m.get(), np * sizeof(float));
      }
    }
  });
  if (n_split == 1) return;

  // Merge: out = sum_s w_s out_s / sum_s w_s with w_s = exp(lse_s - max lse); lse = max + log(sum w).
  const int64_t stride_split = d.B * d.Hk * R;
  at::parallel_for(0, d.B * d.Hk * R, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t p = r % R, hk = (r / R) % d.Hk, b = r / (R * d.Hk);
      float mx = kNegInf;
      for (int64_t sp = 0; sp < n_split; ++sp) mx = std::max(mx, part_lse[sp * stride_split + r]);
      std::fill(row.begin(), row.end(), 0.f);
      float wsum = 0.f;
      for (int64_t sp = 0; sp < n_split; ++sp) {
        const float ls = part_lse[sp * stride_split + r];
        const float w = ls == kNegInf ? 0.f : std::exp(ls - mx);
        wsum += w;
        const float* o = part_o.data() + (sp * stride_split + r) * D;
        for (int64_t j = 0; j < D; ++j) row[j] += w * o[j];
      }
      const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
      for (int64_t j = 0; j < D; ++j) row[j] *= inv;
      const int64_t h = hk * d.G + p % d.G, i = p / d.G;
      store_tile(row.data(), 1, D, op + b * os[0] + i * os[1] + h * os[2], 0, os[3]);
      lp[(b * d.H + h) * d.Lq + i] = wsum > 0.f ? mx + std::log(wsum) : kNegInf;
    }
  });
}

// TG: the dtype of dq and dk, float32 with qk_norm (see cached_attn_bwd_cpu), else T.
template <typename T, typename TG>
void bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& out, const at::Tensor& lse, const std::vector<float>& mult, const Dims& d,
                float scale, bool qk_norm, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t R = d.rows(), D = d.D;
  int64_t chunk;
  const int64_t n_chunks = key_chunks(0, d.B * d.Hk, d.N, 2, &chunk);
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const T* op = out.const_data_ptr<T>();
  const T* gp = dout.const_data_ptr<T>();
  const float* lp = lse.const_data_ptr<float>();
  TG* dqp = dq.mutable_data_ptr<TG>();
  TG* dkp = dk.mutable_data_ptr<TG>();
  T* dvp = dv.mutable_data_ptr<T>();
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides(), os = out.strides(), gs = dout.strides(),
             ls = lse.strides(), dqs = dq.strides(), dks = dk.strides(), dvs = dv.strides();
  std::vector<float> dq_part(n_chunks > 1 ? n_chunks * d.B * d.Hk * R * D : 0);

  at::parallel_for(0, d.B * d.Hk * n_chunks, 1, [&](int64_t begin, int64_t end) {
    const int64_t tr = std::min(R, kRowsPerTile), tk = std::min(chunk, kBlockK);  // tiles sized for the call
    std::vector<float> qbuf(tr * D), gbuf(tr * D), obuf(tr * D);
    std::vector<float> kbuf(tk * D), vbuf(tk * D), dqa(tr * D);
    std::vector<float> p(tr * tk), dp(tr * tk);
    std::vector<float> dka(chunk * D), dva(chunk * D), lrow(tr), delta(tr);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % n_chunks, hk = (task / n_chunks) % d.Hk, b = task / (n_chunks * d.Hk);
      const int64_t k0 = c * chunk, k1 = std::min(d.N, k0 + chunk);
      std::fill(dka.begin(), dka.end(), 0.f);
      std::fill(dva.begin(), dva.end(), 0.f);
      for (int64_t p0 = 0; p0 < R; p0 += kRowsPerTile) {
        const int64_t np = std::min(R - p0, kRowsPerTile);
        const int64_t h0 = hk * d.G;
        load_packed(qp + b * qs[0] + h0 * qs[2], p0, np, d.G, D, qs[1], qs[2], qs[3], qbuf.data());
        if (qk_norm) normalize_packed_rows(qbuf.data(), np, D, mult.data() + h0, p0, d.G);
        load_packed(gp + b * gs[0] + h0 * gs[2], p0, np, d.G, D, gs[1], gs[2], gs[3], gbuf.data());
        load_packed(op + b * os[0] + h0 * os[2], p0, np, d.G, D, os[1], os[2], os[3], obuf.data());
        for (int64_t i = 0; i < np; ++i) {
          delta[i] = dot(gbuf.data() + i * D, obuf.data() + i * D, D);
          const int64_t pr = p0 + i;
          lrow[i] = lp[b * ls[0] + (h0 + pr % d.G) * ls[1] + (pr / d.G) * ls[2]];
        }
        std::fill(dqa.begin(), dqa.begin() + np * D, 0.f);
        for (int64_t c0 = k0; c0 < k1; c0 += kBlockK) {
          const int64_t nc = std::min(k1, c0 + kBlockK) - c0;
          int64_t ldk, ldv;
          const float* kt = load_keys(kp + b * ks[0] + c0 * ks[1] + hk * ks[2], nc, D, ks[1], ks[3],
                                      kbuf.data(), &ldk, qk_norm);
          const float* vt = load_tile(vp + b * vs[0] + c0 * vs[1] + hk * vs[2], nc, D, vs[1], vs[3],
                                      vbuf.data(), &ldv);
          gemm_rm(false, true, np, nc, D, scale, qbuf.data(), D, kt, ldk, 0.f, p.data(), nc);
          for (int64_t i = 0; i < np; ++i) exp_sub(p.data() + i * nc, nc, lrow[i]);
          // dV += P^T dO ; dP = dO V^T ; dS = P (dP - delta) ; dQ += dS K ; dK += dS^T Q
          gemm_acc_narrow(true, nc, D, np, 1.f, p.data(), nc, gbuf.data(), D, dva.data() + (c0 - k0) * D, D);
          gemm_rm(false, true, np, nc, D, 1.f, gbuf.data(), D, vt, ldv, 0.f, dp.data(), nc);
          for (int64_t i = 0; i < np; ++i) {
            float* pi = p.data() + i * nc;
            const float* dpi = dp.data() + i * nc;
            const float di = delta[i];
#pragma omp simd
            for (int64_t j = 0; j < nc; ++j) pi[j] = pi[j] * (dpi[j] - di);
          }
          gemm_acc_narrow(false, np, D, nc, scale, p.data(), nc, kt, ldk, dqa.data(), D);
          gemm_acc_narrow(true, nc, D, np, scale, p.data(), nc, qbuf.data(), D, dka.data() + (c0 - k0) * D, D);
        }
        if (n_chunks == 1)
          store_packed(dqa.data(), p0, np, d.G, D, dqp + b * dqs[0] + h0 * dqs[2], dqs[1], dqs[2], dqs[3]);
        else
          std::memcpy(dq_part.data() + (((c * d.B + b) * d.Hk + hk) * R + p0) * D, dqa.data(),
                      np * D * sizeof(float));
      }
      store_tile(dka.data(), k1 - k0, D, dkp + b * dks[0] + k0 * dks[1] + hk * dks[2], dks[1], dks[3]);
      store_tile(dva.data(), k1 - k0, D, dvp + b * dvs[0] + k0 * dvs[1] + hk * dvs[2], dvs[1], dvs[3]);
    }
  });
  if (n_chunks == 1) return;

  const int64_t stride_chunk = d.B * d.Hk * R;
  at::parallel_for(0, d.B * d.Hk * R, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t pr = r % R, hk = (r / R) % d.Hk, b = r / (R * d.Hk);
      std::fill(row.begin(), row.end(), 0.f);
      for (int64_t c = 0; c < n_chunks; ++c) {
        const float* src = dq_part.data() + (c * stride_chunk + r) * D;
        for (int64_t j = 0; j < D; ++j) row[j] += src[j];
      }
      const int64_t h = hk * d.G + pr % d.G, i = pr / d.G;
      store_tile(row.data(), 1, D, dqp + b * dqs[0] + i * dqs[1] + h * dqs[2], 0, dqs[3]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cached_attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                       const at::Tensor& v_cache,
                                                       const std::optional<at::Tensor>& temperature,
                                                       int64_t kv_len, bool qk_norm, double scale,
                                                       int64_t num_splits) {
  check_inputs(q, k_cache, v_cache, temperature, kv_len, qk_norm);
  TORCH_CHECK(num_splits >= 0, "hierkern::cached_attn_fwd: num_splits must be >= 0 (0: automatic)");
  const Dims d = dims_of(q, k_cache, kv_len);
  at::Tensor out = at::empty({d.B, d.Lq, d.H, d.D}, q.options());
  at::Tensor lse = at::empty({d.B, d.H, d.Lq}, q.options().dtype(at::kFloat));
  const auto mult = head_multipliers(temperature, qk_norm);
  by_dtype(q.scalar_type(), "hierkern::cached_attn_fwd (cpu)", [&](auto tag) {
    fwd_kernel<decltype(tag)>(q, k_cache, v_cache, mult, d, (float)scale, qk_norm, num_splits, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cached_attn_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& temperature, const at::Tensor& out, const at::Tensor& lse,
    int64_t kv_len, bool qk_norm, double scale) {
  check_inputs(q, k_cache, v_cache, temperature, kv_len, qk_norm);
  TORCH_CHECK(dout.sizes() == out.sizes() && out.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "hierkern::cached_attn_bwd: grad_out and out must match q in shape and dtype");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == q.size(0) &&
                  lse.size(1) == q.size(2) && lse.size(2) == q.size(1),
              "hierkern::cached_attn_bwd: lse must be float32 (batch, heads, q_len)");
  const Dims d = dims_of(q, k_cache, kv_len);
  // With qk_norm, dq and dk are intermediate gradients (w.r.t. the normalised q and k) that the caller
  // chains through the prologue and reduces into the temperature gradient: kept in float32, so that
  // chain does not start from values rounded to a 16-bit dtype.
  const auto gopts = qk_norm ? q.options().dtype(at::kFloat) : q.options();
  at::Tensor dq = at::empty_like(q, gopts);
  at::Tensor dk = at::empty_like(k_cache, gopts);
  at::Tensor dv = at::empty_like(v_cache);
  // Cache rows from kv_len on take no part: their gradient is zero.
  dk.narrow(1, kv_len, dk.size(1) - kv_len).zero_();
  dv.narrow(1, kv_len, dv.size(1) - kv_len).zero_();
  const auto mult = head_multipliers(temperature, qk_norm);
  by_dtype(q.scalar_type(), "hierkern::cached_attn_bwd (cpu)", [&](auto tag) {
    using T = decltype(tag);
    if (qk_norm)
      bwd_kernel<T, float>(dout, q, k_cache, v_cache, out, lse, mult, d, (float)scale, qk_norm, dq, dk, dv);
    else
      bwd_kernel<T, T>(dout, q, k_cache, v_cache, out, lse, mult, d, (float)scale, qk_norm, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(hierkern, CPU, m) {
  m.impl("cached_attn_fwd", &cached_attn_fwd_cpu);
  m.impl("cached_attn_bwd", &cached_attn_bwd_cpu);
}

}  // namespace hierkern::cpu
