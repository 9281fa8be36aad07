// Interval-attention CUDA kernels (impl="cuda"): one warp per query row (forward, dQ) or per key
// (dK/dV); lanes split head_dim, so each score is a warp reduction. No tensor cores: this backend is a
// portable, dependency-free CUDA path that shares the mask math with the CPU kernels (interval.h);
// the Triton kernels are the fast GPU path (impl=None picks them). Exempt from the mma check: no
// matrix tile is ever formed. Instantiated once per dtype (interval_attn_<dtype>.cu) so the
// instantiations compile in parallel.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "interval.h"

namespace hierkern::cuda {

constexpr int kWarps = 4;  // rows (or keys) per block

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(at::Half x) { return __half2float(*reinterpret_cast<__half*>(&x)); }
__device__ __forceinline__ float to_f(at::BFloat16 x) {
  return __bfloat162float(*reinterpret_cast<__nv_bfloat16*>(&x));
}
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ at::Half from_f<at::Half>(float x) {
  __half h = __float2half_rn(x);
  return *reinterpret_cast<at::Half*>(&h);
}
template <> __device__ __forceinline__ at::BFloat16 from_f<at::BFloat16>(float x) {
  __nv_bfloat16 h = __float2bfloat16_rn(x);
  return *reinterpret_cast<at::BFloat16*>(&h);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

struct Strides4 {
  int64_t b, s, h, d;
};

// A lane owns head_dim elements lane, lane + 32, ... (VPL of them).
template <typename T, int VPL>
__device__ __forceinline__ void load_vec(const T* p, int64_t sd, int D, int lane, float (&x)[VPL]) {
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int d = lane + 32 * i;
    x[i] = d < D ? to_f(p[d * sd]) : 0.f;
  }
}

template <typename T, int VPL>
__device__ __forceinline__ float dot(const T* p, int64_t sd, int D, int lane, const float (&x)[VPL]) {
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int d = lane + 32 * i;
    if (d < D) acc += x[i] * to_f(p[d * sd]);
  }
  return warp_sum(acc);
}

template <typename T, int VPL>
__global__ void __launch_bounds__(32 * kWarps) fwd_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
    float* __restrict__ lse, const int32_t* __restrict__ off, int64_t nseg, int64_t pattern, int64_t block_size, int L,
    int H, int group, int D, float scale, Strides4 qs, Strides4 ks, Strides4 vs, Strides4 os) {
  const int lane = threadIdx.x & 31;
  const int r = blockIdx.x * kWarps + (threadIdx.x >> 5);
  const int bh = blockIdx.y, b = bh / H, h = bh % H, hk = h / group;
  if (r >= L) return;
  float qv[VPL], acc[VPL];
  load_vec<T, VPL>(q + b * qs.b + r * qs.s + h * qs.h, qs.d, D, lane, qv);
#pragma unroll
  for (int i = 0; i < VPL; ++i) acc[i] = 0.f;
  float m = -INFINITY, l = 0.f;
  const KeyRanges kr = segment_row_key_ranges(off, nseg, pattern, r);
  auto visit = [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      const float s = dot<T, VPL>(k + b * ks.b + j * ks.s + hk * ks.h, ks.d, D, lane, qv) * scale;
      const float m_new = fmaxf(m, s);
      const float alpha = __expf(m - m_new), p = __expf(s - m_new);
      const T* vj = v + b * vs.b + j * vs.s + hk * vs.h;
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        const int d = lane + 32 * i;
        acc[i] = acc[i] * alpha + (d < D ? p * to_f(vj[d * vs.d]) : 0.f);
      }
      l = l * alpha + p;
      m = m_new;
    }
  };
  visit(kr.lo0, kr.hi0);
  visit(kr.lo1, kr.hi1);
  const float inv = l > 0.f ? 1.f / l : 0.f;
  T* o = out + b * os.b + r * os.s + h * os.h;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int d = lane + 32 * i;
    if (d < D) o[d * os.d] = from_f<T>(acc[i] * inv);
  }
  if (lane == 0) lse[(int64_t)bh * L + r] = l > 0.f ? m + logf(l) : -INFINITY;
}

