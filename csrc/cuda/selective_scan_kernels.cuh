// Selective scan (Mamba-1, mamba-ssm's selective_scan_fn semantics plus an initial state): CUDA kernels.
//
// Self-contained on purpose: no torch, CUDA or C++ standard headers, so the same text is compiled by
// nvcc into hierkern._C (csrc/cuda/selective_scan.cu registers the ops) and, for installs built without
// CUDA, by NVRTC at first use (hierkern/ops/scan/cuda_nvrtc.py). The entry points are extern "C" (no
// name mangling to resolve through NVRTC) and take one ScanParams by value; the Python mirror of that
// struct is hierkern/ops/scan/cuda_source.py (a test compares the field lists).
//
// Layout, as mamba-ssm: one block per (batch, channel); the sequence is cut into chunks of
// blockDim.x * kItems steps, each thread owning kItems consecutive steps of a chunk. For every state k
// the steps' affine maps x -> a_t x + b_t (a = exp(dt A_k), b = dt B_k u) are composed per thread,
// scanned across the block (warp shuffles, then the <= 4 warp totals through shared memory), applied to
// the float32 state carried over from the previous chunk, and the thread replays its steps to form
// y_t += C_k,t x_t. The carried state lives in the `last` output (b, d, n), so dstate is unbounded.
//
// The backward recomputes: a first sweep stores the state before each chunk (b, d, chunks, n floats of
// workspace, not (b, d, l, n)); then chunks are visited last to first, each replaying its forward scan
// and running the adjoint recurrence q_{t-1} = a_t (q_t + dy_t C_t) as a reverse block scan, with the
// carried adjoint in the dinit output. Time-varying dB / dC are sums over a group's channels
// (atomicAdd into float32 buffers); dA, dD, d(delta_bias) and time-invariant dB / dC are per-(batch,
// channel) partials summed over the batch by the caller.
#pragma once

typedef long long hk_i64;

// All fields are 8 bytes, so the struct has no padding and a ctypes mirror lays out identically.
struct ScanParams {
  const void *u, *delta, *A, *B, *C, *D, *z, *delta_bias, *init;
  void *out, *last;                                   // forward outputs: out (b, d, l) dense, last (b, d, n)
  const void *gout, *glast;                           // backward inputs
  void *du, *ddelta, *dz;                             // (b, d, l) dense, u's dtype
  void *dA, *dB, *dC, *dD, *dbias, *dinit, *ckpt;     // float32 (see the backward)
  hk_i64 batch, dim, seqlen, dstate, nchunks;
  // B / C element (batch b, channel c, state k, step t) sits at b*sX_b + (c / (dim / groups))*sX_g +
  // k*sX_n + t*sX_l: time-invariant (d, n) is groups = dim with sX_b = sX_l = 0.
  hk_i64 B_var, B_groups, B_f32, C_var, C_groups, C_f32, softplus;
  hk_i64 su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sz_b, sz_d, sz_l, sA_d, sA_n;
  hk_i64 sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l;
  hk_i64 sD, sbias, si_b, si_d, si_n, sg_b, sg_d, sg_l, sgl_b, sgl_d, sgl_n;
};

namespace hk_ss {

constexpr int kItems = 8;         // consecutive steps per thread
constexpr int kMaxThreads = 128;  // the launcher picks 32..128 (a multiple of 32) to fit short sequences
constexpr int kChunk = kMaxThreads * kItems;
constexpr int kSmem = kChunk + kChunk / 32;  // one pad float per 32: blocked reads are conflict-free

struct Half { unsigned short x; };
struct BF16 { unsigned short x; };

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(Half v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x));
  return f;
}
__device__ __forceinline__ float to_f(BF16 v) { return __uint_as_float(((unsigned)v.x) << 16); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ Half from_f<Half>(float v) {
  Half h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.x) : "f"(v));
  return h;
}
template <> __device__ __forceinline__ BF16 from_f<BF16>(float v) {
  BF16 h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.x) : "f"(v));
  return h;
}

// An affine map x -> a x + b; then(p, q) applies p first.
struct Pair { float a, b; };
__host__ __device__ __forceinline__ Pair identity() { return {1.f, 0.f}; }
__host__ __device__ __forceinline__ Pair then(Pair p, Pair q) { return {p.a * q.a, q.a * p.b + q.b}; }
__host__ __device__ __forceinline__ float apply(Pair p, float x) { return p.a * x + p.b; }

