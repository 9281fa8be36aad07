// Causal depthwise conv1d on the CPU (the short conv of a Mamba block), with conv state in and out.
//
//   xpad = cat(initial_state, x) along time; out[b, c, t] = act(bias[c] + sum_k w[c, k] xpad[b, c, t + k])
//   final_state = the last width - 1 columns of xpad.
//
// Parallel over (batch, block of channels; see Block). Each task walks time in chunks that it gathers
// into channel-major float buffers (time innermost, whatever x's strides: contiguous and channel-last
// inputs are both read without copies of the tensor), so the tap loops vectorise over time.
// Backward: dpre = grad_out * act'(pre) (pre recomputed from x), then dxpad[j] = sum_k w[k] dpre[j - k]
// as a scatter into a chunk-local buffer whose last width - 1 columns carry into the next chunk;
// dweight / dbias are reduced per task in float32 and summed over the batch afterwards (no atomics).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/cpu_math.h"
#include "interval_checks.h"

namespace hierkern::cpu {
namespace {

// Task shape (channels x buffered time steps), by x's layout. Contiguous x: 16 channel rows of 512
// contiguous steps (128 tasks at batch 2, dim 1024). Channel-last x: a time step is one row of `dim`
// values, so a task reads 64 channels (256 contiguous bytes of float32) per step: with 16 every 64-byte
// read landed on its own 4 KiB page at dim 1024 and the gathers were TLB-bound.
struct Block {
  int64_t channels, chunk;
};
constexpr Block kTimeMajor{16, 512}, kChannelMajor{64, 128};
constexpr int64_t kMaxChannels = 64;
Block block_for(const at::Tensor& x) { return x.stride(1) < x.stride(2) ? kChannelMajor : kTimeMajor; }
constexpr int64_t kMinWidth = 2, kMaxWidth = 4;

struct View {
  const void* data = nullptr;
  int64_t sb = 0, sc = 0, st = 0;
};

View view_of(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// dst[c * ld + i] = base[c * sc + i * st] for nc channels and n steps, in the loop order that walks
// memory contiguously (channel-last inputs have sc == 1).
template <typename T>
void gather(const T* base, int64_t sc, int64_t st, int64_t nc, int64_t n, float* dst, int64_t ld) {
#ifdef HK_AVX2
  // Channel-last float32: 8 x 8 register transposes instead of stride-ld scalar stores.
  if constexpr (std::is_same_v<T, float>) {
    if (sc == 1 && nc % 8 == 0) {
      const int64_t n8 = n - n % 8;
      for (int64_t i = 0; i < n8; i += 8)
        for (int64_t c = 0; c < nc; c += 8) transpose8x8(base + i * st + c, st, dst + c * ld + i, ld);
      for (int64_t i = n8; i < n; ++i)
        for (int64_t c = 0; c < nc; ++c) dst[c * ld + i] = base[c + i * st];
      return;
    }
  }
#endif
  if (st <= sc) {
    for (int64_t c = 0; c < nc; ++c)
      for (int64_t i = 0; i < n; ++i) dst[c * ld + i] = to_f(base[c * sc + i * st]);
  } else {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < nc; ++c) dst[c * ld + i] = to_f(base[c * sc + i * st]);
  }
}

template <typename T>
void scatter(const float* src, int64_t ld, int64_t nc, int64_t n, T* base, int64_t sc, int64_t st) {
#ifdef HK_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (sc == 1 && nc % 8 == 0) {
      const int64_t n8 = n - n % 8;
      for (int64_t i = 0; i < n8; i += 8)
        for (int64_t c = 0; c < nc; c += 8) transpose8x8(src + c * ld + i, ld, base + i * st + c, st);
      for (int64_t i = n8; i < n; ++i)
        for (int64_t c = 0; c < nc; ++c) base[c + i * st] = src[c * ld + i];
      return;
    }
  }
#endif
  if (st <= sc) {
    for (int64_t c = 0; c < nc; ++c)
      for (int64_t i = 0; i < n; ++i) base[c * sc + i * st] = static_cast<T>(src[c * ld + i]);
  } else {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < nc; ++c) base[c * sc + i * st] = static_cast<T>(src[c * ld + i]);
  }
}