// dQ for one query row, plus delta = dO . O for that row.
template <typename T, int VPL>
__global__ void __launch_bounds__(32 * kWarps) dq_kernel(
    const T* __restrict__ g, const T* __restrict__ q, const T* __restrict__ k,
    const T* __restrict__ v, const T* __restrict__ out, const float* __restrict__ lse,
    T* __restrict__ dq, float* __restrict__ delta_out, const int32_t* __restrict__ off, int64_t nseg,
    int64_t pattern, int64_t block_size, int L, int H, int group, int D, float scale, Strides4 gs, Strides4 qs,
    Strides4 ks, Strides4 vs, Strides4 os, Strides4 dqs) {
  const int lane = threadIdx.x & 31;
  const int r = blockIdx.x * kWarps + (threadIdx.x >> 5);
  const int bh = blockIdx.y, b = bh / H, h = bh % H, hk = h / group;
  if (r >= L) return;
  float qv[VPL], gv[VPL], acc[VPL];
  load_vec<T, VPL>(q + b * qs.b + r * qs.s + h * qs.h, qs.d, D, lane, qv);
  load_vec<T, VPL>(g + b * gs.b + r * gs.s + h * gs.h, gs.d, D, lane, gv);
  const float delta = dot<T, VPL>(out + b * os.b + r * os.s + h * os.h, os.d, D, lane, gv);
  const float lr = lse[(int64_t)bh * L + r];
#pragma unroll
  for (int i = 0; i < VPL; ++i) acc[i] = 0.f;
  const KeyRanges kr = segment_row_key_ranges(off, nseg, pattern, r);
  auto visit = [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      const T* kj = k + b * ks.b + j * ks.s + hk * ks.h;
      const float p = __expf(dot<T, VPL>(kj, ks.d, D, lane, qv) * scale - lr);
      const float dp = dot<T, VPL>(v + b * vs.b + j * vs.s + hk * vs.h, vs.d, D, lane, gv);
      const float ds = p * (dp - delta) * scale;
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        const int d = lane + 32 * i;
        if (d < D) acc[i] += ds * to_f(kj[d * ks.d]);
      }
    }
  };
  visit(kr.lo0, kr.hi0);
  visit(kr.lo1, kr.hi1);
  T* o = dq + b * dqs.b + r * dqs.s + h * dqs.h;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int d = lane + 32 * i;
    if (d < D) o[d * dqs.d] = from_f<T>(acc[i]);
  }
  if (lane == 0) delta_out[(int64_t)bh * L + r] = delta;
}

// dK, dV for one key over every query row (of every q head in its GQA group) that sees it.
template <typename T, int VPL>
__global__ void __launch_bounds__(32 * kWarps) dkv_kernel(
    const T* __restrict__ g, const T* __restrict__ q, const T* __restrict__ k,
    const T* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ delta,
    T* __restrict__ dk, T* __restrict__ dv, const int32_t* __restrict__ off, int64_t nseg,
    int64_t pattern, int64_t block_size, int L, int H, int Hk, int group, int D, float scale, Strides4 gs, Strides4 qs,
    Strides4 ks, Strides4 vs, Strides4 dks, Strides4 dvs) {
  const int lane = threadIdx.x & 31;
  const int j = blockIdx.x * kWarps + (threadIdx.x >> 5);
  const int bhk = blockIdx.y, b = bhk / Hk, hk = bhk % Hk;
  if (j >= L) return;
  float kv[VPL], vv[VPL], dka[VPL], dva[VPL];
  load_vec<T, VPL>(k + b * ks.b + j * ks.s + hk * ks.h, ks.d, D, lane, kv);
  load_vec<T, VPL>(v + b * vs.b + j * vs.s + hk * vs.h, vs.d, D, lane, vv);
#pragma unroll
  for (int i = 0; i < VPL; ++i) dka[i] = dva[i] = 0.f;
  const KeyRanges qr = segment_key_query_ranges(off, nseg, pattern, j);
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const int64_t bh = (int64_t)b * H + h;
    auto visit = [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const T* qr_ = q + b * qs.b + r * qs.s + h * qs.h;
        const T* gr = g + b * gs.b + r * gs.s + h * gs.h;
        const float p = __expf(dot<T, VPL>(qr_, qs.d, D, lane, kv) * scale - lse[bh * L + r]);
        const float ds = p * (dot<T, VPL>(gr, gs.d, D, lane, vv) - delta[bh * L + r]) * scale;
#pragma unroll
        for (int i = 0; i < VPL; ++i) {
          const int d = lane + 32 * i;
          if (d < D) {
            dva[i] += p * to_f(gr[d * gs.d]);
            dka[i] += ds * to_f(qr_[d * qs.d]);
          }
        }
      }
    };
    visit(qr.lo0, qr.hi0);
    visit(qr.lo1, qr.hi1);
  }
  T* dkp = dk + b * dks.b + j * dks.s + hk * dks.h;
  T* dvp = dv + b * dvs.b + j * dvs.s + hk * dvs.h;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int d = lane + 32 * i;
    if (d < D) {
      dkp[d * dks.d] = from_f<T>(dka[i]);
      dvp[d * dvs.d] = from_f<T>(dva[i]);
    }
  }
}