// F.softplus (threshold 20) and its derivative.
__host__ __device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }
__host__ __device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
__host__ __device__ __forceinline__ float softplus_grad(float x) { return x > 20.f ? 1.f : sigmoid(x); }

__device__ __forceinline__ int pad(int j) { return j + (j >> 5); }

template <typename T>
__device__ __forceinline__ float load_bc(const void* p, hk_i64 i, hk_i64 f32) {
  return f32 ? static_cast<const float*>(p)[i] : to_f(static_cast<const T*>(p)[i]);
}

__device__ __forceinline__ Pair shfl(Pair v, int o, bool rev) {
  if (rev) return {__shfl_down_sync(0xffffffffu, v.a, o), __shfl_down_sync(0xffffffffu, v.b, o)};
  return {__shfl_up_sync(0xffffffffu, v.a, o), __shfl_up_sync(0xffffffffu, v.b, o)};
}

// Block scan of per-thread maps in thread order (Rev: reverse thread order). excl: the composition of
// the maps before this thread's; tot: of all. tot_buf alternates between two halves per call (the
// caller's phase), so back-to-back scans need one barrier each.
template <bool Rev>
__device__ __forceinline__ void block_scan(Pair agg, Pair (*tot_buf)[4], int& phase, Pair& excl, Pair& tot) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int pl = Rev ? 31 - lane : lane, pw = Rev ? nw - 1 - w : w;
  Pair v = agg;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const Pair other = shfl(v, o, Rev);
    if (pl >= o) v = then(other, v);
  }
  Pair ex = shfl(v, 1, Rev);
  if (pl == 0) ex = identity();
  Pair* buf = tot_buf[phase & 1];
  ++phase;
  if (pl == 31) buf[pw] = v;
  __syncthreads();
  Pair pre = identity();
  for (int q = 0; q < pw; ++q) pre = then(pre, buf[q]);
  tot = pre;
  for (int q = pw; q < nw; ++q) tot = then(tot, buf[q]);
  excl = then(pre, ex);
}

struct F3 { float x, y, z; };

// Sum over the block; the result is valid in every thread.
__device__ __forceinline__ F3 block_sum(F3 v, F3 (*buf2)[4], int& phase) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
    v.z += __shfl_xor_sync(0xffffffffu, v.z, o);
  }
  F3* buf = buf2[phase & 1];
  ++phase;
  if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = v;
  __syncthreads();
  F3 s = {0.f, 0.f, 0.f};
  for (int q = 0; q < (int)(blockDim.x >> 5); ++q) {
    s.x += buf[q].x;
    s.y += buf[q].y;
    s.z += buf[q].z;
  }
  return s;
}

// Stages steps [c0, c0 + len) of one strided (b, d, l) sequence into shared memory as float
// (coalesced reads; the blocked per-thread reads then come from shared memory). The rest of the chunk
// is zeroed: padded steps must read finite values (0 * NaN from stale memory would poison a scan).
template <typename T>
__device__ __forceinline__ void stage(float* s, const T* x, hk_i64 stride, hk_i64 c0, int len) {
  for (int j = threadIdx.x; j < (int)(blockDim.x * kItems); j += blockDim.x)
    s[pad(j)] = j < len ? to_f(x[(c0 + j) * stride]) : 0.f;
}

template <typename T>
__device__ __forceinline__ void stage_bc(float* s, const void* X, hk_i64 base, hk_i64 sl, hk_i64 f32, hk_i64 c0,
                                         int len) {
  for (int j = threadIdx.x; j < (int)(blockDim.x * kItems); j += blockDim.x)
    s[pad(j)] = j < len ? load_bc<T>(X, base + (c0 + j) * sl, f32) : 0.f;
}

template <typename T>
__device__ __forceinline__ void store(T* y, const float* s, hk_i64 c0, int len) {
  for (int j = threadIdx.x; j < len; j += blockDim.x) y[c0 + j] = from_f<T>(s[pad(j)]);
}

struct Channel {
  hk_i64 b, c, bd;
  hk_i64 Bbase, Cbase;  // element offsets of (b, c's group, state 0, step 0)
  float Dc, bias;
};

