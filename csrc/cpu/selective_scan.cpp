// Selective scan (Mamba-1; mamba-ssm's selective_scan_fn semantics plus an initial state) on the CPU.
//
// Per (batch b, channel d), with float32 state x (n,):
//   dt_t = delta_t + bias (softplus'd if asked);  x_t = exp(dt_t * A) * x_{t-1} + dt_t * B_t * u_t
//   y_t  = <C_t, x_t> + D * u_t;  out_t = y_t * silu(z_t) (with z)
// Channels are independent, so the forward is parallel over (batch, channel). With AVX2 it runs tiles
// of 16 (AVX-512) or 8 channels, one per lane (fwd_lanes): every state update of a step is an independent
// lane-wide chain and y needs no horizontal sum. Other channels (a tail of d % 8, or groups of B / C that a
// tile would straddle) are vectorised over the n states instead (fwd_channel), with the exp(dt * A)
// of a block of steps computed first in one vector pass, off the serial dependency chain.
//
// B and C are read once, through their strides, into float32 panels with the n states of a step
// contiguous ((l, n) per batch and group): every one of the d / g channels of a group streams the
// same panel, and the raw (b, n, l) layout would put the n states of a step l elements apart.
//
// The backward recomputes the states from the initial state (nothing but the inputs is saved) and
// runs the adjoint recurrence h_{t-1} = exp(dt_t * A) * (h_t + dy_t * C_t) backwards. The states of
// at most kMaxStoredStates floats are kept per task: longer sequences store one checkpoint per chunk
// of steps in a first forward sweep, then recompute each chunk's states from its checkpoint.
// dB / dC of a variable B / C are sums over the channels of a group: tasks own disjoint channel
// ranges inside one group and accumulate into their own float32 partial (l, n) panel, reduced at
// the end (no atomics). dA, dD, d(delta_bias) and fixed dB / dC are sums over the batch: per-(b, d)
// partials, reduced at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <numeric>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/cpu_math.h"
#include "cpu/output_cache.h"
#include "interval_checks.h"

namespace hierkern::cpu {
namespace {

constexpr int64_t kTimeBlock = 64;             // steps discretised per vector pass in the forward
constexpr int64_t kMaxStoredStates = 1 << 16;  // floats of recomputed states per backward task (256 KiB)

// Element-wise maps over per-step arrays. Callers pad the arrays to a multiple of 8 so that, with AVX2,
// every element goes through the same vector code: a step's value must not depend on where a block
// or a piece of the sequence starts (a continued scan is bit-identical to a whole one). libm's exp
// and log1p do not vectorise and cost more than the rest of a step together.
inline int64_t pad8(int64_t m) { return (m + 7) / 8 * 8; }

#ifdef HK_AVX2
// log1p(e) for e in [0, 1]: 2 atanh(s) with s = e / (2 + e) <= 1/3, odd series to s^15 (rel. error < 2e-9).
template <class O>
inline typename O::V log1p_unit(typename O::V e) {
  const typename O::V s = O::div(e, O::add(O::set1(2.f), e)), s2 = O::mul(s, s);
  typename O::V p = O::set1(1.f / 15.f);
  for (float c : {1.f / 13.f, 1.f / 11.f, 1.f / 9.f, 1.f / 7.f, 1.f / 5.f, 1.f / 3.f, 1.f}) p = O::fmadd(p, s2, O::set1(c));
  return O::mul(O::add(s, s), p);
}

inline __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

// x[i] <- f(x[i]) for i < m (a multiple of 8; x 64-byte aligned, a Scratch array), O::kLanes at a
// time with four exps interleaved (exp_n: one alone is a long serial chain), as wide as the build
// allows: AVX-512 for the first m / 16 * 16 elements, AVX2 for the rest. F<O>::pre(v) gives the exp's
// argument, F<O>::post(v, e) the result from v and the exp; the same operations at either width give
// the same bits.
template <class O, class Op>
inline int64_t map_exp_span(float* x, int64_t m) {
  using V = typename O::V;
  constexpr int64_t W = O::kLanes;
  int64_t i = 0;
  for (; i + 4 * W <= m; i += 4 * W) {
    V v[4], e[4];
    for (int j = 0; j < 4; ++j) e[j] = Op::pre(v[j] = O::load(x + i + W * j));
    exp_n<O, 4>(e);
    for (int j = 0; j < 4; ++j) O::store_aligned(x + i + W * j, Op::post(v[j], e[j]));
  }
  for (; i + W <= m; i += W) {
    V v = O::load(x + i), e = Op::pre(v);
    exp_n<O, 1>(&e);
    O::store_aligned(x + i, Op::post(v, e));
  }
  return i;
}

template <template <class> class F>
inline void map_exp(float* x, int64_t m) {
  int64_t i = 0;
#ifdef HK_AVX512
  i = map_exp_span<Vec16, F<Vec16>>(x, m);
#endif
  map_exp_span<Vec8, F<Vec8>>(x + i, m - i);
}

// softplus(v) = max(v, 0) + log1p(exp(-|v|)) (the exp argument <= 0); v itself above 20.
template <class O>
struct SoftplusOp {
  using V = typename O::V;
  static V pre(V v) { return O::neg_abs(v); }
  static V post(V v, V e) { return O::select(O::greater(v, 20.f), v, O::add(O::max(v, O::set1(0.f)), log1p_unit<O>(e))); }
};

// silu(v) = v / (1 + exp(-v))
template <class O>
struct SiluOp {
  using V = typename O::V;
  static V pre(V v) { return O::sub(O::set1(0.f), v); }
  static V post(V v, V e) { return O::mul(v, O::div(O::set1(1.f), O::add(O::set1(1.f), e))); }
};
#endif

// x <- softplus(x) as F.softplus (threshold 20: the identity above it); m a multiple of 8.
inline void softplus_inplace(float* x, int64_t m) {
#ifdef HK_AVX2
  map_exp<SoftplusOp>(x, m);
#else
  for (int64_t i = 0; i < m; ++i) x[i] = x[i] > 20.f ? x[i] : std::log1p(std::exp(x[i]));
#endif
}

// x <- sigmoid(x) (with thresholded, the softplus derivative: 1 above 20); m a multiple of 8.
inline void sigmoid_inplace(float* x, int64_t m, bool thresholded = false) {
#ifdef HK_AVX2
  const __m256 thr = _mm256_set1_ps(thresholded ? 20.f : std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < m; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    _mm256_storeu_ps(x + i, _mm256_blendv_ps(sigmoid8(v), _mm256_set1_ps(1.f), _mm256_cmp_ps(v, thr, _CMP_GT_OQ)));
  }
#else
  for (int64_t i = 0; i < m; ++i) x[i] = thresholded && x[i] > 20.f ? 1.f : 1.f / (1.f + std::exp(-x[i]));
#endif
}

// exp(dt * A) as 2^(dt * A2) with A2 = A log2(e) rounded to float32, the one form every path of this
// file uses (so a tile, a single channel and the backward agree bit for bit). n = round(dt * A2) and
// f = dt * A2 - n come from FMAs on the exact product, so the reduction needs no Cody-Waite split, and
// 2^f on |f| <= 1/2 is a degree-5 minimax polynomial: 10 vector ops against exp8's 14 (the 16 exps
// of a step are most of the forward's work). Max relative error 1.8e-7; A2's rounding adds
// |dt * A| 2^-24, as large as the rounding of the product dt * A itself. The scale 2^n is added to
// the polynomial's exponent bits; p(f) may lie just under 1, so that needs n >= -125: below 2^-125
// the result is exactly 0, and above 2^127 it saturates there.
// (An 8-entry table of 2^(j/8) in one register and a cubic on |f| <= 1/16 has the same op count on
// the FMA ports and measured no faster on Zen 3.)
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kExp2Lo = -125.f, kExp2Hi = 127.f;
constexpr float kMagic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer, kept in the low bits
constexpr int kExp2Deg = 5;
constexpr float kExp2C[kExp2Deg + 1] = {1.f, 0.6931470632553101f, 0.24022242426872253f, 0.05550582334399223f,
                                        0.00967151764780283f, 0.0013308821944519877f};

inline float exp2_scalar(float s, float a2) {
  const float x = s * a2;
  float t, f;
  bool under = false;
  if (x >= kExp2Lo && x <= kExp2Hi) {
    t = std::fma(s, a2, kMagic);
    f = std::fma(s, a2, -(t - kMagic));
  } else {
    under = !(x >= kExp2Lo);
    const float xc = std::min(std::max(x, kExp2Lo), kExp2Hi);
    t = xc + kMagic;
    f = xc - (t - kMagic);
  }
  float p = kExp2C[kExp2Deg];
  for (int d = kExp2Deg - 1; d >= 0; --d) p = std::fma(p, f, kExp2C[d]);
  uint32_t tb, pb;
  std::memcpy(&tb, &t, sizeof(tb));
  std::memcpy(&pb, &p, sizeof(pb));
  pb += tb << 23;  // n << 23: the low bits of t hold n (two's complement), the rest shifts out
  std::memcpy(&p, &pb, sizeof(p));
  return under ? 0.f : p;
}

#ifdef HK_AVX2
// O::kLanes lanes of exp2_scalar for each of N vectors a2[i] at one dt, in place, interleaved stage by
// stage (as exp8_n); the same operations at either width, so the same bits. InRange: the caller has
// checked that every dt * a2 lies in [kExp2Lo, kExp2Hi].
template <class O, int N, bool InRange>
inline void exp2_n(typename O::V dtv, typename O::V* a2) {
  using V = typename O::V;
  const V magic = O::set1(kMagic);
  V t[N], f[N], p[N];
  [[maybe_unused]] typename O::M under[N];
  _Pragma("GCC unroll 8") for (int i = 0; i < N; ++i) {
    t[i] = O::fmadd(dtv, a2[i], magic);
    f[i] = O::fmsub(dtv, a2[i], O::sub(t[i], magic));
  }
  if constexpr (!InRange) {
    _Pragma("GCC unroll 8") for (int i = 0; i < N; ++i) {
      const V x = O::mul(dtv, a2[i]);
      const auto ok = O::within(x, kExp2Lo, kExp2Hi);
      const V xc = O::clamp(x, kExp2Lo, kExp2Hi);
      const V tc = O::add(xc, magic);
      t[i] = O::select(ok, t[i], tc);
      f[i] = O::select(ok, f[i], O::sub(xc, O::sub(tc, magic)));
      under[i] = O::not_ge(x, kExp2Lo);  // underflow (or NaN product)
    }
  }
  _Pragma("GCC unroll 8") for (int i = 0; i < N; ++i) p[i] = O::set1(kExp2C[kExp2Deg]);
  _Pragma("GCC unroll 8") for (int d = kExp2Deg - 1; d >= 0; --d)
    _Pragma("GCC unroll 8") for (int i = 0; i < N; ++i) p[i] = O::fmadd(p[i], f[i], O::set1(kExp2C[d]));
  _Pragma("GCC unroll 8") for (int i = 0; i < N; ++i) {
    a2[i] = O::add_to_exponent(p[i], t[i]);
    if constexpr (!InRange) a2[i] = O::zero_where(under[i], a2[i]);
  }
}
#endif

#ifdef HK_AVX2
// x <- silu(x) = x sigmoid(x) (as sigmoid8), m a multiple of 8.
inline void silu_inplace8(float* x, int64_t m) { map_exp<SiluOp>(x, m); }
#endif

// a[k] = exp(s * A[k]) = 2^(s * A2[k]) for k < n, in the form above (A2 from dense_A(A, kLog2e)).
inline void exp_scaled(const float* A2, float s, int64_t n, float* a) {
  int64_t k = 0;
#ifdef HK_AVX2
  const __m256 sv = _mm256_set1_ps(s);
  for (; k + 8 <= n; k += 8) {
    __m256 v = _mm256_loadu_ps(A2 + k);
    exp2_n<Vec8, 1, false>(sv, &v);
    _mm256_storeu_ps(a + k, v);
  }
#endif
  for (; k < n; ++k) a[k] = exp2_scalar(s, A2[k]);
}

// Per-thread scratch carved from one allocation: every array starts on its own cache line (so 64-byte
// aligned: the vector stores into it are aligned ones) and the block is padded by a line at each end.
// The hot per-step arrays (the state, the adjoint) are small (n floats) and stored every step; as
// separate small heap blocks two threads' arrays could share a cache line and bounce it between cores.
class Scratch {
 public:
  explicit Scratch(std::initializer_list<int64_t> sizes) {
    int64_t total = kLine;
    for (int64_t m : sizes) total += round(m);
    buf_.resize(total + 2 * kLine);
    int64_t off = kLine + (kLine - (reinterpret_cast<uintptr_t>(buf_.data()) / sizeof(float)) % kLine) % kLine;
    for (int64_t m : sizes) {
      ptrs_.push_back(buf_.data() + off);
      off += round(m);
    }
  }
  float* operator[](size_t i) const { return ptrs_[i]; }

