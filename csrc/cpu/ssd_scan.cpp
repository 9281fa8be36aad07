// SSD scan (Mamba-2; mamba_chunk_scan_combined semantics plus an initial state) on the CPU.
//
// Per (batch b, head h), with float32 state S (p, n) and the head's group g = h / (nheads / ngroups):
//   dt_t = dt_t + dt_bias (softplus'd if asked);  S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T
//   y_t  = S_t C_t + D x_t;  out_t = y_t * silu(z_t) (with z)
//
// Why the recurrence and not the chunked matrix ("SSD") form: A is one scalar per head, so every row
// S[p, :] evolves on its own: s_t = a_t s_{t-1} + (dt_t x_t[p]) B_t, y_t[p] = <s_t, C_t>. That is three
// n-wide multiply-adds per (token, p) on a row held in registers across a chunk's steps. The SSD form
// needs per token about Q n (C B^T, half masked away) + Q p (its product with dt x) + 2 n p (chunk
// states in and out) multiply-adds: 4 n p at the usual Q = n = p, a third more than the recurrence,
// and in 64 x 64 x 64 GEMMs that carry packing and call overhead. The SSD form wins where a matmul is
// much cheaper than the same multiply-adds done elementwise (tensor cores); on AVX2 cores the
// operation count decides
// (bench/bench_ssd_scan.py: this forward runs 3.5-4.9x faster than the chunked PyTorch reference).
//
// chunk_size blocks time: a chunk's B / C rows, dt and exp(dt A) are converted once per (batch, head)
// and streamed by every row p; the backward stores the state at each chunk start (one forward sweep),
// then recomputes a chunk's row states from it and runs the adjoint recurrence backwards. Every step
// does the same float32 arithmetic whatever the chunking or the piece of the sequence it is in, so a
// continued scan and any chunk_size give bit-identical forward results (the backward's sums over
// steps, e.g. dA, follow the chunking and differ by rounding).
//
// dB / dC sum over the p rows and the heads of a group: a backward task runs some heads of one group
// and accumulates into its own float32 (l, n) partial panels (no atomics), summed at the end. dA, dD and
// d(dt_bias) sum over the batch through per-(batch, head) partials the same way.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "cpu/cpu_math.h"
#include "interval_checks.h"

namespace hierkern::cpu {
namespace {

using OptT = std::optional<at::Tensor>;

bool present(const OptT& t) { return t.has_value() && t->defined(); }

// The dtype dispatch of this file's entry points: errors name the argument.
template <typename F>
void dispatch(at::ScalarType st, const char* what, F&& f) {
  by_dtype(st, "hierkern::ssd_scan (cpu)", what, std::forward<F>(f));
}

struct Dims {
  int64_t b, l, h, p, g, n, q;  // q: chunk_size
  int64_t group_of(int64_t hh) const { return hh / (h / g); }
};

void check_like_x(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes(), "hierkern::ssd_scan: ", name, " must have x's shape ", x.sizes(),
              " (batch, seqlen, nheads, headdim), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device().is_cpu(), "hierkern::ssd_scan (cpu): ", name,
              " must be a CPU tensor of x's dtype ", x.scalar_type(), ", got ", t.scalar_type(), " on ", t.device());
}

void check_bc(const char* name, const at::Tensor& X, const Dims& s, at::ScalarType x_dtype) {
  TORCH_CHECK(X.dim() == 4 && X.size(0) == s.b && X.size(1) == s.l && X.size(2) == s.g && X.size(3) == s.n,
              "hierkern::ssd_scan: ", name, " must be (batch, seqlen, ngroups, dstate) = (", s.b, ", ", s.l,
              ", ", s.g, ", ", s.n, "), got ", X.sizes());
  TORCH_CHECK(X.device().is_cpu(), "hierkern::ssd_scan (cpu): ", name, " must be a CPU tensor");
  TORCH_CHECK(X.scalar_type() == at::kFloat || X.scalar_type() == x_dtype, "hierkern::ssd_scan: ", name,
              " must be float32 or x's dtype ", x_dtype, ", got ", X.scalar_type());
}

void check_f32(const char* name, const OptT& t, at::IntArrayRef shape) {
  if (!present(t)) return;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->sizes() == shape && t->device().is_cpu(),
              "hierkern::ssd_scan (cpu): ", name, " must be a float32 CPU tensor of shape ", shape, ", got ",
              t->scalar_type(), " ", t->sizes(), " on ", t->device());
}