// The time axis of xpad in x's coordinates: position p < 0 is initial_state column p + W - 1 (zero
// without a state), p >= 0 is x column p. Positions [p0, p0 + n) of channels [c0, c0 + nc), batch b.
template <typename T, int W>
void load_xpad(const View& x, const View* init, int64_t b, int64_t c0, int64_t nc, int64_t p0, int64_t n,
               float* dst, int64_t ld) {
  const int64_t n_state = std::clamp<int64_t>(-p0, 0, n);
  if (n_state > 0) {
    if (init) {
      const T* base = static_cast<const T*>(init->data) + b * init->sb + c0 * init->sc + (p0 + W - 1) * init->st;
      gather(base, init->sc, init->st, nc, n_state, dst, ld);
    } else {
      for (int64_t c = 0; c < nc; ++c) std::fill(dst + c * ld, dst + c * ld + n_state, 0.f);
    }
  }
  if (n > n_state) {
    const T* base = static_cast<const T*>(x.data) + b * x.sb + c0 * x.sc + (p0 + n_state) * x.st;
    gather(base, x.sc, x.st, nc, n - n_state, dst + n_state, ld);
  }
}

// The write side of load_xpad: positions p < 0 go to dinit (B, D, W - 1), the rest to dx.
template <typename T, int W>
void store_xpad(const float* src, int64_t ld, View dx, View dinit, int64_t b, int64_t c0, int64_t nc,
                int64_t p0, int64_t n) {
  const int64_t n_state = std::clamp<int64_t>(-p0, 0, n);
  if (n_state > 0) {
    T* base = const_cast<T*>(static_cast<const T*>(dinit.data)) + b * dinit.sb + c0 * dinit.sc +
              (p0 + W - 1) * dinit.st;
    scatter(src, ld, nc, n_state, base, dinit.sc, dinit.st);
  }
  if (n > n_state) {
    T* base = const_cast<T*>(static_cast<const T*>(dx.data)) + b * dx.sb + c0 * dx.sc + (p0 + n_state) * dx.st;
    scatter(src + n_state, ld, nc, n - n_state, base, dx.sc, dx.st);
  }
}

// silu and its derivative in place over a row. The scalar fast_exp does not vectorise by itself
// (std::nearbyint), which made silu 4x the cost of the taps: eight lanes of exp8 where AVX2 exists.
inline void silu_row(float* v, int64_t n) {
  int64_t t = 0;
#ifdef HK_AVX2
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  for (; t + 8 <= n; t += 8) {
    const __m256 x = _mm256_loadu_ps(v + t);
    _mm256_storeu_ps(v + t, _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, x)))));
  }
#endif
  for (; t < n; ++t) v[t] = v[t] / (1.f + fast_exp(-v[t]));
}

// g[t] *= silu'(pre[t]) = s (1 + pre (1 - s)), s = sigmoid(pre).
inline void mul_dsilu_row(float* g, const float* pre, int64_t n) {
  int64_t t = 0;
#ifdef HK_AVX2
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  for (; t + 8 <= n; t += 8) {
    const __m256 x = _mm256_loadu_ps(pre + t);
    const __m256 sg = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, x))));
    const __m256 d = _mm256_mul_ps(sg, _mm256_fmadd_ps(x, _mm256_sub_ps(one, sg), one));
    _mm256_storeu_ps(g + t, _mm256_mul_ps(_mm256_loadu_ps(g + t), d));
  }
#endif
  for (; t < n; ++t) {
    const float sg = 1.f / (1.f + fast_exp(-pre[t]));
    g[t] *= sg * (1.f + pre[t] * (1.f - sg));
  }
}