 private:
  static constexpr int64_t kLine = 16;  // floats per 64-byte cache line
  static int64_t round(int64_t m) { return (m + kLine - 1) / kLine * kLine; }
  std::vector<float> buf_;
  std::vector<float*> ptrs_;
};

// The dtype dispatch of this file's entry points: errors name the argument.
template <typename F>
void dispatch_dtype(at::ScalarType st, const char* what, F&& f) {
  by_dtype(st, "hierkern::selective_scan (cpu)", what, std::forward<F>(f));
}

struct Dims {
  int64_t b, d, l, n;
};

// B or C as float32 with the n states of a step contiguous. Variable: (batch, groups, l, n); fixed
// (d, n): its rows as they are (step stride 0, one row for every step).
struct Panel {
  std::vector<float> buf;
  bool var = false;
  int64_t groups = 1, per_group = 1, l = 0, n = 0;
  const float* channel(int64_t b, int64_t d) const {
    return var ? buf.data() + (b * groups + d / per_group) * l * n : buf.data() + d * n;
  }
  int64_t step() const { return var ? n : 0; }
  int64_t group_of(int64_t d) const { return var ? d / per_group : 0; }
};

Panel make_panel(const at::Tensor& X, const Dims& s) {
  Panel p;
  p.var = X.dim() >= 3;
  p.groups = X.dim() == 4 ? X.size(1) : 1;
  p.per_group = s.d / p.groups;
  p.l = s.l;
  p.n = s.n;
  p.buf.resize(p.var ? s.b * p.groups * s.l * s.n : s.d * s.n);
  dispatch_dtype(X.scalar_type(), "B/C", [&](auto tag) {
    using T = decltype(tag);
    const T* src = X.const_data_ptr<T>();
    float* dst = p.buf.data();
    if (!p.var) {
      for (int64_t d = 0; d < s.d; ++d)
        for (int64_t k = 0; k < s.n; ++k) dst[d * s.n + k] = to_f(src[d * X.stride(0) + k * X.stride(1)]);
      return;
    }
    const int64_t sb = X.stride(0), sg = X.dim() == 4 ? X.stride(1) : 0;
    const int64_t sn = X.stride(-2), sl = X.stride(-1);
    at::parallel_for(0, s.b * p.groups, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t bg = lo; bg < hi; ++bg) {
        const T* x = src + (bg / p.groups) * sb + (bg % p.groups) * sg;
        float* o = dst + bg * s.l * s.n;
        for (int64_t k = 0; k < s.n; ++k)
          for (int64_t t = 0; t < s.l; ++t) o[t * s.n + k] = to_f(x[k * sn + t * sl]);
      }
    });
  });
  return p;
}

// A (d, n) float32 with any strides as a dense float array, each element times `scale` (kLog2e: the
// A2 every exp(dt * A) of this file takes, rounded once here).
std::vector<float> dense_A(const at::Tensor& A, float scale = 1.f) {
  std::vector<float> a(A.size(0) * A.size(1));
  const float* p = A.const_data_ptr<float>();
  for (int64_t i = 0; i < A.size(0); ++i)
    for (int64_t k = 0; k < A.size(1); ++k) a[i * A.size(1) + k] = p[i * A.stride(0) + k * A.stride(1)] * scale;
  return a;
}