__device__ __forceinline__ Channel channel(const ScanParams& p) {
  Channel ch;
  ch.bd = blockIdx.x;
  ch.b = ch.bd / p.dim;
  ch.c = ch.bd % p.dim;
  ch.Bbase = ch.b * p.sB_b + (ch.c / (p.dim / p.B_groups)) * p.sB_g;
  ch.Cbase = ch.b * p.sC_b + (ch.c / (p.dim / p.C_groups)) * p.sC_g;
  ch.Dc = p.D ? static_cast<const float*>(p.D)[ch.c * p.sD] : 0.f;
  ch.bias = p.delta_bias ? static_cast<const float*>(p.delta_bias)[ch.c * p.sbias] : 0.f;
  return ch;
}

// State k's B and C over the chunk [c0, c0 + len): a variable one staged into s_B / s_C (between
// barriers: every thread's reads of the previous state's are done first), a fixed one as the scalar
// Bk / Ck (0 for a variable one).
template <typename T>
__device__ __forceinline__ void state_bc(const ScanParams& p, const Channel& ch, int k, hk_i64 c0, int len,
                                         float* s_B, float* s_C, float& Bk, float& Ck) {
  if (p.B_var | p.C_var) {
    __syncthreads();
    if (p.B_var) stage_bc<T>(s_B, p.B, ch.Bbase + k * p.sB_n, p.sB_l, p.B_f32, c0, len);
    if (p.C_var) stage_bc<T>(s_C, p.C, ch.Cbase + k * p.sC_n, p.sC_l, p.C_f32, c0, len);
    __syncthreads();
  }
  Bk = p.B_var ? 0.f : load_bc<T>(p.B, ch.Bbase + k * p.sB_n, p.B_f32);
  Ck = p.C_var ? 0.f : load_bc<T>(p.C, ch.Cbase + k * p.sC_n, p.C_f32);
}

template <typename T>
__device__ void fwd(const ScanParams& p) {
  __shared__ float s_u[kSmem], s_dt[kSmem], s_z[kSmem], s_B[kSmem], s_C[kSmem];
  __shared__ Pair s_tot[2][4];
  int phase = 0;
  const Channel ch = channel(p);
  const int n = (int)p.dstate, chunk = blockDim.x * kItems;
  const T* u = static_cast<const T*>(p.u) + ch.b * p.su_b + ch.c * p.su_d;
  const T* delta = static_cast<const T*>(p.delta) + ch.b * p.sdl_b + ch.c * p.sdl_d;
  const T* z = p.z ? static_cast<const T*>(p.z) + ch.b * p.sz_b + ch.c * p.sz_d : nullptr;
  const float* A = static_cast<const float*>(p.A) + ch.c * p.sA_d;
  float* state = static_cast<float*>(p.last) + ch.bd * n;
  T* out = static_cast<T*>(p.out) + ch.bd * p.seqlen;
  for (int k = threadIdx.x; k < n; k += blockDim.x)
    state[k] = p.init ? static_cast<const float*>(p.init)[ch.b * p.si_b + ch.c * p.si_d + k * p.si_n] : 0.f;
  for (hk_i64 c0 = 0; c0 < p.seqlen; c0 += chunk) {
    const int len = (int)(p.seqlen - c0 < chunk ? p.seqlen - c0 : chunk);
    stage(s_u, u, p.su_l, c0, len);
    stage(s_dt, delta, p.sdl_l, c0, len);
    if (z) stage(s_z, z, p.sz_l, c0, len);
    __syncthreads();
    float dt[kItems], du[kItems], y[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int j = threadIdx.x * kItems + i;
      const bool valid = j < len;
      const float uu = valid ? s_u[pad(j)] : 0.f;
      float d = s_dt[pad(j)] + ch.bias;
      d = p.softplus ? softplus(d) : d;
      dt[i] = valid ? d : 0.f;  // a padded step is the identity map: a = 1, b = 0
      du[i] = dt[i] * uu;
      y[i] = ch.Dc * uu;
    }
    for (int k = 0; k < n; ++k) {
      float Bk, Ck;
      state_bc<T>(p, ch, k, c0, len, s_B, s_C, Bk, Ck);
      const float Ak = A[k * p.sA_n];
      float a[kItems], bb[kItems];
      Pair agg = identity();
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int j = threadIdx.x * kItems + i;
        a[i] = expf(dt[i] * Ak);
        bb[i] = du[i] * (p.B_var ? s_B[pad(j)] : Bk);
        agg = then(agg, Pair{a[i], bb[i]});
      }
      const float carried = state[k];  // read before the scan's barrier; thread 0 rewrites it after
      Pair excl, tot;
      block_scan<false>(agg, s_tot, phase, excl, tot);
      float x = apply(excl, carried);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int j = threadIdx.x * kItems + i;
        x = a[i] * x + bb[i];
        y[i] += (p.C_var ? s_C[pad(j)] : Ck) * x;
      }
      if (threadIdx.x == 0) state[k] = apply(tot, carried);
    }
    __syncthreads();  // every thread is past its reads of s_u (n may be 1: no barrier in the loop)
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int j = threadIdx.x * kItems + i;
      float v = y[i];
      if (z) {
        const float zv = s_z[pad(j)];
        v *= zv * sigmoid(zv);
      }
      s_u[pad(j)] = v;
    }
    __syncthreads();
    store(out, s_u, c0, len);
    __syncthreads();
  }
}