// pre[c][t] = bias[c] + sum_k w[c][k] xb[c][t + k] for t < n (xb holds n + W - 1 columns).
template <int W>
void conv_rows(const float* xb, int64_t ldx, const float* w, const float* bias, int64_t nc, int64_t n,
               float* pre, int64_t ldp) {
  for (int64_t c = 0; c < nc; ++c) {
    const float* xr = xb + c * ldx;
    float* pr = pre + c * ldp;
    float wc[W];
    for (int k = 0; k < W; ++k) wc[k] = w[c * W + k];
    const float bc = bias[c];
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) {
      float acc = bc;
      for (int k = 0; k < W; ++k) acc += wc[k] * xr[t + k];
      pr[t] = acc;
    }
  }
}

template <typename T>
void load_params(const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t c0, int64_t nc,
                 int W, float* w, float* bv) {
  const T* wp = weight.data_ptr<T>();
  for (int64_t c = 0; c < nc; ++c)
    for (int k = 0; k < W; ++k) w[c * W + k] = to_f(wp[(c0 + c) * weight.stride(0) + k * weight.stride(1)]);
  for (int64_t c = 0; c < nc; ++c)
    bv[c] = bias.has_value() ? to_f(bias->data_ptr<T>()[(c0 + c) * bias->stride(0)]) : 0.f;
}

template <typename T, int W>
void fwd_kernel(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const std::optional<at::Tensor>& initial_state, bool act, at::Tensor& out, at::Tensor& final_state) {
  const int64_t B = x.size(0), D = x.size(1), L = x.size(2);
  const View xv = view_of(x), ov = view_of(out), fv = view_of(final_state);
  const View iv = initial_state.has_value() ? view_of(*initial_state) : View{};
  const View* init = initial_state.has_value() ? &iv : nullptr;
  const Block blk = block_for(x);
  const int64_t CB = blk.channels, TC = blk.chunk, n_cblocks = (D + CB - 1) / CB;
  at::parallel_for(0, B * n_cblocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t ldx = TC + W - 1;
    std::vector<float> xb(CB * ldx), ob(CB * TC), w(CB * W), bv(CB);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_cblocks, c0 = (task % n_cblocks) * CB;
      const int64_t nc = std::min(CB, D - c0);
      load_params<T>(weight, bias, c0, nc, W, w.data(), bv.data());
      for (int64_t t0 = 0; t0 < L; t0 += TC) {
        const int64_t n = std::min(TC, L - t0);
        load_xpad<T, W>(xv, init, b, c0, nc, t0 - (W - 1), n + W - 1, xb.data(), ldx);
        conv_rows<W>(xb.data(), ldx, w.data(), bv.data(), nc, n, ob.data(), TC);
        if (act)
          for (int64_t c = 0; c < nc; ++c) silu_row(ob.data() + c * TC, n);
        T* obase = static_cast<T*>(const_cast<void*>(ov.data)) + b * ov.sb + c0 * ov.sc + t0 * ov.st;
        scatter(ob.data(), TC, nc, n, obase, ov.sc, ov.st);
      }
      // final_state: xpad positions L - (W - 1) .. L - 1 (reaching into initial_state when L < W - 1).
      load_xpad<T, W>(xv, init, b, c0, nc, L - (W - 1), W - 1, xb.data(), W - 1);
      T* fbase = static_cast<T*>(const_cast<void*>(fv.data)) + b * fv.sb + c0 * fv.sc;
      scatter(xb.data(), W - 1, nc, W - 1, fbase, fv.sc, fv.st);
    }
  });
}