// A (d,) float32 vector (D or delta_bias) as floats; zeros when absent.
std::vector<float> dense_vec(const std::optional<at::Tensor>& v, int64_t d) {
  std::vector<float> out(d, 0.f);
  if (v.has_value() && v->defined()) {
    const float* p = v->const_data_ptr<float>();
    for (int64_t i = 0; i < d; ++i) out[i] = p[i * v->stride(0)];
  }
  return out;
}

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check_bdl(const char* name, const at::Tensor& t, const at::Tensor& u) {
  TORCH_CHECK(t.sizes() == u.sizes(), "hierkern::selective_scan: ", name, " must have u's shape ",
              u.sizes(), " (batch, dim, seqlen), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == u.scalar_type(), "hierkern::selective_scan: ", name, " has dtype ",
              t.scalar_type(), " but u has ", u.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "hierkern::selective_scan (cpu): ", name, " must be a CPU tensor");
}

void check_bc(const char* name, const at::Tensor& X, const Dims& s, at::ScalarType in_dtype) {
  TORCH_CHECK(X.device().is_cpu(), "hierkern::selective_scan (cpu): ", name, " must be a CPU tensor");
  TORCH_CHECK(X.scalar_type() == at::kFloat || X.scalar_type() == in_dtype, "hierkern::selective_scan: ",
              name, " must be float32 or u's dtype ", in_dtype, ", got ", X.scalar_type());
  if (X.dim() == 2) {
    TORCH_CHECK(X.size(0) == s.d && X.size(1) == s.n, "hierkern::selective_scan: time-invariant ", name,
                " must be (dim, dstate) = (", s.d, ", ", s.n, "), got ", X.sizes());
  } else if (X.dim() == 3) {
    TORCH_CHECK(X.size(0) == s.b && X.size(1) == s.n && X.size(2) == s.l, "hierkern::selective_scan: ",
                name, " must be (batch, dstate, seqlen) = (", s.b, ", ", s.n, ", ", s.l, "), got ", X.sizes());
  } else {
    TORCH_CHECK(X.dim() == 4, "hierkern::selective_scan: ", name,
                " must be 2-D (dim, dstate), 3-D (batch, dstate, seqlen) or 4-D (batch, groups, dstate, "
                "seqlen), got ", X.dim(), "-D");
    TORCH_CHECK(X.size(0) == s.b && X.size(2) == s.n && X.size(3) == s.l && X.size(1) >= 1 &&
                    s.d % X.size(1) == 0,
                "hierkern::selective_scan: grouped ", name, " must be (batch, groups, dstate, seqlen) = (", s.b,
                ", g, ", s.n, ", ", s.l, ") with dim ", s.d, " divisible by g, got ", X.sizes());
  }
}

void check_f32(const char* name, const std::optional<at::Tensor>& t, at::IntArrayRef shape) {
  if (!present(t)) return;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->sizes() == shape && t->device().is_cpu(),
              "hierkern::selective_scan (cpu): ", name, " must be a float32 CPU tensor of shape ", shape,
              ", got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
}

Dims check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                  const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& initial_state) {
  TORCH_CHECK(u.dim() == 3, "hierkern::selective_scan: u must be 3-D (batch, dim, seqlen), got ", u.sizes());
  TORCH_CHECK(u.device().is_cpu(), "hierkern::selective_scan (cpu): u must be a CPU tensor");
  dispatch_dtype(u.scalar_type(), "u", [](auto) {});
  check_bdl("delta", delta, u);
  if (present(z)) check_bdl("z", *z, u);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1) && A.scalar_type() == at::kFloat && A.device().is_cpu(),
              "hierkern::selective_scan (cpu): A must be a float32 CPU tensor of shape (dim, dstate) with dim = ",
              u.size(1), ", got ", A.scalar_type(), " ", A.sizes());
  const Dims s{u.size(0), u.size(1), u.size(2), A.size(1)};
  TORCH_CHECK(s.n >= 1 && s.l >= 1, "hierkern::selective_scan: dstate and seqlen must be >= 1");
  check_bc("B", B, s, u.scalar_type());
  check_bc("C", C, s, u.scalar_type());
  check_f32("D", D, {s.d});
  check_f32("delta_bias", delta_bias, {s.d});
  check_f32("initial_state", initial_state, {s.b, s.d, s.n});
  return s;
}

// Strided (b, d, l) access to one channel.
template <typename T>
struct Seq {
  const T* p;
  int64_t st;
  float operator[](int64_t t) const { return to_f(p[t * st]); }
};

template <typename T>
Seq<T> seq(const at::Tensor& x, int64_t b, int64_t d) {
  return {x.const_data_ptr<T>() + b * x.stride(0) + d * x.stride(1), x.stride(2)};
}

// For steps t0 + i, i < nt: dt[i] (after bias and softplus), uu[i] = u, a[i * n + k] = exp(dt[i] * A[k])
// (from A2 = A log2(e), see exp_scaled), and with dsp the softplus derivative at the pre-activation.
// dt, uu, dsp hold pad8(nt) floats.
template <typename T>
void discretize(Seq<T> u, Seq<T> delta, const float* A2, float bias, bool softplus, int64_t t0, int64_t nt,
                int64_t n, float* dt, float* uu, float* a, float* dsp = nullptr) {
  const int64_t m = pad8(nt);
  for (int64_t i = 0; i < nt; ++i) {
    dt[i] = delta[t0 + i] + bias;
    uu[i] = u[t0 + i];
  }
  std::fill(dt + nt, dt + m, 0.f);
  if (softplus && dsp) {
    std::memcpy(dsp, dt, m * sizeof(float));
    sigmoid_inplace(dsp, m, /*thresholded=*/true);
  }
  if (softplus) softplus_inplace(dt, m);
  for (int64_t i = 0; i < nt; ++i) exp_scaled(A2, dt[i], n, a + i * n);
}

// One step of one channel: x <- a * x + coef * B; returns <C, x>. The hand-vectorised path for n a
// multiple of 8 avoids the peel / remainder / reduction scaffolding the compiler wraps around a
// 16-element loop, which cost more than the arithmetic.
inline float step(float* x, const float* a, const float* B, const float* C, float coef, int64_t n) {
#ifdef HK_AVX2
  if (n % 8 == 0) {
    const __m256 cv = _mm256_set1_ps(coef);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < n; k += 8) {
      const __m256 xk = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(x + k),
                                        _mm256_mul_ps(cv, _mm256_loadu_ps(B + k)));
      _mm256_storeu_ps(x + k, xk);
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(C + k), xk, acc);
    }
    return hsum8(acc);
  }
#endif
  float y = 0.f;
#pragma omp simd reduction(+ : y)
  for (int64_t k = 0; k < n; ++k) {
    const float xk = a[k] * x[k] + coef * B[k];
    x[k] = xk;
    y += C[k] * xk;
  }
  return y;
}