Dims check_inputs(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, const OptT& D, const OptT& z, const OptT& dt_bias, const OptT& init,
                  int64_t chunk_size) {
  TORCH_CHECK(x.dim() == 4, "hierkern::ssd_scan: x must be 4-D (batch, seqlen, nheads, headdim), got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "hierkern::ssd_scan (cpu): x must be a CPU tensor");
  dispatch(x.scalar_type(), "x", [](auto) {});
  TORCH_CHECK(x.numel() > 0, "hierkern::ssd_scan: x must have every dimension >= 1, got ", x.sizes());
  TORCH_CHECK(chunk_size >= 1, "hierkern::ssd_scan: chunk_size must be >= 1, got ", chunk_size);
  TORCH_CHECK(dt.dim() == 3 && dt.size(0) == x.size(0) && dt.size(1) == x.size(1) && dt.size(2) == x.size(2),
              "hierkern::ssd_scan: dt must be (batch, seqlen, nheads) = (", x.size(0), ", ", x.size(1), ", ",
              x.size(2), "), got ", dt.sizes());
  TORCH_CHECK(dt.scalar_type() == x.scalar_type() && dt.device().is_cpu(),
              "hierkern::ssd_scan (cpu): dt must be a CPU tensor of x's dtype ", x.scalar_type(), ", got ",
              dt.scalar_type(), " on ", dt.device());
  TORCH_CHECK(A.dim() == 1 && A.size(0) == x.size(2) && A.scalar_type() == at::kFloat && A.device().is_cpu(),
              "hierkern::ssd_scan (cpu): A must be a float32 CPU tensor of shape (nheads,) = (", x.size(2),
              ",), got ", A.scalar_type(), " ", A.sizes());
  TORCH_CHECK(B.dim() == 4 && B.size(2) >= 1 && x.size(2) % B.size(2) == 0 && B.size(3) >= 1,
              "hierkern::ssd_scan: B must be (batch, seqlen, ngroups, dstate) with nheads ", x.size(2),
              " divisible by ngroups and dstate >= 1, got ", B.sizes());
  // A chunk longer than the sequence is the sequence (the buffers are sized by the chunk).
  const Dims s{x.size(0), x.size(1), x.size(2), x.size(3), B.size(2), B.size(3), std::min(chunk_size, x.size(1))};
  check_bc("B", B, s, x.scalar_type());
  check_bc("C", C, s, x.scalar_type());
  if (present(z)) check_like_x("z", *z, x);
  if (present(D)) {
    if (D->dim() == 2) check_f32("D", D, {s.h, s.p});
    else check_f32("D", D, {s.h});
  }
  check_f32("dt_bias", dt_bias, {s.h});
  check_f32("initial_states", init, {s.b, s.h, s.p, s.n});
  return s;
}

// Host copies of the small float32 parameters, so the kernels index dense arrays.
struct Params {
  std::vector<float> A, bias, D;  // D: (h, p), broadcast from (h,) and zeros when absent
  explicit Params(const at::Tensor& At, const OptT& Dt, const OptT& bt, const Dims& s)
      : A(s.h), bias(s.h, 0.f), D(s.h * s.p, 0.f) {
    for (int64_t i = 0; i < s.h; ++i) A[i] = At.const_data_ptr<float>()[i * At.stride(0)];
    if (present(bt))
      for (int64_t i = 0; i < s.h; ++i) bias[i] = bt->const_data_ptr<float>()[i * bt->stride(0)];
    if (present(Dt)) {
      const float* d = Dt->const_data_ptr<float>();
      const bool per_p = Dt->dim() == 2;
      for (int64_t i = 0; i < s.h; ++i)
        for (int64_t j = 0; j < s.p; ++j)
          D[i * s.p + j] = per_p ? d[i * Dt->stride(0) + j * Dt->stride(1)] : d[i * Dt->stride(0)];
    }
  }
};

// Rows [t0, t0 + nt) of X[b, :, i, :] (a (b, l, heads or groups, m) tensor, any strides) as a dense
// float (nt, m) tile.
void load_tile4(const at::Tensor& X, int64_t b, int64_t i, int64_t t0, int64_t nt, float* out) {
  dispatch(X.scalar_type(), "input", [&](auto tag) {
    using T = decltype(tag);
    const int64_t m = X.size(3), st = X.stride(1), sm = X.stride(3);
    const T* base = X.const_data_ptr<T>() + b * X.stride(0) + i * X.stride(2) + t0 * st;
    for (int64_t r = 0; r < nt; ++r)
      for (int64_t k = 0; k < m; ++k) out[r * m + k] = to_f(base[r * st + k * sm]);
  });
}

// The (nt, m) float tile into rows [t0, t0 + nt) of out[b, :, i, :] (contiguous (b, l, h, m)).
template <typename T>
void store_tile4(const float* tile, at::Tensor& out, int64_t b, int64_t i, int64_t t0, int64_t nt) {
  const int64_t m = out.size(3);
  T* base = out.mutable_data_ptr<T>() + b * out.stride(0) + i * out.stride(2) + t0 * out.stride(1);
  for (int64_t r = 0; r < nt; ++r)
    for (int64_t k = 0; k < m; ++k) base[r * out.stride(1) + k] = static_cast<T>(tile[r * m + k]);
}

// For steps t0 + i, i < nt, of head hh: dtv[i] (after bias and softplus), av[i] = exp(dtv[i] A), and
// dsp[i] the softplus derivative at the pre-activation (1 without softplus). Softplus as F.softplus
// (the identity above 20).
void discretize(const at::Tensor& dt, const Params& P, bool softplus, int64_t b, int64_t hh, int64_t t0,
                int64_t nt, float* dtv, float* av, float* dsp) {
  dispatch(dt.scalar_type(), "dt", [&](auto tag) {
    using T = decltype(tag);
    const T* base = dt.const_data_ptr<T>() + b * dt.stride(0) + hh * dt.stride(2);
    for (int64_t i = 0; i < nt; ++i) {
      const float raw = to_f(base[(t0 + i) * dt.stride(1)]) + P.bias[hh];
      if (softplus && raw <= 20.f) {
        dtv[i] = std::log1p(std::exp(raw));
        dsp[i] = 1.f / (1.f + std::exp(-raw));
      } else {
        dtv[i] = raw;
        dsp[i] = 1.f;
      }
      av[i] = std::exp(dtv[i] * P.A[hh]);
    }
  });
}

void read_state(const OptT& st, int64_t b, int64_t hh, const Dims& s, float* S) {
  if (!present(st)) {
    std::fill(S, S + s.p * s.n, 0.f);
    return;
  }
  const float* base = st->const_data_ptr<float>() + b * st->stride(0) + hh * st->stride(1);
  for (int64_t j = 0; j < s.p; ++j)
    for (int64_t k = 0; k < s.n; ++k) S[j * s.n + k] = base[j * st->stride(2) + k * st->stride(3)];
}

// sg[i] = sigmoid(z[i]) for i < m. The gate is elementwise over every (token, head, p): with libm's
// exp per element it cost as much as the whole scan (measured: 9 of 20 ms at b=2, l=680, h=8, p=n=64).
inline void sigmoid_tile(const float* z, float* sg, int64_t m) {
  int64_t i = 0;
#ifdef HK_AVX2
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= m; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_loadu_ps(z + i)));
    _mm256_storeu_ps(sg + i, _mm256_div_ps(one, _mm256_add_ps(one, e)));
  }