template <typename T, int W>
void bwd_kernel(const at::Tensor& dout, const std::optional<at::Tensor>& dfinal, const at::Tensor& x,
                const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const std::optional<at::Tensor>& initial_state, bool act, at::Tensor& dx, at::Tensor& dw_part,
                at::Tensor& db_part, at::Tensor& dinit) {
  const int64_t B = x.size(0), D = x.size(1), L = x.size(2);
  const View xv = view_of(x), gv = view_of(dout), dxv = view_of(dx), div = view_of(dinit);
  const View iv = initial_state.has_value() ? view_of(*initial_state) : View{};
  const View* init = initial_state.has_value() ? &iv : nullptr;
  const View fv = dfinal.has_value() ? view_of(*dfinal) : View{};
  float* dwp = dw_part.data_ptr<float>();  // (B, D, W)
  float* dbp = db_part.data_ptr<float>();  // (B, D)
  const Block blk = block_for(x);
  const int64_t CB = blk.channels, TC = blk.chunk, n_cblocks = (D + CB - 1) / CB;
  at::parallel_for(0, B * n_cblocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t ldx = TC + W - 1;
    std::vector<float> xb(CB * ldx), dp(CB * TC), pre(CB * TC);
    std::vector<float> ab(CB * ldx), fb(CB * (W - 1)), w(CB * W), bv(CB);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_cblocks, c0 = (task % n_cblocks) * CB;
      const int64_t nc = std::min(CB, D - c0);
      load_params<T>(weight, bias, c0, nc, W, w.data(), bv.data());
      float dw[kMaxChannels * W] = {}, db[kMaxChannels] = {};
      for (int64_t c = 0; c < nc; ++c) std::fill(ab.data() + c * ldx, ab.data() + c * ldx + W - 1, 0.f);
      for (int64_t t0 = 0; t0 < L; t0 += TC) {
        const int64_t n = std::min(TC, L - t0);
        const bool last = t0 + n == L;
        load_xpad<T, W>(xv, init, b, c0, nc, t0 - (W - 1), n + W - 1, xb.data(), ldx);
        gather(static_cast<const T*>(gv.data) + b * gv.sb + c0 * gv.sc + t0 * gv.st, gv.sc, gv.st, nc, n,
               dp.data(), TC);
        if (act) {
          conv_rows<W>(xb.data(), ldx, w.data(), bv.data(), nc, n, pre.data(), TC);
          for (int64_t c = 0; c < nc; ++c) mul_dsilu_row(dp.data() + c * TC, pre.data() + c * TC, n);
        }
        for (int64_t c = 0; c < nc; ++c) {
          const float* g = dp.data() + c * TC;
          const float* xr = xb.data() + c * ldx;
          float* a = ab.data() + c * ldx;
          std::fill(a + W - 1, a + n + W - 1, 0.f);  // columns 0 .. W - 2 hold the previous chunk's carry
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t t = 0; t < n; ++t) s += g[t];
          db[c] += s;
          for (int k = 0; k < W; ++k) {
            const float wk = w[c * W + k];
            float sk = 0.f;
#pragma omp simd reduction(+ : sk)
            for (int64_t t = 0; t < n; ++t) {
              sk += g[t] * xr[t + k];
              a[t + k] += wk * g[t];
            }
            dw[c * W + k] += sk;
          }
        }
        const int64_t p0 = t0 - (W - 1);
        if (last) {
          // final_state is xpad's last W - 1 columns: its gradient joins the chunk's tail.
          if (dfinal.has_value()) {
            gather(static_cast<const T*>(fv.data) + b * fv.sb + c0 * fv.sc, fv.sc, fv.st, nc, W - 1, fb.data(), W - 1);
            for (int64_t c = 0; c < nc; ++c)
              for (int i = 0; i < W - 1; ++i) ab[c * ldx + n + i] += fb[c * (W - 1) + i];
          }
          store_xpad<T, W>(ab.data(), ldx, dxv, div, b, c0, nc, p0, n + W - 1);
        } else {
          store_xpad<T, W>(ab.data(), ldx, dxv, div, b, c0, nc, p0, n);
          for (int64_t c = 0; c < nc; ++c)
            std::copy(ab.data() + c * ldx + n, ab.data() + c * ldx + n + W - 1, ab.data() + c * ldx);
        }
      }
      std::copy(dw, dw + nc * W, dwp + (b * D + c0) * W);
      std::copy(db, db + nc, dbp + b * D + c0);
    }
  });
}