// One reverse step of one channel. h holds dL/dx_t minus the step's own output term on entry and
// dL/dx_{t-1} on exit; accumulates dA, dB_t, dC_t; returns the state part of dL/d(dt_t) (through
// exp(dt_t * A)) in *ddt and <h, B_t> in *hb.
inline void bwd_step(float* h, float* dA, float* dB, float* dC, const float* xprev, const float* xcur,
                     const float* a, const float* A, const float* B, const float* C, float dy, float dt,
                     float coef, int64_t n, float* ddt, float* hb) {
#ifdef HK_AVX2
  if (n % 8 == 0) {
    const __m256 dyv = _mm256_set1_ps(dy), dtv = _mm256_set1_ps(dt), cv = _mm256_set1_ps(coef);
    __m256 ddt_v = _mm256_setzero_ps(), hb_v = _mm256_setzero_ps();
    for (int64_t k = 0; k < n; k += 8) {
      const __m256 ak = _mm256_loadu_ps(a + k);
      _mm256_storeu_ps(dC + k, _mm256_fmadd_ps(dyv, _mm256_loadu_ps(xcur + k), _mm256_loadu_ps(dC + k)));
      const __m256 hk = _mm256_fmadd_ps(dyv, _mm256_loadu_ps(C + k), _mm256_loadu_ps(h + k));  // dL/dx_t
      const __m256 ha = _mm256_mul_ps(_mm256_mul_ps(hk, _mm256_loadu_ps(xprev + k)), ak);  // dL/d(dt A_k)
      _mm256_storeu_ps(dA + k, _mm256_fmadd_ps(ha, dtv, _mm256_loadu_ps(dA + k)));
      ddt_v = _mm256_fmadd_ps(ha, _mm256_loadu_ps(A + k), ddt_v);
      hb_v = _mm256_fmadd_ps(hk, _mm256_loadu_ps(B + k), hb_v);
      _mm256_storeu_ps(dB + k, _mm256_fmadd_ps(hk, cv, _mm256_loadu_ps(dB + k)));
      _mm256_storeu_ps(h + k, _mm256_mul_ps(hk, ak));  // dL/dx_{t-1}
    }
    *ddt = hsum8(ddt_v);
    *hb = hsum8(hb_v);
    return;
  }
#endif
  float s_ddt = 0.f, s_hb = 0.f;
#pragma omp simd reduction(+ : s_ddt, s_hb)
  for (int64_t k = 0; k < n; ++k) {
    dC[k] += dy * xcur[k];
    const float hk = h[k] + dy * C[k];
    const float ha = hk * xprev[k] * a[k];
    dA[k] += ha * dt;
    s_ddt += ha * A[k];
    s_hb += hk * B[k];
    dB[k] += hk * coef;
    h[k] = hk * a[k];
  }
  *ddt = s_ddt;
  *hb = s_hb;
}

// zv[i] = z_{t0 + i} and sg[i] = sigmoid(zv[i]) (pad8(nt) floats each).
template <typename T>
void gate(Seq<T> z, int64_t t0, int64_t nt, float* zv, float* sg) {
  const int64_t m = pad8(nt);
  for (int64_t i = 0; i < nt; ++i) zv[i] = z[t0 + i];
  std::fill(zv + nt, zv + m, 0.f);
  std::memcpy(sg, zv, m * sizeof(float));
  sigmoid_inplace(sg, m);
}

// x <- a_t * x + dt_t u_t B_t for steps [0, nt) of a discretised block.
inline void advance(float* x, const float* a, const float* dt, const float* uu, const float* Bp, int64_t sB,
                    int64_t nt, int64_t n) {
  for (int64_t i = 0; i < nt; ++i) {
    const float* ai = a + i * n;
    const float* Bt = Bp + i * sB;
    const float coef = dt[i] * uu[i];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) x[k] = ai[k] * x[k] + coef * Bt[k];
  }
}

void read_state(const std::optional<at::Tensor>& st, int64_t b, int64_t d, int64_t n, float* x) {
  if (!present(st)) {
    std::fill(x, x + n, 0.f);
    return;
  }
  const float* p = st->const_data_ptr<float>() + b * st->stride(0) + d * st->stride(1);
  for (int64_t k = 0; k < n; ++k) x[k] = p[k * st->stride(2)];
}

// One (batch, channel) task of the forward: vectorised over the n states (see the top of the file).
template <typename T>
void fwd_channel(const at::Tensor& u, const at::Tensor& delta, const float* A2d, const float* Bc, int64_t sB,
                 const float* Cc, int64_t sC, float Dd, const std::optional<at::Tensor>& z, float bias,
                 const std::optional<at::Tensor>& init, bool softplus, const Dims& s, int64_t b, int64_t d,
                 T* o, int64_t os2, float* last, const Scratch& sc) {
  float *x = sc[0], *a = sc[1], *dt = sc[2], *uu = sc[3], *zv = sc[4], *zsg = sc[5];
  const bool has_z = present(z);
  const Seq<T> us = seq<T>(u, b, d), ds = seq<T>(delta, b, d);
  const Seq<T> zs = has_z ? seq<T>(*z, b, d) : Seq<T>{nullptr, 0};
  read_state(init, b, d, s.n, x);
  for (int64_t t0 = 0; t0 < s.l; t0 += kTimeBlock) {
    const int64_t nt = std::min(kTimeBlock, s.l - t0);
    discretize(us, ds, A2d, bias, softplus, t0, nt, s.n, dt, uu, a);
    if (has_z) gate(zs, t0, nt, zv, zsg);
    for (int64_t i = 0; i < nt; ++i) {
      const float* ai = a + i * s.n;
      const float* Bt = Bc + (t0 + i) * sB;
      const float* Ct = Cc + (t0 + i) * sC;
      float y = step(x, ai, Bt, Ct, dt[i] * uu[i], s.n) + Dd * uu[i];
      if (has_z) y *= zv[i] * zsg[i];
      o[(t0 + i) * os2] = static_cast<T>(y);
    }
  }
  std::memcpy(last, x, s.n * sizeof(float));
}

#ifdef HK_AVX2
constexpr int64_t kExpSteps = 8;  // steps whose exp(dt * A) fwd_lanes computes ahead of their updates
constexpr int64_t kStage = 512;  // steps per unit of fwd_lanes's input prefetch (InputPrefetch)

// Channels per forward tile: 16 (one per AVX-512 lane; the default where the build has AVX-512) or 8
// (AVX2 lanes). HIERKERN_CPU_SCAN_LANES=8 forces the narrow tiles (tests run both widths).
// The state updates and exps of a step run at twice the width for the same instruction count
// (lanes_steps' share of the time fell by a quarter). On the sixteenth session's Xeon (b=8, d=2048,
// n=16, variable B / C, D, z, softplus; cold caches; the input prefetch below on): 25.6-26.6 ms at
// l = 680 against 32.7-33.2 for 8-lane tiles. Without the prefetch the wider tile's 48 interleaved
// input rows stall its transposes on memory and most of the gain is lost.
inline int64_t scan_lanes() {
  static const int64_t lanes = [] {
#ifdef HK_AVX512
    const char* e = std::getenv("HIERKERN_CPU_SCAN_LANES");
    if (e == nullptr || *e == '\0') return int64_t(16);
    const std::string v(e);
    TORCH_CHECK(v == "8" || v == "16", "hierkern: HIERKERN_CPU_SCAN_LANES must be 8 or 16, got '", v, "'");
    return v == "8" ? int64_t(8) : int64_t(16);
#else
    return int64_t(8);
#endif
  }();
  return lanes;
}

// The input prefetch of a tile: the cache lines fwd_lanes reads after its first kStage steps,
// requested into L2 a few per step (until(t), called by lanes_steps), in order: the rows of delta, u
// (and z) of this tile's later stages (kStage steps each), then those of stage 0 of the tile (next_b,
// next_d0; as wide as this one) the thread runs next (next_d0 < 0: none). Evenly spread over the
// tile's steps, each stage's lines are all requested before its first block.
// Without it, a tile's rows (24 for 8 lanes, 48 for 16) are as many interleaved runs of 256 bytes per
// time block, which the hardware prefetcher follows poorly (Zen 3: a staged copy of 512 steps per row
// before the transposes was 3-7% faster than that; Zen 4, an earlier form of this prefetch: 125 ->
// 111 ms at l = 2240). Into L1 (T0) the prefetch gained nothing: the exps already fill it; the output
// rows for writing measured 2% slower. How the requests are spread matters: issued as one burst per
// 64-step block (~200 lines at l = 680 with 16 lanes) they filled every line fill buffer and stalled
// the thread on the prefetch instructions, which on the fourteenth session's Xeon made the forward
// faster without any prefetch; a burst per 8 steps still left 7% of the samples there. A few lines
// per step, on the sixteenth session's Xeon (b=8, d=2048, n=16, l=680): 16-lane tiles 25.6-26.6 ms
// against 28.4-28.8 (per 8 steps), 32.3-32.9 (per block) and 33.9 (none); 8-lane tiles 32.7-33.2
// against 37.7-37.8 (none); l = 2240, 16 lanes: 85.6 ms against 106.3 (per block).
// HIERKERN_CPU_SCAN_PREFETCH=0 turns it off (A/B runs).
inline bool scan_prefetch_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("HIERKERN_CPU_SCAN_PREFETCH");
    return !(e && e[0] == '0');
  }();
  return on;
}