#endif
  for (; i < m; ++i) sg[i] = 1.f / (1.f + fast_exp(-z[i]));
}

// Per-thread buffers for one chunk of steps.
struct ChunkBufs {
  std::vector<float> dtv, av, dsp, Bc, Cc, Xc, Zc, SGc, Yc;  // SGc: sigmoid(z)
  explicit ChunkBufs(const Dims& s)
      : dtv(s.q), av(s.q), dsp(s.q), Bc(s.q * s.n), Cc(s.q * s.n), Xc(s.q * s.p), Zc(s.q * s.p),
        SGc(s.q * s.p), Yc(s.q * s.p) {}
  // dt, the decays, B, C and x (and z) of steps [t0, t0 + nt) of (b, hh).
  void load(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& B, const at::Tensor& C,
            const OptT& z, const Params& P, bool softplus, const Dims& s, int64_t b, int64_t hh, int64_t t0,
            int64_t nt, bool need_c = true) {
    discretize(dt, P, softplus, b, hh, t0, nt, dtv.data(), av.data(), dsp.data());
    load_tile4(B, b, s.group_of(hh), t0, nt, Bc.data());
    if (need_c) load_tile4(C, b, s.group_of(hh), t0, nt, Cc.data());
    load_tile4(x, b, hh, t0, nt, Xc.data());
    if (present(z)) {
      load_tile4(*z, b, hh, t0, nt, Zc.data());
      sigmoid_tile(Zc.data(), SGc.data(), nt * s.p);
    }
  }
};

// Row p of the state over the nt steps of a loaded chunk, without outputs: s <- a_i s + dt_i x_i[p] B_i.
inline void advance_row(float* srow, const ChunkBufs& c, int64_t j, int64_t nt, const Dims& s) {
  for (int64_t i = 0; i < nt; ++i) {
    const float a = c.av[i], coef = c.dtv[i] * c.Xc[i * s.p + j];
    const float* Bt = c.Bc.data() + i * s.n;
#pragma omp simd
    for (int64_t k = 0; k < s.n; ++k) srow[k] = a * srow[k] + coef * Bt[k];
  }
}