struct AttnArgs {
  const void *q, *k, *v, *out, *g;
  const float* lse;
  void *dq, *dk, *dv, *o;
  float *lse_out, *delta;
  const int32_t* off;
  int64_t nseg, pattern, block_size;
  int B, L, H, Hk, D;
  float scale;
  Strides4 qs, ks, vs, os, gs, dqs, dks, dvs;
};

// Calls f(std::integral_constant<int, VPL>) with VPL >= ceil(head_dim / 32), rounded up to an
// instantiated size. head_dim <= 64 shares VPL = 2: the VPL = 1 build spills a few bytes on sm_80.
template <typename F>
void with_vpl(int D, F&& f) {
  switch ((D + 31) / 32) {
    case 1: case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: case 6: f(std::integral_constant<int, 6>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

template <typename T>
void launch_fwd(const AttnArgs& a, cudaStream_t stream) {
  const dim3 grid((a.L + kWarps - 1) / kWarps, a.B * a.H), block(32 * kWarps);
  with_vpl(a.D, [&](auto vpl) {
    fwd_kernel<T, decltype(vpl)::value><<<grid, block, 0, stream>>>(
        (const T*)a.q, (const T*)a.k, (const T*)a.v, (T*)a.o, a.lse_out, a.off, a.nseg, a.pattern, a.block_size,
        a.L, a.H, a.H / a.Hk, a.D, a.scale, a.qs, a.ks, a.vs, a.os);
  });
}

template <typename T>
void launch_bwd(const AttnArgs& a, cudaStream_t stream) {
  const dim3 block(32 * kWarps);
  const dim3 grid_q((a.L + kWarps - 1) / kWarps, a.B * a.H), grid_k((a.L + kWarps - 1) / kWarps, a.B * a.Hk);
  with_vpl(a.D, [&](auto vpl) {
    constexpr int VPL = decltype(vpl)::value;
    dq_kernel<T, VPL><<<grid_q, block, 0, stream>>>(
        (const T*)a.g, (const T*)a.q, (const T*)a.k, (const T*)a.v, (const T*)a.out, a.lse, (T*)a.dq,
        a.delta, a.off, a.nseg, a.pattern, a.block_size, a.L, a.H, a.H / a.Hk, a.D, a.scale, a.gs, a.qs, a.ks,
        a.vs, a.os, a.dqs);
    dkv_kernel<T, VPL><<<grid_k, block, 0, stream>>>(
        (const T*)a.g, (const T*)a.q, (const T*)a.k, (const T*)a.v, a.lse, a.delta, (T*)a.dk,
        (T*)a.dv, a.off, a.nseg, a.pattern, a.block_size, a.L, a.H, a.Hk, a.H / a.Hk, a.D, a.scale, a.gs, a.qs,
        a.ks, a.vs, a.dks, a.dvs);
  });
}

}  // namespace hierkern::cuda