class InputPrefetch {
 public:
  void start(const at::Tensor& delta, const at::Tensor& u, const std::optional<at::Tensor>& z, int64_t lanes,
             int64_t l, int64_t b, int64_t d0, int64_t next_b, int64_t next_d0) {
    const at::Tensor* src[3] = {&delta, &u, present(z) ? &*z : nullptr};
    const int64_t rows = (src[2] ? 3 : 2) * lanes;
    runs_.clear();
    total_ = issued_ = 0;
    run_ = line_ = 0;
    l_ = l;
    auto stage = [&](int64_t sb, int64_t sd0, int64_t t, int64_t m) {
      // lines of m steps counted from the line that holds the first one
      const int64_t lines = (m * int64_t(sizeof(float)) + 2 * kLine - 1) / kLine;
      for (int64_t r = 0; r < rows; ++r) {
        const at::Tensor& x = *src[r / lanes];
        runs_.push_back({reinterpret_cast<const char*>(static_cast<const float*>(x.const_data_ptr()) +
                                                       sb * x.stride(0) + (sd0 + r % lanes) * x.stride(1) + t),
                         lines});
        total_ += lines;
      }
    };
    for (int64_t t = kStage; t < l; t += kStage) stage(b, d0, t, std::min(kStage, l - t));
    if (next_d0 >= 0) stage(next_b, next_d0, 0, std::min(kStage, l));
  }

  // Requests the lines due by the end of step t of the tile's l: total * (t + 1) / l in all.
  void until(int64_t t) {
    const int64_t due = total_ * (t + 1) / l_;
    for (; issued_ < due; ++issued_) {
      _mm_prefetch(runs_[run_].p + line_ * kLine, _MM_HINT_T1);
      if (++line_ == runs_[run_].lines) line_ = 0, ++run_;
    }
  }

 private:
  static constexpr int64_t kLine = 64;
  struct Run {
    const char* p;
    int64_t lines;
  };
  std::vector<Run> runs_;
  size_t run_ = 0;
  int64_t line_ = 0, issued_ = 0, total_ = 0, l_ = 1;
};

// The state updates of nt steps of a tile (see fwd_lanes), kExpSteps at a time: first
// every exp(dt_t * A_k) of those steps in one pass (E, kExpSteps * n vectors), then the updates.
// Computing the exps inside the update loop kept their temporaries and the update's live values in
// the same 16 registers: the compiler spilled both to the stack and the step ran 2x slower. Bs / Cs:
// with VarB / VarC the block's rows of the B / C panel (one row of n per step, broadcast to the
// lanes), else the tile's per-channel B8 / C8 ((n, L) floats); as template arguments the choice
// leaves the inner loop instead of testing a pointer per state.
// A8: the tile's A2 = A log2(e), (n, L); Amin / Amax: per lane, its least and greatest A2_k. zz: the
// gate silu(z) per step, or null.
// With 32 vector registers (AVX-512VL) and n = 16 (Mamba's default), NS = 16 keeps the states in
// registers through the updates of kExpSteps steps instead of storing and reloading each per step:
// 111 -> 106 ms at b=8, d=2048, l=2240 on a Zen 4. With AVX2's 16 registers they would all spill.
#ifdef __AVX512VL__
constexpr bool kStatesInRegisters = true;
#else
constexpr bool kStatesInRegisters = false;
#endif
constexpr int kRegisterStates = 16;
template <class O, bool VarB, bool VarC, int NS = 0>
void lanes_steps(int64_t nt, int64_t n_arg, const float* dt, const float* cf, const float* uu, const float* zz,
                 typename O::V Dv, const float* A8, typename O::V Amin, typename O::V Amax, const float* Bs,
                 const float* Cs, float* X, float* E, float* Y, InputPrefetch* pf, int64_t t_base) {
  using V = typename O::V;
  constexpr int64_t L = O::kLanes;
  const int64_t n = NS ? NS : n_arg;
  V xs[NS ? NS : 1];  // with NS: the states, in registers through kExpSteps steps
  for (int64_t s0 = 0; s0 < nt; s0 += kExpSteps) {
    const int64_t ns = std::min(kExpSteps, nt - s0);
    for (int64_t i = 0; i < ns; ++i) {
      if (pf) pf->until(t_base + s0 + i);  // a few lines per step: overlapped with the exps
      const V dtv = O::load(dt + (s0 + i) * L);
      float* e = E + i * n * L;
      // Rounded products are monotonic in A2, so every dt * A2_k of the step lies between these two;
      // inside [kExp2Lo, kExp2Hi] the exp needs no range handling (same bits). NaN fails the test.
      const V p0 = O::mul(dtv, Amin), p1 = O::mul(dtv, Amax);
      const bool in_range = O::all_within(O::min(p0, p1), O::max(p0, p1), kExp2Lo, kExp2Hi);
      int64_t k = 0;
      for (; k + 4 <= n; k += 4) {
        V a[4];
        for (int j = 0; j < 4; ++j) a[j] = O::load(A8 + (k + j) * L);
        if (in_range) exp2_n<O, 4, true>(dtv, a);
        else exp2_n<O, 4, false>(dtv, a);
        for (int j = 0; j < 4; ++j) O::store_aligned(e + (k + j) * L, a[j]);
      }
      if constexpr (NS % 4 != 0 || NS == 0)  // none when NS % 4 == 0 (GCC warns about the dead loop)
        for (; k < n; ++k) {
          V a = O::load(A8 + k * L);
          exp2_n<O, 1, false>(dtv, &a);
          O::store_aligned(e + k * L, a);
        }
    }
    if constexpr (NS > 0)
      _Pragma("GCC unroll 16") for (int k = 0; k < NS; ++k) xs[k] = O::load(X + k * L);
    for (int64_t i = 0; i < ns; ++i) {
      const int64_t t = s0 + i;
      const V cv = O::load(cf + t * L);
      const float* e = E + i * n * L;
      const float* Bt = Bs + (VarB ? t * n : 0);
      const float* Ct = Cs + (VarC ? t * n : 0);
      // Four partial sums for y: one accumulator would chain n FMA latencies per step.
      V y[4] = {O::set1(0.f), O::set1(0.f), O::set1(0.f), O::set1(0.f)};
      auto update = [&](int64_t k, V& acc) {
        const V bk = VarB ? O::set1(Bt[k]) : O::load(Bt + k * L);
        const V ck = VarC ? O::set1(Ct[k]) : O::load(Ct + k * L);
        V xp;
        if constexpr (NS > 0) xp = xs[k];
        else xp = O::load(X + k * L);
        const V xk = O::fmadd(O::load(e + k * L), xp, O::mul(cv, bk));
        if constexpr (NS > 0) xs[k] = xk;
        else O::store_aligned(X + k * L, xk);
        acc = O::fmadd(ck, xk, acc);
      };
      int64_t k = 0;
      _Pragma("GCC unroll 16") for (; k + 4 <= n; k += 4)
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) update(k + j, y[j]);
      if constexpr (NS % 4 != 0 || NS == 0)
        for (; k < n; ++k) update(k, y[0]);
      V yv = O::add(O::add(y[0], y[1]), O::add(y[2], y[3]));
      yv = O::add(yv, O::mul(Dv, O::load(uu + t * L)));
      if (zz) yv = O::mul(yv, O::load(zz + t * L));
      O::store_aligned(Y + t * L, yv);
    }
    if constexpr (NS > 0)
      _Pragma("GCC unroll 16") for (int k = 0; k < NS; ++k) O::store_aligned(X + k * L, xs[k]);
  }
}
#endif

#ifdef HK_AVX2