#ifdef HK_AVX2
// Row j of the state over a loaded chunk, for the NV * 8 states starting at k0, the row held in NV
// registers across all the steps: per step and 8 states two loads (B, C) and three vector ops, no
// state stores. ya[i * 8 + lane] receives (first) or accumulates the step's partial <s, C> lanes; the
// caller sums the lanes, off the serial chain.
template <int NV>
inline void row_fwd_avx2(float* srow, const ChunkBufs& c, int64_t j, int64_t nt, const Dims& s, int64_t k0,
                         bool first, float* ya) {
  __m256 st[NV];
  for (int v = 0; v < NV; ++v) st[v] = _mm256_loadu_ps(srow + k0 + 8 * v);
  for (int64_t i = 0; i < nt; ++i) {
    const __m256 a = _mm256_set1_ps(c.av[i]), cf = _mm256_set1_ps(c.dtv[i] * c.Xc[i * s.p + j]);
    const float* Bt = c.Bc.data() + i * s.n + k0;
    const float* Ct = c.Cc.data() + i * s.n + k0;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int v = 0; v < NV; ++v) {
      st[v] = _mm256_fmadd_ps(a, st[v], _mm256_mul_ps(cf, _mm256_loadu_ps(Bt + 8 * v)));
      if (v % 2 == 0) acc0 = _mm256_fmadd_ps(st[v], _mm256_loadu_ps(Ct + 8 * v), acc0);
      else acc1 = _mm256_fmadd_ps(st[v], _mm256_loadu_ps(Ct + 8 * v), acc1);
    }
    const __m256 y = _mm256_add_ps(acc0, acc1);
    _mm256_storeu_ps(ya + i * 8, first ? y : _mm256_add_ps(y, _mm256_loadu_ps(ya + i * 8)));
  }
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(srow + k0 + 8 * v, st[v]);
}

// <s_t, C_t> for the steps of a loaded chunk into y[i] (row j), for n % 8 == 0.
inline void row_fwd_vec(float* srow, const ChunkBufs& c, int64_t j, int64_t nt, const Dims& s, float* ya,
                        float* y) {
  for (int64_t k0 = 0; k0 < s.n; k0 += 64) {
    const bool first = k0 == 0;
    switch (std::min<int64_t>(8, (s.n - k0) / 8)) {
      case 8: row_fwd_avx2<8>(srow, c, j, nt, s, k0, first, ya); break;
      case 7: row_fwd_avx2<7>(srow, c, j, nt, s, k0, first, ya); break;
      case 6: row_fwd_avx2<6>(srow, c, j, nt, s, k0, first, ya); break;
      case 5: row_fwd_avx2<5>(srow, c, j, nt, s, k0, first, ya); break;
      case 4: row_fwd_avx2<4>(srow, c, j, nt, s, k0, first, ya); break;
      case 3: row_fwd_avx2<3>(srow, c, j, nt, s, k0, first, ya); break;
      case 2: row_fwd_avx2<2>(srow, c, j, nt, s, k0, first, ya); break;
      default: row_fwd_avx2<1>(srow, c, j, nt, s, k0, first, ya); break;
    }
  }
  for (int64_t i = 0; i < nt; ++i) y[i] = hsum8(_mm256_loadu_ps(ya + i * 8));
}
#endif

// <s_t, C_t> for the steps of a loaded chunk into y[i] (row j): any n.
inline void row_fwd(float* srow, const ChunkBufs& c, int64_t j, int64_t nt, const Dims& s, float* ya, float* y) {
#ifdef HK_AVX2
  if (s.n % 8 == 0) return row_fwd_vec(srow, c, j, nt, s, ya, y);
#endif
  for (int64_t i = 0; i < nt; ++i) {
    const float a = c.av[i], coef = c.dtv[i] * c.Xc[i * s.p + j];
    const float* Bt = c.Bc.data() + i * s.n;
    const float* Ct = c.Cc.data() + i * s.n;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < s.n; ++k) {
      const float sk = a * srow[k] + coef * Bt[k];
      srow[k] = sk;
      acc += sk * Ct[k];
    }
    y[i] = acc;
  }
}