template <typename T>
__device__ void bwd(const ScanParams& p) {
  // s_y: the pre-gate output, recomputed for dz; in shared memory (each thread its own steps) rather
  // than registers, which the backward is short of.
  __shared__ float s_u[kSmem], s_dt[kSmem], s_z[kSmem], s_g[kSmem], s_y[kSmem], s_B[kSmem], s_C[kSmem];
  __shared__ Pair s_tot[2][4];
  __shared__ F3 s_sum[2][4];
  int phase = 0, sum_phase = 0;
  const Channel ch = channel(p);
  const int n = (int)p.dstate, chunk = blockDim.x * kItems;
  const T* u = static_cast<const T*>(p.u) + ch.b * p.su_b + ch.c * p.su_d;
  const T* delta = static_cast<const T*>(p.delta) + ch.b * p.sdl_b + ch.c * p.sdl_d;
  const T* z = p.z ? static_cast<const T*>(p.z) + ch.b * p.sz_b + ch.c * p.sz_d : nullptr;
  const T* gout = static_cast<const T*>(p.gout) + ch.b * p.sg_b + ch.c * p.sg_d;
  const float* A = static_cast<const float*>(p.A) + ch.c * p.sA_d;
  float* ckpt = static_cast<float*>(p.ckpt) + ch.bd * p.nchunks * n;  // state before each chunk
  float* q_carry = static_cast<float*>(p.dinit) + ch.bd * n;          // adjoint entering the chunk
  float* dA = static_cast<float*>(p.dA) + ch.bd * n;
  float* dBfix = p.B_var ? nullptr : static_cast<float*>(p.dB) + ch.bd * n;
  float* dCfix = p.C_var ? nullptr : static_cast<float*>(p.dC) + ch.bd * n;
  // Time-varying dB / dC: float32 (b, groups, n, l) dense.
  float* dBvar = p.B_var ? static_cast<float*>(p.dB) + (ch.b * p.B_groups + ch.c / (p.dim / p.B_groups)) * n * p.seqlen
                         : nullptr;
  float* dCvar = p.C_var ? static_cast<float*>(p.dC) + (ch.b * p.C_groups + ch.c / (p.dim / p.C_groups)) * n * p.seqlen
                         : nullptr;
  T* du_out = static_cast<T*>(p.du) + ch.bd * p.seqlen;
  T* ddelta_out = static_cast<T*>(p.ddelta) + ch.bd * p.seqlen;
  T* dz_out = z ? static_cast<T*>(p.dz) + ch.bd * p.seqlen : nullptr;

  for (int k = threadIdx.x; k < n; k += blockDim.x) {
    ckpt[k] = p.init ? static_cast<const float*>(p.init)[ch.b * p.si_b + ch.c * p.si_d + k * p.si_n] : 0.f;
    q_carry[k] = p.glast ? static_cast<const float*>(p.glast)[ch.b * p.sgl_b + ch.c * p.sgl_d + k * p.sgl_n] : 0.f;
    dA[k] = 0.f;
    if (dBfix) dBfix[k] = 0.f;
    if (dCfix) dCfix[k] = 0.f;
  }
  __syncthreads();

  // Sweep 1: the state before every chunk.
  for (hk_i64 cidx = 0; cidx + 1 < p.nchunks; ++cidx) {
    const hk_i64 c0 = cidx * chunk;
    const int len = chunk;  // not the last chunk: full
    stage(s_u, u, p.su_l, c0, len);
    stage(s_dt, delta, p.sdl_l, c0, len);
    __syncthreads();
    float dt[kItems], du[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int j = threadIdx.x * kItems + i;
      float d = s_dt[pad(j)] + ch.bias;
      dt[i] = p.softplus ? softplus(d) : d;
      du[i] = dt[i] * s_u[pad(j)];
    }
    for (int k = 0; k < n; ++k) {
      if (p.B_var) {
        __syncthreads();
        stage_bc<T>(s_B, p.B, ch.Bbase + k * p.sB_n, p.sB_l, p.B_f32, c0, len);
        __syncthreads();
      }
      const float Bk = p.B_var ? 0.f : load_bc<T>(p.B, ch.Bbase + k * p.sB_n, p.B_f32);
      const float Ak = A[k * p.sA_n];
      Pair agg = identity();
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int j = threadIdx.x * kItems + i;
        agg = then(agg, Pair{expf(dt[i] * Ak), du[i] * (p.B_var ? s_B[pad(j)] : Bk)});
      }
      const float carried = ckpt[cidx * n + k];
      Pair excl, tot;
      block_scan<false>(agg, s_tot, phase, excl, tot);
      if (threadIdx.x == 0) ckpt[(cidx + 1) * n + k] = apply(tot, carried);
    }
    __syncthreads();
  }

  // Sweep 2: chunks last to first.
  float dD_acc = 0.f, dbias_acc = 0.f;
  for (hk_i64 cidx = p.nchunks - 1; cidx >= 0; --cidx) {
    const hk_i64 c0 = cidx * chunk;
    const int len = (int)(p.seqlen - c0 < chunk ? p.seqlen - c0 : chunk);
    stage(s_u, u, p.su_l, c0, len);
    stage(s_dt, delta, p.sdl_l, c0, len);
    stage(s_g, gout, p.sg_l, c0, len);
    if (z) stage(s_z, z, p.sz_l, c0, len);
    __syncthreads();
    float dt[kItems], uu[kItems], dy[kItems], gdu[kItems], gdt[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int j = threadIdx.x * kItems + i;
      const bool valid = j < len;
      uu[i] = valid ? s_u[pad(j)] : 0.f;
      const float d = s_dt[pad(j)] + ch.bias;
      dt[i] = valid ? (p.softplus ? softplus(d) : d) : 0.f;
      float g = valid ? s_g[pad(j)] : 0.f;
      if (z) {
        const float zv = s_z[pad(j)];
        g *= zv * sigmoid(zv);
      }
      dy[i] = g;  // dL/dy_t before the gate; 0 on padded steps, which are identity maps
      if (z) s_y[pad(j)] = ch.Dc * uu[i];
      gdu[i] = g * ch.Dc;
      gdt[i] = 0.f;
    }
    for (int k = 0; k < n; ++k) {
      float Bk, Ck;
      state_bc<T>(p, ch, k, c0, len, s_B, s_C, Bk, Ck);
      const float Ak = A[k * p.sA_n];
      float a[kItems], xs[kItems];
      Pair agg = identity(), ragg = identity();
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int j = threadIdx.x * kItems + i;
        a[i] = expf(dt[i] * Ak);
        agg = then(agg, Pair{a[i], dt[i] * uu[i] * (p.B_var ? s_B[pad(j)] : Bk)});
      }
#pragma unroll
      for (int i = kItems - 1; i >= 0; --i) {
        const int j = threadIdx.x * kItems + i;
        ragg = then(ragg, Pair{a[i], a[i] * dy[i] * (p.C_var ? s_C[pad(j)] : Ck)});
      }
      const float x_carried = ckpt[cidx * n + k], q_in = q_carry[k];
      Pair excl, tot, rexcl, rtot;
      block_scan<false>(agg, s_tot, phase, excl, tot);
      block_scan<true>(ragg, s_tot, phase, rexcl, rtot);
      const float x0 = apply(excl, x_carried);
      float x = x0;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int j = threadIdx.x * kItems + i;
        x = a[i] * x + dt[i] * uu[i] * (p.B_var ? s_B[pad(j)] : Bk);
        xs[i] = x;
        if (z) s_y[pad(j)] += (p.C_var ? s_C[pad(j)] : Ck) * x;
      }
      float q = apply(rexcl, q_in);  // adjoint after this thread's last step
      F3 part = {0.f, 0.f, 0.f};     // dA_k, fixed dB_k, fixed dC_k