// L = O::kLanes (16 or 8) channels of one batch, one per vector lane: the forward's fast path.
// Vectorising over the states (fwd_channel) leaves each step a serial chain through the state's store
// and reload plus an 8-lane horizontal sum for y; across channels every lane is independent, y needs no reduction
// across lanes, and the n state updates of a step are n independent chains. The per-step values
// (dt, exp(dt * A), the states) are the same float32 operations fwd_channel does, so the states are
// bit-identical to it; y sums the n products in a different order (the same at either width).
// B / C: variable panels are one row per step shared by the L channels (they lie in one group:
// the caller checks), broadcast per state; fixed B / C are per channel.
template <class O, typename T>
void fwd_lanes(const at::Tensor& u, const at::Tensor& delta, const std::vector<float>& A2, const Panel& Bp,
               const Panel& Cp, const std::vector<float>& D, const std::optional<at::Tensor>& z,
                const std::vector<float>& bias, const std::optional<at::Tensor>& init, bool softplus,
                const Dims& s, int64_t b, int64_t d0, T* o, int64_t os1, int64_t os2, float* last,
                const Scratch& sc, InputPrefetch& prefetch, int64_t next_b = -1, int64_t next_d0 = -1) {
  using V = typename O::V;
  constexpr int64_t L = O::kLanes;
  const int64_t n = s.n;
  float *X = sc[0], *A8 = sc[1], *B8 = sc[2], *C8 = sc[3], *dt = sc[4], *cf = sc[5], *uu = sc[6];
  float *zz = sc[7], *Y = sc[8], *E = sc[9];
  const bool has_z = present(z);
  Seq<T> us[L], ds[L], zs[L];
  for (int64_t c = 0; c < L; ++c) {
    us[c] = seq<T>(u, b, d0 + c);
    ds[c] = seq<T>(delta, b, d0 + c);
    zs[c] = has_z ? seq<T>(*z, b, d0 + c) : Seq<T>{nullptr, 0};
    read_state(init, b, d0 + c, n, Y);  // Y as scratch: (n,) -> lane c of X
    for (int64_t k = 0; k < n; ++k) {
      X[k * L + c] = Y[k];
      A8[k * L + c] = A2[(d0 + c) * n + k];
      if (!Bp.var) B8[k * L + c] = Bp.channel(b, d0 + c)[k];
      if (!Cp.var) C8[k * L + c] = Cp.channel(b, d0 + c)[k];
    }
  }
  V Dv, biasv;
  {
    float tmp[2][L];
    for (int64_t c = 0; c < L; ++c) { tmp[0][c] = D[d0 + c]; tmp[1][c] = bias[d0 + c]; }
    Dv = O::load(tmp[0]);
    biasv = O::load(tmp[1]);
  }
  V Amin = O::load(A8), Amax = Amin;
  for (int64_t k = 1; k < n; ++k) {
    Amin = O::min(Amin, O::load(A8 + k * L));
    Amax = O::max(Amax, O::load(A8 + k * L));
  }
  const float* Bg = Bp.var ? Bp.channel(b, d0) : nullptr;
  const float* Cg = Cp.var ? Cp.channel(b, d0) : nullptr;
  // float32 sequences contiguous in time arrive as 8 x 8 transposes (8 steps of 8 channels per block,
  // L / 8 blocks side by side); anything else, and the nt % 8 tail, one element at a time.
  const bool blocks = us[0].st == 1 && ds[0].st == 1 && (!has_z || zs[0].st == 1);
  const int64_t su = u.stride(1), sd = delta.stride(1), sz = has_z ? z->stride(1) : 0;
  InputPrefetch* pf = nullptr;
  if (std::is_same_v<T, float> && blocks && scan_prefetch_enabled()) {
    pf = &prefetch;
    pf->start(delta, u, z, L, s.l, b, d0, next_b, next_d0);
  }
  for (int64_t t0 = 0; t0 < s.l; t0 += kTimeBlock) {
    const int64_t nt = std::min(kTimeBlock, s.l - t0);
    int64_t i0 = 0;
    if constexpr (std::is_same_v<T, float>) {
      if (blocks) {
        for (; i0 + 8 <= nt; i0 += 8)
          for (int64_t h = 0; h < L; h += 8) {
            transpose8x8<true>(ds[h].p + t0 + i0, sd, dt + i0 * L + h, L);
            transpose8x8<true>(us[h].p + t0 + i0, su, uu + i0 * L + h, L);
            if (has_z) transpose8x8<true>(zs[h].p + t0 + i0, sz, zz + i0 * L + h, L);
          }
      }
    }
    for (int64_t i = i0; i < nt; ++i)
      for (int64_t c = 0; c < L; ++c) {
        dt[i * L + c] = ds[c][t0 + i];
        uu[i * L + c] = us[c][t0 + i];
        if (has_z) zz[i * L + c] = zs[c][t0 + i];
      }
    for (int64_t i = 0; i < nt; ++i) O::store_aligned(dt + i * L, O::add(O::load(dt + i * L), biasv));
    if (softplus) softplus_inplace(dt, nt * L);
    for (int64_t i = 0; i < nt; ++i) O::store_aligned(cf + i * L, O::mul(O::load(dt + i * L), O::load(uu + i * L)));
    if (has_z) silu_inplace8(zz, nt * L);  // the gate
    const float* zb = has_z ? zz : nullptr;
    const float* Bs = Bg ? Bg + t0 * n : B8;
    const float* Cs = Cg ? Cg + t0 * n : C8;
    auto steps = [&](auto var_b, auto var_c) {
      constexpr bool VB = decltype(var_b)::value, VC = decltype(var_c)::value;
      if constexpr (kStatesInRegisters) {
        if (n == kRegisterStates)
          return lanes_steps<O, VB, VC, kRegisterStates>(nt, n, dt, cf, uu, zb, Dv, A8, Amin, Amax, Bs, Cs, X, E, Y,
                                                         pf, t0);
      }
      lanes_steps<O, VB, VC>(nt, n, dt, cf, uu, zb, Dv, A8, Amin, Amax, Bs, Cs, X, E, Y, pf, t0);
    };
    using Yes = std::true_type;
    using No = std::false_type;
    if (Bg && Cg) steps(Yes{}, Yes{});
    else if (Bg) steps(Yes{}, No{});
    else if (Cg) steps(No{}, Yes{});
    else steps(No{}, No{});
    int64_t j0 = 0;
    if constexpr (std::is_same_v<T, float>) {
      if (os2 == 1)
        for (; j0 + 8 <= nt; j0 += 8)
          for (int64_t h = 0; h < L; h += 8) transpose8x8(Y + j0 * L + h, L, o + (d0 + h) * os1 + t0 + j0, os1);
    }
    for (int64_t c = 0; c < L; ++c) {
      T* oc = o + (d0 + c) * os1 + t0 * os2;
      for (int64_t i = j0; i < nt; ++i) oc[i * os2] = static_cast<T>(Y[i * L + c]);
    }
  }
  for (int64_t c = 0; c < L; ++c)
    for (int64_t k = 0; k < n; ++k) last[(d0 + c) * n + k] = X[k * L + c];
}
#endif