template <typename T>
void fwd_kernel(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& B, const at::Tensor& C,
                const OptT& z, const OptT& init, const Params& P, bool softplus, const Dims& s, at::Tensor& out,
                at::Tensor& fin) {
  const bool has_z = present(z);
  float* fp = fin.mutable_data_ptr<float>();
  at::parallel_for(0, s.b * s.h, 1, [&](int64_t lo, int64_t hi) {
    ChunkBufs c(s);
    std::vector<float> S(s.p * s.n), ya(s.q * 8), y(s.q);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / s.h, hh = task % s.h;
      read_state(init, b, hh, s, S.data());
      for (int64_t t0 = 0; t0 < s.l; t0 += s.q) {
        const int64_t nt = std::min(s.q, s.l - t0);
        c.load(x, dt, B, C, z, P, softplus, s, b, hh, t0, nt);
        for (int64_t j = 0; j < s.p; ++j) {
          row_fwd(S.data() + j * s.n, c, j, nt, s, ya.data(), y.data());
          const float Dj = P.D[hh * s.p + j];
          for (int64_t i = 0; i < nt; ++i) {
            float v = y[i] + Dj * c.Xc[i * s.p + j];
            if (has_z) v *= c.Zc[i * s.p + j] * c.SGc[i * s.p + j];
            c.Yc[i * s.p + j] = v;
          }
        }
        store_tile4<T>(c.Yc.data(), out, b, hh, t0, nt);
      }
      std::memcpy(fp + task * s.p * s.n, S.data(), s.p * s.n * sizeof(float));
    }
  });
}

#ifdef HK_AVX2
// The adjoint recurrence of row j over a chunk, backwards, for the NV * 8 states at k0, the adjoint
// row held in registers across the steps. Per step: dC_t += dy S_t, dB_t += dt x h_t (h_t = the adjoint
// after adding dy C_t), and the partial lanes of <h_t, B_t> and <h_t, S_{t-1}> into dcv / dav
// (stored by the first block, accumulated by the others).
template <int NV>
inline void row_bwd_avx2(float* h, const ChunkBufs& c, const float* rows, const float* dy, int64_t j, int64_t nt,
                         const Dims& s, float* dBp, float* dCp, int64_t k0, bool first, float* dcv, float* dav) {
  __m256 hv[NV];
  for (int v = 0; v < NV; ++v) hv[v] = _mm256_loadu_ps(h + k0 + 8 * v);
  for (int64_t i = nt - 1; i >= 0; --i) {
    const __m256 a = _mm256_set1_ps(c.av[i]), dyv = _mm256_set1_ps(dy[i]);
    const __m256 cf = _mm256_set1_ps(c.dtv[i] * c.Xc[i * s.p + j]);
    const float* Bt = c.Bc.data() + i * s.n + k0;
    const float* Ct = c.Cc.data() + i * s.n + k0;
    const float* prev = rows + i * s.n + k0;
    const float* cur = prev + s.n;
    float* dBt = dBp + i * s.n + k0;
    float* dCt = dCp + i * s.n + k0;
    __m256 dc = _mm256_setzero_ps(), da = _mm256_setzero_ps();
    for (int v = 0; v < NV; ++v) {
      const __m256 hk = _mm256_fmadd_ps(dyv, _mm256_loadu_ps(Ct + 8 * v), hv[v]);
      _mm256_storeu_ps(dCt + 8 * v, _mm256_fmadd_ps(dyv, _mm256_loadu_ps(cur + 8 * v), _mm256_loadu_ps(dCt + 8 * v)));
      _mm256_storeu_ps(dBt + 8 * v, _mm256_fmadd_ps(cf, hk, _mm256_loadu_ps(dBt + 8 * v)));
      dc = _mm256_fmadd_ps(hk, _mm256_loadu_ps(Bt + 8 * v), dc);
      da = _mm256_fmadd_ps(hk, _mm256_loadu_ps(prev + 8 * v), da);
      hv[v] = _mm256_mul_ps(a, hk);
    }
    _mm256_storeu_ps(dcv + i * 8, first ? dc : _mm256_add_ps(dc, _mm256_loadu_ps(dcv + i * 8)));
    _mm256_storeu_ps(dav + i * 8, first ? da : _mm256_add_ps(da, _mm256_loadu_ps(dav + i * 8)));
  }
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(h + k0 + 8 * v, hv[v]);
}
#endif