#pragma unroll
      for (int i = kItems - 1; i >= 0; --i) {
        const int j = threadIdx.x * kItems + i;
        const float Bi = p.B_var ? s_B[pad(j)] : Bk, Ci = p.C_var ? s_C[pad(j)] : Ck;
        const float xp = i > 0 ? xs[i - 1] : x0;
        const float g = q + dy[i] * Ci;  // dL/dx_t
        const float dB_t = g * dt[i] * uu[i], dC_t = dy[i] * xs[i];
        if (j < len) {
          if (p.B_var) atomicAdd(dBvar + k * p.seqlen + c0 + j, dB_t);
          if (p.C_var) atomicAdd(dCvar + k * p.seqlen + c0 + j, dC_t);
        }
        part.y += dB_t;
        part.z += dC_t;
        gdu[i] += g * dt[i] * Bi;
        const float ha = g * xp * a[i];  // dL/d(dt A_k)
        gdt[i] += ha * Ak + g * Bi * uu[i];
        part.x += ha * dt[i];
        q = a[i] * g;
      }
      if (threadIdx.x == 0) q_carry[k] = apply(rtot, q_in);
      const F3 s = block_sum(part, s_sum, sum_phase);
      if (threadIdx.x == 0) {
        dA[k] += s.x;
        if (dBfix) dBfix[k] += s.y;
        if (dCfix) dCfix[k] += s.z;
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int j = threadIdx.x * kItems + i;
      const bool valid = j < len;
      const float pre = s_dt[pad(j)] + ch.bias;
      const float gdt_raw = p.softplus ? gdt[i] * softplus_grad(pre) : gdt[i];
      if (valid) {
        dD_acc += dy[i] * uu[i];
        dbias_acc += gdt_raw;
      }
      if (z) {
        const float zv = s_z[pad(j)], sg = sigmoid(zv);
        s_z[pad(j)] = s_g[pad(j)] * s_y[pad(j)] * sg * (1.f + zv * (1.f - sg));
      }
      s_u[pad(j)] = gdu[i];
      s_dt[pad(j)] = gdt_raw;
    }
    __syncthreads();
    store(du_out, s_u, c0, len);
    store(ddelta_out, s_dt, c0, len);
    if (z) store(dz_out, s_z, c0, len);
    __syncthreads();
  }
  const F3 s = block_sum(F3{dD_acc, dbias_acc, 0.f}, s_sum, sum_phase);
  if (threadIdx.x == 0) {
    static_cast<float*>(p.dD)[ch.bd] = s.x;
    static_cast<float*>(p.dbias)[ch.bd] = s.y;
  }
}

}  // namespace hk_ss

#define HK_SS_ENTRIES(SUFFIX, T)                                                                              \
  extern "C" __global__ void __launch_bounds__(hk_ss::kMaxThreads) hk_selective_scan_fwd_##SUFFIX(ScanParams p) { \
    hk_ss::fwd<T>(p);                                                                                          \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(hk_ss::kMaxThreads, 1) hk_selective_scan_bwd_##SUFFIX(ScanParams p) { \
    hk_ss::bwd<T>(p);                                                                                          \
  }

// HK_SS_DTYPE (0 float32, 1 float16, 2 bfloat16) limits an NVRTC compile to one dtype's entry points.
#if !defined(HK_SS_DTYPE) || HK_SS_DTYPE == 0
HK_SS_ENTRIES(f32, float)
#endif
#if !defined(HK_SS_DTYPE) || HK_SS_DTYPE == 1
HK_SS_ENTRIES(f16, hk_ss::Half)
#endif
#if !defined(HK_SS_DTYPE) || HK_SS_DTYPE == 2
HK_SS_ENTRIES(bf16, hk_ss::BF16)
#endif