template <typename T>
void fwd_kernel(const at::Tensor& u, const at::Tensor& delta, const std::vector<float>& A2, const Panel& Bp,
                const Panel& Cp, const std::vector<float>& D, const std::optional<at::Tensor>& z,
                const std::vector<float>& bias, const std::optional<at::Tensor>& init, bool softplus,
                const Dims& s, at::Tensor& out, at::Tensor& last) {
  T* op = out.mutable_data_ptr<T>();
  float* lp = last.mutable_data_ptr<float>();
  const int64_t os0 = out.stride(0), os1 = out.stride(1), os2 = out.stride(2);
  // Per batch: t16 tiles of 16 channels (AVX-512), then t8 tiles of 8, then the remaining channels one
  // by one.
  int64_t t16 = 0, t8 = 0;
#ifdef HK_AVX2
  // A tile's channels must read one group's B / C panel.
  auto tiles_fit = [](const Panel& P, int64_t w) { return !P.var || P.groups == 1 || P.per_group % w == 0; };
#ifdef HK_AVX512
  if (scan_lanes() == 16 && tiles_fit(Bp, 16) && tiles_fit(Cp, 16)) t16 = s.d / 16;
#endif
  if (tiles_fit(Bp, 8) && tiles_fit(Cp, 8)) t8 = (s.d - 16 * t16) / 8;
#endif
  const int64_t tiled = 16 * t16 + 8 * t8, per_b = t16 + t8 + (s.d - tiled);
  at::parallel_for(0, s.b * per_b, 1, [&](int64_t lo, int64_t hi) {
    const Scratch sc{s.n, kTimeBlock * s.n, kTimeBlock, kTimeBlock, kTimeBlock, kTimeBlock};
#ifdef HK_AVX2
    // Sized for the widest tile; an 8-channel tile uses the front of each array.
    const int64_t w = t16 ? 16 : 8, tw = kTimeBlock * w;
    const Scratch scw{w * s.n, w * s.n, w * s.n, w * s.n, tw, tw, tw, tw, std::max(tw, s.n), kExpSteps * w * s.n};
    InputPrefetch prefetch;
#endif
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / per_b, r = task % per_b;
      T* ob = op + b * os0;
      float* lb = lp + b * s.d * s.n;
#ifdef HK_AVX2
      if (r < t16 + t8) {
        // The tile this thread runs next, whose first inputs fwd_lanes prefetches (if as wide as this one).
        const int64_t nb = (task + 1) / per_b, nr = (task + 1) % per_b;
        const bool wide = r < t16, next = task + 1 < hi && (wide ? nr < t16 : nr >= t16 && nr < t16 + t8);
        const int64_t nd0 = !next ? -1 : wide ? 16 * nr : 16 * t16 + 8 * (nr - t16);
#ifdef HK_AVX512
        if (wide) {
          fwd_lanes<Vec16, T>(u, delta, A2, Bp, Cp, D, z, bias, init, softplus, s, b, 16 * r, ob, os1, os2, lb,
                              scw, prefetch, next ? nb : -1, nd0);
          continue;
        }
#endif
        fwd_lanes<Vec8, T>(u, delta, A2, Bp, Cp, D, z, bias, init, softplus, s, b, 16 * t16 + 8 * (r - t16), ob,
                           os1, os2, lb, scw, prefetch, next ? nb : -1, nd0);
        continue;
      }
#endif
      const int64_t d = tiled + (r - t16 - t8);
      fwd_channel<T>(u, delta, A2.data() + d * s.n, Bp.channel(b, d), Bp.step(), Cp.channel(b, d), Cp.step(),
                     D[d], z, bias[d], init, softplus, s, b, d, ob + d * os1, os2, lb + d * s.n, sc);
    }
  });
}

// Channel chunks for the backward: each lies inside one group of B and one of C (so its partial dB /
// dC panel belongs to one group), and there are enough of them to keep every thread busy.
int64_t channel_chunk(const Dims& s, const Panel& Bp, const Panel& Cp) {
  if (!Bp.var && !Cp.var) return 1;
  const int64_t gb = Bp.var ? Bp.groups : 1, gc = Cp.var ? Cp.groups : 1;
  const int64_t cells = std::lcm(gb, gc);  // divides d, as gb and gc do
  const int64_t per_cell = s.d / cells;
  const int64_t want = 4 * at::get_num_threads();
  for (int64_t q = 1; q <= per_cell; ++q)
    if (per_cell % q == 0 && s.b * cells * q >= want) return per_cell / q;
  return 1;
}

// Sums the per-chunk partial panels (batch, chunks, l, n) of a variable operand into dX with X's
// (b, [g,] n, l) shape, converting to its dtype.
void reduce_var_panel(const std::vector<float>& part, const Panel& P, const Dims& s, int64_t chunk,
                      at::Tensor& dX) {
  const int64_t chunks = s.d / chunk, per = P.per_group / chunk;  // chunks per group
  dispatch_dtype(dX.scalar_type(), "dB/dC", [&](auto tag) {
    using T = decltype(tag);
    T* dst = dX.mutable_data_ptr<T>();
    at::parallel_for(0, s.b * P.groups, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> acc(s.l * s.n);
      for (int64_t bg = lo; bg < hi; ++bg) {
        const int64_t b = bg / P.groups, g = bg % P.groups;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t c = g * per; c < (g + 1) * per; ++c) {
          const float* src = part.data() + (b * chunks + c) * s.l * s.n;
#pragma omp simd
          for (int64_t j = 0; j < s.l * s.n; ++j) acc[j] += src[j];
        }
        T* o = dst + bg * s.n * s.l;  // dX is contiguous (b, [g,] n, l)
        for (int64_t k = 0; k < s.n; ++k)
          for (int64_t t = 0; t < s.l; ++t) o[k * s.l + t] = static_cast<T>(acc[t * s.n + k]);
      }
    });
  });
}

// sum over the batch of a (b, m) float array, written into an m-element tensor of dX's dtype.
void reduce_batch(const std::vector<float>& part, int64_t b, at::Tensor& dX) {
  const int64_t m = dX.numel();
  dispatch_dtype(dX.scalar_type(), "gradient", [&](auto tag) {
    using T = decltype(tag);
    T* o = dX.mutable_data_ptr<T>();
    for (int64_t j = 0; j < m; ++j) {
      float acc = 0.f;
      for (int64_t i = 0; i < b; ++i) acc += part[i * m + j];
      o[j] = static_cast<T>(acc);
    }
  });
}