// The adjoint recurrence of row j over a loaded chunk, backwards: h (the row of dL/dS) from the
// chunk's end to its start; accumulates dB / dC rows (dBp / dCp point at the chunk's first step);
// dcoef[i] = <h_t, B_t> and da[i] = <h_t, S_{t-1}>, with h_t the adjoint of S_t. rows[i] holds
// row j of S_{t0 + i - 1}. dcv / dav: 8 * nt floats of scratch.
inline void row_bwd(float* h, const ChunkBufs& c, const float* rows, const float* dy, int64_t j, int64_t nt,
                    const Dims& s, float* dBp, float* dCp, float* dcv, float* dav, float* dcoef, float* da) {
#ifdef HK_AVX2
  if (s.n % 8 == 0) {
    // Blocks of 32 states: the adjoint row, the two accumulators and the broadcasts fit in the 16
    // registers without spills.
    for (int64_t k0 = 0; k0 < s.n; k0 += 32) {
      const bool first = k0 == 0;
      switch (std::min<int64_t>(4, (s.n - k0) / 8)) {
        case 4: row_bwd_avx2<4>(h, c, rows, dy, j, nt, s, dBp, dCp, k0, first, dcv, dav); break;
        case 3: row_bwd_avx2<3>(h, c, rows, dy, j, nt, s, dBp, dCp, k0, first, dcv, dav); break;
        case 2: row_bwd_avx2<2>(h, c, rows, dy, j, nt, s, dBp, dCp, k0, first, dcv, dav); break;
        default: row_bwd_avx2<1>(h, c, rows, dy, j, nt, s, dBp, dCp, k0, first, dcv, dav); break;
      }
    }
    for (int64_t i = 0; i < nt; ++i) {
      dcoef[i] = hsum8(_mm256_loadu_ps(dcv + i * 8));
      da[i] = hsum8(_mm256_loadu_ps(dav + i * 8));
    }
    return;
  }
#endif
  for (int64_t i = nt - 1; i >= 0; --i) {
    const float a = c.av[i], coef = c.dtv[i] * c.Xc[i * s.p + j], d = dy[i];
    const float* Bt = c.Bc.data() + i * s.n;
    const float* Ct = c.Cc.data() + i * s.n;
    const float* prev = rows + i * s.n;
    const float* cur = prev + s.n;
    float* dBt = dBp + i * s.n;
    float* dCt = dCp + i * s.n;
    float sc = 0.f, sa = 0.f;
#pragma omp simd reduction(+ : sc, sa)
    for (int64_t k = 0; k < s.n; ++k) {
      const float hk = h[k] + d * Ct[k];  // dL/dS_t[j, k]
      dCt[k] += d * cur[k];
      dBt[k] += coef * hk;
      sc += hk * Bt[k];
      sa += hk * prev[k];
      h[k] = a * hk;  // dL/dS_{t-1}[j, k] through the decay
    }
    dcoef[i] = sc;
    da[i] = sa;
  }
}

// Backward tasks: (batch, group, split), each running h / g / splits heads of one group one after
// the other, so the heads of a task share one dB / dC panel. splits is the smallest divisor of the
// group's head count that gives every thread several tasks: the panels (float32, l * n each) then
// cost b * g * splits * l * n floats instead of one per (batch, head).
int64_t head_splits(const Dims& s) {
  const int64_t per = s.h / s.g, want = 4 * at::get_num_threads();
  for (int64_t q = 1; q <= per; ++q)
    if (per % q == 0 && s.b * s.g * q >= want) return q;
  return per;
}

struct Partials {
  int64_t splits;
  std::vector<float> dB, dC;  // (b * g * splits, l, n): per-task panels, summed over the splits at the end
  std::vector<float> dA, dbias, dD;  // (b * h), (b * h), (b * h, p)
  explicit Partials(const Dims& s)
      : splits(head_splits(s)), dB(s.b * s.g * splits * s.l * s.n, 0.f), dC(dB.size(), 0.f), dA(s.b * s.h, 0.f),
        dbias(s.b * s.h, 0.f), dD(s.b * s.h * s.p, 0.f) {}
};