template <typename F>
void by_width(int64_t width, F&& f) {
  switch (width) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: TORCH_CHECK(false, "hierkern::causal_conv1d: width ", width, " is not supported (2..4)");
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& initial_state) {
  TORCH_CHECK(x.dim() == 3, "hierkern::causal_conv1d: x must be 3-D (batch, dim, seqlen), got ", x.sizes());
  TORCH_CHECK(x.size(2) >= 1, "hierkern::causal_conv1d: x must hold at least one time step");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == x.size(1) && weight.size(1) >= kMinWidth &&
                  weight.size(1) <= kMaxWidth,
              "hierkern::causal_conv1d: weight must be (dim, width) with width in [2, 4], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(),
              "hierkern::causal_conv1d: weight must match x in dtype and device");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x.size(1) && bias->scalar_type() == x.scalar_type() &&
                    bias->device() == x.device(),
                "hierkern::causal_conv1d: bias must be (dim,) with x's dtype and device");
  if (initial_state.has_value())
    TORCH_CHECK(initial_state->dim() == 3 && initial_state->size(0) == x.size(0) &&
                    initial_state->size(1) == x.size(1) && initial_state->size(2) == weight.size(1) - 1 &&
                    initial_state->scalar_type() == x.scalar_type() && initial_state->device() == x.device(),
                "hierkern::causal_conv1d: initial_state must be (batch, dim, width - 1) with x's dtype and device");
}

std::tuple<at::Tensor, at::Tensor> causal_conv1d_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                         const std::optional<at::Tensor>& bias,
                                                         const std::optional<at::Tensor>& initial_state,
                                                         bool silu) {
  check_inputs(x, weight, bias, initial_state);
  TORCH_CHECK(x.device().is_cpu(), "hierkern::causal_conv1d_fwd (cpu): x must be a CPU tensor");
  at::Tensor out = at::empty_like(x);  // x's layout when x is dense (channel-last stays channel-last)
  at::Tensor final_state = at::empty({x.size(0), x.size(1), weight.size(1) - 1}, x.options());
  by_dtype(x.scalar_type(), "hierkern::causal_conv1d_fwd (cpu)", [&](auto tag) {
    by_width(weight.size(1), [&](auto w) {
      fwd_kernel<decltype(tag), decltype(w)::value>(x, weight, bias, initial_state, silu, out, final_state);
    });
  });
  return {out, final_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_final_state, const at::Tensor& x,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& initial_state, bool silu) {
  check_inputs(x, weight, bias, initial_state);
  TORCH_CHECK(x.device().is_cpu(), "hierkern::causal_conv1d_bwd (cpu): x must be a CPU tensor");
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(),
              "hierkern::causal_conv1d_bwd: grad_out must match x in shape and dtype");
  const int64_t B = x.size(0), D = x.size(1), W = weight.size(1);
  if (grad_final_state.has_value())
    TORCH_CHECK(grad_final_state->dim() == 3 && grad_final_state->size(0) == B && grad_final_state->size(1) == D &&
                    grad_final_state->size(2) == W - 1 && grad_final_state->scalar_type() == x.scalar_type(),
                "hierkern::causal_conv1d_bwd: grad_final_state must be (batch, dim, width - 1) in x's dtype");
  at::Tensor dx = at::empty_like(x);
  at::Tensor dinit = at::empty({B, D, W - 1}, x.options());
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dw_part = at::empty({B, D, W}, f32), db_part = at::empty({B, D}, f32);
  by_dtype(x.scalar_type(), "hierkern::causal_conv1d_bwd (cpu)", [&](auto tag) {
    by_width(W, [&](auto w) {
      bwd_kernel<decltype(tag), decltype(w)::value>(grad_out, grad_final_state, x, weight, bias, initial_state,
                                                    silu, dx, dw_part, db_part, dinit);
    });
  });
  // The per-batch partials are summed in float32, in batch order, and rounded once.
  return {dx, dw_part.sum(0).to(weight.scalar_type()), db_part.sum(0).to(x.scalar_type()), dinit};
}

}  // namespace

TORCH_LIBRARY_IMPL(hierkern, CPU, m) {
  m.impl("causal_conv1d_fwd", &causal_conv1d_fwd_cpu);
  m.impl("causal_conv1d_bwd", &causal_conv1d_bwd_cpu);
}

}  // namespace hierkern::cpu