template <typename T>
void bwd_kernel(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_last, const at::Tensor& u,
                const at::Tensor& delta, const std::vector<float>& A, const std::vector<float>& A2,
                const Panel& Bp, const Panel& Cp, const std::vector<float>& D, const std::optional<at::Tensor>& z,
                const std::vector<float>& bias, const std::optional<at::Tensor>& init, bool softplus,
                const Dims& s, at::Tensor& du,
                at::Tensor& ddelta, at::Tensor& dz, at::Tensor& dinit, std::vector<float>& dA_part,
                std::vector<float>& dD_part, std::vector<float>& dbias_part, std::vector<float>& dB_part,
                std::vector<float>& dC_part) {
  const bool has_z = present(z);
  const int64_t n = s.n, chunk = channel_chunk(s, Bp, Cp), chunks = s.d / chunk;
  // Steps whose states one task keeps; more steps than this go through per-chunk checkpoints.
  const int64_t K = std::min(s.l, std::max<int64_t>(1, kMaxStoredStates / n));
  const int64_t n_ck = (s.l + K - 1) / K;
  T* dup = du.mutable_data_ptr<T>();
  T* ddp = ddelta.mutable_data_ptr<T>();
  T* dzp = has_z ? dz.mutable_data_ptr<T>() : nullptr;
  float* dip = dinit.mutable_data_ptr<float>();
  const std::vector<int64_t> ust(du.strides().begin(), du.strides().end());
  const std::vector<int64_t> dst(ddelta.strides().begin(), ddelta.strides().end());
  const std::vector<int64_t> zst = has_z ? std::vector<int64_t>(dz.strides().begin(), dz.strides().end())
                                         : std::vector<int64_t>(3, 0);

  at::parallel_for(0, s.b * chunks, 1, [&](int64_t lo, int64_t hi) {
    const int64_t Kp = pad8(K);
    const Scratch sc{n_ck * n, (K + 1) * n, K * n, Kp, Kp, Kp, Kp, Kp, n, n, n, n};
    float *ck = sc[0], *xs = sc[1], *a = sc[2], *dt = sc[3], *uu = sc[4], *dsp = sc[5], *zv = sc[6];
    float *zsg = sc[7], *h = sc[8], *dA = sc[9], *dBfix = sc[10], *dCfix = sc[11];
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / chunks, c = task % chunks;
      // This chunk's partial panels; fixed operands accumulate per channel in dBfix / dCfix instead.
      float* dBc = Bp.var ? dB_part.data() + task * s.l * n : dBfix;
      float* dCc = Cp.var ? dC_part.data() + task * s.l * n : dCfix;
      const int64_t sdB = Bp.var ? n : 0, sdC = Cp.var ? n : 0;
      for (int64_t d = c * chunk; d < (c + 1) * chunk; ++d) {
        const Seq<T> us = seq<T>(u, b, d), ds = seq<T>(delta, b, d), gs = seq<T>(grad_out, b, d);
        const Seq<T> zs = has_z ? seq<T>(*z, b, d) : Seq<T>{nullptr, 0};
        const float* Ad = A.data() + d * n;
        const float* A2d = A2.data() + d * n;
        const float* Bc = Bp.channel(b, d);
        const float* Cc = Cp.channel(b, d);
        const int64_t sB = Bp.step(), sC = Cp.step();
        const float Dd = D[d], bd = bias[d];
        read_state(init, b, d, n, ck);
        for (int64_t j = 0; j + 1 < n_ck; ++j) {  // checkpoints: the state before each chunk of steps
          std::memcpy(ck + (j + 1) * n, ck + j * n, n * sizeof(float));
          discretize(us, ds, A2d, bd, softplus, j * K, K, n, dt, uu, a);
          advance(ck + (j + 1) * n, a, dt, uu, Bc + j * K * sB, sB, K, n);
        }
        read_state(grad_last, b, d, n, h);
        std::fill(dA, dA + n, 0.f);
        if (!Bp.var) std::fill(dBfix, dBfix + n, 0.f);
        if (!Cp.var) std::fill(dCfix, dCfix + n, 0.f);
        float dD = 0.f, dbias = 0.f;
        for (int64_t j = n_ck - 1; j >= 0; --j) {
          const int64_t t0 = j * K, nt = std::min(K, s.l - t0);
          discretize(us, ds, A2d, bd, softplus, t0, nt, n, dt, uu, a, dsp);
          if (has_z) gate(zs, t0, nt, zv, zsg);
          std::memcpy(xs, ck + j * n, n * sizeof(float));  // xs row i + 1 = x_{t0 + i}
          for (int64_t i = 0; i < nt; ++i) {
            const float* ai = a + i * n;
            const float* Bt = Bc + (t0 + i) * sB;
            const float coef = dt[i] * uu[i];
            const float* xprev = xs + i * n;
            float* xcur = xs + (i + 1) * n;
#pragma omp simd
            for (int64_t k = 0; k < n; ++k) xcur[k] = ai[k] * xprev[k] + coef * Bt[k];
          }
          for (int64_t i = nt - 1; i >= 0; --i) {
            const int64_t t = t0 + i;
            const float* ai = a + i * n;
            const float* Bt = Bc + t * sB;
            const float* Ct = Cc + t * sC;
            const float* xprev = xs + i * n;
            const float* xcur = xs + (i + 1) * n;
            float* dBt = dBc + t * sdB;
            float* dCt = dCc + t * sdC;
            const float g = gs[t], dti = dt[i], ui = uu[i], coef = dti * ui;
            float dy = g;
            if (has_z) {
              float y = 0.f;
#pragma omp simd reduction(+ : y)
              for (int64_t k = 0; k < n; ++k) y += Ct[k] * xcur[k];
              y += Dd * ui;
              const float zi = zv[i], sg = zsg[i];
              dy = g * zi * sg;
              dzp[b * zst[0] + d * zst[1] + t * zst[2]] =
                  static_cast<T>(g * y * sg * (1.f + zi * (1.f - sg)));
            }
            dD += dy * ui;
            float ddt, hb;
            bwd_step(h, dA, dBt, dCt, xprev, xcur, ai, Ad, Bt, Ct, dy, dti, coef, n, &ddt, &hb);
            ddt += hb * ui;
            const float ddt_raw = softplus ? ddt * dsp[i] : ddt;
            dbias += ddt_raw;
            dup[b * ust[0] + d * ust[1] + t * ust[2]] = static_cast<T>(dy * Dd + dti * hb);
            ddp[b * dst[0] + d * dst[1] + t * dst[2]] = static_cast<T>(ddt_raw);
          }
        }
        const int64_t bd_i = b * s.d + d;
        std::memcpy(dip + bd_i * n, h, n * sizeof(float));
        std::memcpy(dA_part.data() + bd_i * n, dA, n * sizeof(float));
        if (!Bp.var) std::memcpy(dB_part.data() + bd_i * n, dBfix, n * sizeof(float));
        if (!Cp.var) std::memcpy(dC_part.data() + bd_i * n, dCfix, n * sizeof(float));
        dD_part[bd_i] = dD;
        dbias_part[bd_i] = dbias;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> selective_scan_fwd_cpu(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& initial_state,
    bool delta_softplus) {
  const Dims s = check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state);
  const Panel Bp = make_panel(B, s), Cp = make_panel(C, s);
  const auto A2 = dense_A(A, kLog2e);
  const auto Dv = dense_vec(D, s.d), bias = dense_vec(delta_bias, s.d);
  at::Tensor out = empty_cached({s.b, s.d, s.l}, u.options());
  at::Tensor last = at::empty({s.b, s.d, s.n}, u.options().dtype(at::kFloat));
  dispatch_dtype(u.scalar_type(), "u", [&](auto tag) {
    using T = decltype(tag);
    fwd_kernel<T>(u, delta, A2, Bp, Cp, Dv, z, bias, initial_state, delta_softplus, s, out, last);
  });
  return {out, last};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
selective_scan_bwd_cpu(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_last_state,
                       const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                       const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                       const std::optional<at::Tensor>& delta_bias,
                       const std::optional<at::Tensor>& initial_state, bool delta_softplus) {
  const Dims s = check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state);
  check_bdl("grad_out", grad_out, u);
  check_f32("grad_last_state", grad_last_state, {s.b, s.d, s.n});
  const Panel Bp = make_panel(B, s), Cp = make_panel(C, s);
  const auto Av = dense_A(A), A2 = dense_A(A, kLog2e);
  const auto Dv = dense_vec(D, s.d), bias = dense_vec(delta_bias, s.d);
  const auto f32 = u.options().dtype(at::kFloat);
  at::Tensor du = empty_cached({s.b, s.d, s.l}, u.options());
  at::Tensor ddelta = empty_cached({s.b, s.d, s.l}, u.options());
  at::Tensor dz = present(z) ? empty_cached({s.b, s.d, s.l}, u.options()) : at::empty({0}, u.options());
  at::Tensor dinit = at::empty({s.b, s.d, s.n}, f32);
  at::Tensor dA = at::empty({s.d, s.n}, f32), dD = at::empty({s.d}, f32), dbias = at::empty({s.d}, f32);
  at::Tensor dB = at::empty(B.sizes(), B.options()), dC = at::empty(C.sizes(), C.options());
  const int64_t chunk = channel_chunk(s, Bp, Cp);
  std::vector<float> dA_part(s.b * s.d * s.n), dD_part(s.b * s.d), dbias_part(s.b * s.d);
  std::vector<float> dB_part(Bp.var ? s.b * (s.d / chunk) * s.l * s.n : s.b * s.d * s.n);
  std::vector<float> dC_part(Cp.var ? s.b * (s.d / chunk) * s.l * s.n : s.b * s.d * s.n);
  dispatch_dtype(u.scalar_type(), "u", [&](auto tag) {
    using T = decltype(tag);
    bwd_kernel<T>(grad_out, grad_last_state, u, delta, Av, A2, Bp, Cp, Dv, z, bias, initial_state, delta_softplus,
                  s, du, ddelta, dz, dinit, dA_part, dD_part, dbias_part, dB_part, dC_part);
  });
  reduce_batch(dA_part, s.b, dA);
  reduce_batch(dD_part, s.b, dD);
  reduce_batch(dbias_part, s.b, dbias);
  if (Bp.var) reduce_var_panel(dB_part, Bp, s, chunk, dB); else reduce_batch(dB_part, s.b, dB);
  if (Cp.var) reduce_var_panel(dC_part, Cp, s, chunk, dC); else reduce_batch(dC_part, s.b, dC);
  return {du, ddelta, dA, dB, dC, dD, dz, dbias, dinit};
}

}  // namespace

TORCH_LIBRARY_IMPL(hierkern, CPU, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd_cpu);
  m.impl("selective_scan_bwd", &selective_scan_bwd_cpu);
}

}  // namespace hierkern::cpu