template <typename T>
void bwd_kernel(const at::Tensor& grad_out, const OptT& grad_fin, const at::Tensor& x, const at::Tensor& dt,
                const at::Tensor& B, const at::Tensor& C, const OptT& z, const OptT& init, const Params& P,
                bool softplus, const Dims& s, at::Tensor& dx, at::Tensor& ddt, at::Tensor& dz, at::Tensor& dinit,
                Partials& part) {
  const bool has_z = present(z);
  const int64_t pn = s.p * s.n, n_chunks = (s.l + s.q - 1) / s.q;
  T* ddtp = ddt.mutable_data_ptr<T>();
  float* dip = dinit.mutable_data_ptr<float>();
  const int64_t per_task = s.h / s.g / part.splits;
  at::parallel_for(0, s.b * s.g * part.splits, 1, [&](int64_t lo, int64_t hi) {
    ChunkBufs c(s);
    std::vector<float> ck(n_chunks * pn), H(pn), rows((s.q + 1) * s.n), Gc(s.q * s.p), dXc(s.q * s.p),
        dZc(s.q * s.p), ddt_acc(s.q), dy(s.q), dcoef(s.q), da(s.q), dcv(s.q * 8), dav(s.q * 8);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / (s.g * part.splits);
      float* dBp = part.dB.data() + task * s.l * s.n;
      float* dCp = part.dC.data() + task * s.l * s.n;
      // The task's heads: consecutive within one group (tasks of a batch are ordered group-major).
      for (int64_t hh = (task % (s.g * part.splits)) * per_task, hh_end = hh + per_task; hh < hh_end; ++hh) {
        const int64_t bh = b * s.h + hh;
        const float Ah = P.A[hh];
        // The state at the start of every chunk.
        read_state(init, b, hh, s, ck.data());
        for (int64_t jc = 0; jc + 1 < n_chunks; ++jc) {
          c.load(x, dt, B, C, z, P, softplus, s, b, hh, jc * s.q, s.q, /*need_c=*/false);
          std::memcpy(ck.data() + (jc + 1) * pn, ck.data() + jc * pn, pn * sizeof(float));
          for (int64_t j = 0; j < s.p; ++j) advance_row(ck.data() + (jc + 1) * pn + j * s.n, c, j, s.q, s);
        }
        read_state(grad_fin, b, hh, s, H.data());
        float dA = 0.f, dbias = 0.f;
        for (int64_t jc = n_chunks - 1; jc >= 0; --jc) {
          const int64_t t0 = jc * s.q, nt = std::min(s.q, s.l - t0);
          c.load(x, dt, B, C, z, P, softplus, s, b, hh, t0, nt);
          load_tile4(grad_out, b, hh, t0, nt, Gc.data());
          std::fill(ddt_acc.begin(), ddt_acc.end(), 0.f);
          for (int64_t j = 0; j < s.p; ++j) {
            // rows[i + 1] = row j of S_{t0 + i}; rows[0] the state before the chunk.
            std::memcpy(rows.data(), ck.data() + jc * pn + j * s.n, s.n * sizeof(float));
            for (int64_t i = 0; i < nt; ++i) {
              const float a = c.av[i], coef = c.dtv[i] * c.Xc[i * s.p + j];
              const float* Bt = c.Bc.data() + i * s.n;
              const float* prev = rows.data() + i * s.n;
              float* cur = rows.data() + (i + 1) * s.n;
  #pragma omp simd
              for (int64_t k = 0; k < s.n; ++k) cur[k] = a * prev[k] + coef * Bt[k];
            }
            const float Dj = P.D[hh * s.p + j];
            float dDj = 0.f;
            // dy_t does not depend on the adjoint: all of the chunk's first (with z it needs y_t).
            for (int64_t i = 0; i < nt; ++i) {
              const float g = Gc[i * s.p + j], xv = c.Xc[i * s.p + j];
              float d = g;
              if (has_z) {
                const float* Ct = c.Cc.data() + i * s.n;
                const float* cur = rows.data() + (i + 1) * s.n;
                const float y = dot(cur, Ct, s.n) + Dj * xv;
                const float zz = c.Zc[i * s.p + j], sg = c.SGc[i * s.p + j];
                d = g * zz * sg;
                dZc[i * s.p + j] = g * y * sg * (1.f + zz * (1.f - sg));
              }
              dy[i] = d;
              dDj += d * xv;
            }
            row_bwd(H.data() + j * s.n, c, rows.data(), dy.data(), j, nt, s, dBp + t0 * s.n, dCp + t0 * s.n,
                    dcv.data(), dav.data(), dcoef.data(), da.data());
            for (int64_t i = 0; i < nt; ++i) {
              const float a = c.av[i], dtv = c.dtv[i], xv = c.Xc[i * s.p + j];
              dXc[i * s.p + j] = dy[i] * Dj + dtv * dcoef[i];
              ddt_acc[i] += xv * dcoef[i] + da[i] * a * Ah;
              dA += da[i] * a * dtv;
            }
            part.dD[bh * s.p + j] += dDj;
          }
          store_tile4<T>(dXc.data(), dx, b, hh, t0, nt);
          if (has_z) store_tile4<T>(dZc.data(), dz, b, hh, t0, nt);
          for (int64_t i = 0; i < nt; ++i) {
            const float raw = ddt_acc[i] * c.dsp[i];
            dbias += raw;
            ddtp[b * ddt.stride(0) + (t0 + i) * ddt.stride(1) + hh * ddt.stride(2)] = static_cast<T>(raw);
          }
        }
        std::memcpy(dip + bh * pn, H.data(), pn * sizeof(float));
        part.dA[bh] = dA;
        part.dbias[bh] = dbias;
      }
    }
  });
}

// dX (b, l, g, n), contiguous, in X's dtype: the sum over each group's splits of the per-task panels.
void reduce_group_panels(const std::vector<float>& panel, int64_t splits, const Dims& s, at::Tensor& dX) {
  dispatch(dX.scalar_type(), "dB/dC", [&](auto tag) {
    using T = decltype(tag);
    T* o = dX.mutable_data_ptr<T>();
    at::parallel_for(0, s.b * s.l, 16, [&](int64_t lo, int64_t hi) {
      std::vector<float> acc(s.n);
      for (int64_t bt = lo; bt < hi; ++bt) {
        const int64_t b = bt / s.l, t = bt % s.l;
        for (int64_t gi = 0; gi < s.g; ++gi) {
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t q = 0; q < splits; ++q) {
            const float* src = panel.data() + (((b * s.g + gi) * splits + q) * s.l + t) * s.n;
#pragma omp simd
            for (int64_t k = 0; k < s.n; ++k) acc[k] += src[k];
          }
          T* dst = o + (bt * s.g + gi) * s.n;
          for (int64_t k = 0; k < s.n; ++k) dst[k] = static_cast<T>(acc[k]);
        }
      }
    });
  });
}

// out[j] = sum over the batch of part[(i * m + j)] (m = out.numel()), float32 out.
void reduce_batch(const std::vector<float>& part, int64_t b, at::Tensor& out) {
  const int64_t m = out.numel();
  float* o = out.mutable_data_ptr<float>();
  for (int64_t j = 0; j < m; ++j) {
    float acc = 0.f;
    for (int64_t i = 0; i < b; ++i) acc += part[i * m + j];
    o[j] = acc;
  }
}

std::tuple<at::Tensor, at::Tensor> ssd_scan_fwd_cpu(const at::Tensor& x, const at::Tensor& dt,
                                                    const at::Tensor& A, const at::Tensor& B,
                                                    const at::Tensor& C, const OptT& D, const OptT& z,
                                                    const OptT& dt_bias, const OptT& initial_states,
                                                    bool dt_softplus, int64_t chunk_size) {
  const Dims s = check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size);
  const Params P(A, D, dt_bias, s);
  at::Tensor out = at::empty({s.b, s.l, s.h, s.p}, x.options());
  at::Tensor fin = at::empty({s.b, s.h, s.p, s.n}, x.options().dtype(at::kFloat));
  dispatch(x.scalar_type(), "x", [&](auto tag) {
    fwd_kernel<decltype(tag)>(x, dt, B, C, z, initial_states, P, dt_softplus, s, out, fin);
  });
  return {out, fin};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
ssd_scan_bwd_cpu(const at::Tensor& grad_out, const OptT& grad_final_states, const at::Tensor& x,
                 const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C, const OptT& D,
                 const OptT& z, const OptT& dt_bias, const OptT& initial_states, bool dt_softplus,
                 int64_t chunk_size) {
  const Dims s = check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size);
  check_like_x("grad_out", grad_out, x);
  check_f32("grad_final_states", grad_final_states, {s.b, s.h, s.p, s.n});
  const Params P(A, D, dt_bias, s);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty({s.b, s.l, s.h, s.p}, x.options());
  at::Tensor ddt = at::empty({s.b, s.l, s.h}, x.options());
  at::Tensor dz = present(z) ? at::empty({s.b, s.l, s.h, s.p}, x.options()) : at::empty({0}, x.options());
  at::Tensor dinit = at::empty({s.b, s.h, s.p, s.n}, f32);
  at::Tensor dA = at::empty({s.h}, f32), dbias = at::empty({s.h}, f32);
  const bool D_per_p = present(D) && D->dim() == 2;
  at::Tensor dD = D_per_p ? at::empty({s.h, s.p}, f32) : at::empty({s.h}, f32);
  at::Tensor dB = at::empty(B.sizes(), B.options()), dC = at::empty(C.sizes(), C.options());
  Partials part(s);
  dispatch(x.scalar_type(), "x", [&](auto tag) {
    bwd_kernel<decltype(tag)>(grad_out, grad_final_states, x, dt, B, C, z, initial_states, P, dt_softplus, s, dx,
                              ddt, dz, dinit, part);
  });
  reduce_group_panels(part.dB, part.splits, s, dB);
  reduce_group_panels(part.dC, part.splits, s, dC);
  reduce_batch(part.dA, s.b, dA);
  reduce_batch(part.dbias, s.b, dbias);
  if (D_per_p) {
    reduce_batch(part.dD, s.b, dD);
  } else {
    std::vector<float> per_head(s.b * s.h, 0.f);
    for (int64_t i = 0; i < s.b * s.h; ++i)
      for (int64_t j = 0; j < s.p; ++j) per_head[i] += part.dD[i * s.p + j];
    reduce_batch(per_head, s.b, dD);
  }
  return {dx, ddt, dA, dB, dC, dD, dz, dbias, dinit};
}

}  // namespace

TORCH_LIBRARY_IMPL(hierkern, CPU, m) {
  m.impl("ssd_scan_fwd", &ssd_scan_fwd_cpu);
  m.impl("ssd_scan_bwd", &ssd_scan_bwd_cpu);
}

}  // namespace hierkern::cpu
