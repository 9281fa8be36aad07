// Approximate KV reuse on the CPU (dLLM-Cache / Fast-dLLM style): refresh_select (per-token cosine
// drift of new vs cached K/V fused with the choice of the k most-changed tokens) and scatter_kv (an
// in-place row write into K/V caches with rotary embedding applied on the way). Conventions (the
// similarity formula, tie order, RoPE layout) are documented in hierkern/ops/kv_reuse/reference.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <vector>

#include "cpu/cpu_math.h"
#include "interval_checks.h"

namespace hierkern::cpu {
namespace {

constexpr float kCosEps = 1e-8f;

// Cosine similarity of one token's (heads, head_dim) slab in new vs cached, float32 accumulation.
template <typename T>
float token_cosine(const T* a, const T* b, int64_t H, int64_t D, const int64_t* sa, const int64_t* sb) {
  float dot = 0.f, na = 0.f, nb = 0.f;
  for (int64_t h = 0; h < H; ++h) {
    const T* ah = a + h * sa[2];
    const T* bh = b + h * sb[2];
    if (sa[3] == 1 && sb[3] == 1) {
#pragma omp simd reduction(+ : dot, na, nb)
      for (int64_t j = 0; j < D; ++j) {
        const float x = to_f(ah[j]), y = to_f(bh[j]);
        dot += x * y;
        na += x * x;
        nb += y * y;
      }
    } else {
      for (int64_t j = 0; j < D; ++j) {
        const float x = to_f(ah[j * sa[3]]), y = to_f(bh[j * sb[3]]);
        dot += x * y;
        na += x * x;
        nb += y * y;
      }
    }
  }
  const float c = dot / std::max(std::sqrt(na) * std::sqrt(nb), kCosEps);
  return std::isnan(c) ? -std::numeric_limits<float>::infinity() : c;
}

template <typename T>
void select_kernel(const at::Tensor& nw, const at::Tensor& cached, int64_t k, at::Tensor& out) {
  const int64_t B = nw.size(0), S = nw.size(1), H = nw.size(2), D = nw.size(3);
  const T* np_ = nw.const_data_ptr<T>();
  const T* cp = cached.const_data_ptr<T>();
  const int64_t* sa = nw.strides().data();
  const int64_t* sb = cached.strides().data();
  int64_t* op = out.mutable_data_ptr<int64_t>();
  const int64_t so0 = out.stride(0), so1 = out.stride(1);
  // One task per batch row: the similarities stay in a task-local buffer (never a tensor) and the
  // selection runs while they are in cache. With fewer rows than threads, the token loop is split.
  const bool split_tokens = B < at::get_num_threads();
  std::vector<float> shared_sim(split_tokens ? S : 0);
  auto select_row = [&](int64_t b, std::vector<float>& sim) {
    if (k == 0) return;
    std::vector<int64_t> idx(S);
    std::iota(idx.begin(), idx.end(), 0);
    // (similarity, index) lexicographic: equal similarities are taken lowest index first.
    auto less = [&](int64_t x, int64_t y) { return sim[x] < sim[y] || (sim[x] == sim[y] && x < y); };
    if (k < S) std::nth_element(idx.begin(), idx.begin() + (k - 1), idx.end(), less);
    std::sort(idx.begin(), idx.begin() + k);
    for (int64_t i = 0; i < k; ++i) op[b * so0 + i * so1] = idx[i];
  };
  if (split_tokens) {
    for (int64_t b = 0; b < B; ++b) {
      at::parallel_for(0, S, 64, [&](int64_t s0, int64_t s1) {
        for (int64_t s = s0; s < s1; ++s)
          shared_sim[s] = token_cosine(np_ + b * sa[0] + s * sa[1], cp + b * sb[0] + s * sb[1], H, D, sa, sb);
      });
      select_row(b, shared_sim);
    }
    return;
  }
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> sim(S);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t s = 0; s < S; ++s)
        sim[s] = token_cosine(np_ + b * sa[0] + s * sa[1], cp + b * sb[0] + s * sb[1], H, D, sa, sb);
      select_row(b, sim);
    }
  });
}

at::Tensor refresh_select_cpu(const at::Tensor& nw, const at::Tensor& cached, int64_t k) {
  TORCH_CHECK(nw.dim() == 4 && cached.dim() == 4,
              "hierkern::refresh_select: new and cached must be 4-D (batch, seq, heads, head_dim)");
  TORCH_CHECK(nw.sizes() == cached.sizes(), "hierkern::refresh_select: new and cached must have the same shape");
  TORCH_CHECK(nw.scalar_type() == cached.scalar_type(), "hierkern::refresh_select: new and cached must share a dtype");
  TORCH_CHECK(nw.device().is_cpu() && cached.device().is_cpu(),
              "hierkern::refresh_select (cpu): new and cached must be CPU tensors");
  TORCH_CHECK(k >= 0 && k <= nw.size(1), "hierkern::refresh_select: k must be in [0, seq = ", nw.size(1), "], got ", k);
  at::Tensor out = at::empty({nw.size(0), k}, nw.options().dtype(at::kLong));
  by_dtype(nw.scalar_type(), "hierkern::refresh_select (cpu)", [&](auto tag) {
    select_kernel<decltype(tag)>(nw, cached, k, out);
  });
  return out;
}

template <typename T, typename TR>
void scatter_kernel(at::Tensor& kc, at::Tensor& vc, const at::Tensor& index, const at::Tensor& k,
                    const at::Tensor& v, const TR* cosp, const TR* sinp, int64_t cs0, int64_t cs1,
                    int64_t ss0, int64_t ss1) {
  const int64_t B = k.size(0), n = k.size(1), H = k.size(2), D = k.size(3), half = D / 2;
  T* kcp = kc.mutable_data_ptr<T>();
  T* vcp = vc.mutable_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const int64_t* ip = index.const_data_ptr<int64_t>();
  const auto kcs = kc.strides(), vcs = vc.strides(), ks = k.strides(), vs = v.strides(), is = index.strides();
  at::parallel_for(0, B * n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / n, i = r % n;
      const int64_t p = ip[b * is[0] + i * is[1]];
      for (int64_t h = 0; h < H; ++h) {
        const T* ksrc = kp + b * ks[0] + i * ks[1] + h * ks[2];
        const T* vsrc = vp + b * vs[0] + i * vs[1] + h * vs[2];
        T* kdst = kcp + b * kcs[0] + p * kcs[1] + h * kcs[2];
        T* vdst = vcp + b * vcs[0] + p * vcs[1] + h * vcs[2];
        for (int64_t j = 0; j < D; ++j) vdst[j * vcs[3]] = vsrc[j * vs[3]];
        if (cosp == nullptr) {
          for (int64_t j = 0; j < D; ++j) kdst[j * kcs[3]] = ksrc[j * ks[3]];
          continue;
        }
        const TR* c = cosp + p * cs0;
        const TR* s = sinp + p * ss0;
        for (int64_t j = 0; j < half; ++j) {
          const float x1 = to_f(ksrc[j * ks[3]]), x2 = to_f(ksrc[(j + half) * ks[3]]);
          const float cj = to_f(c[j * cs1]), sj = to_f(s[j * ss1]);
          kdst[j * kcs[3]] = static_cast<T>(x1 * cj - x2 * sj);
          kdst[(j + half) * kcs[3]] = static_cast<T>(x2 * cj + x1 * sj);
        }
      }
    }
  });
}

void scatter_kv_cpu(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& index, const at::Tensor& k,
                    const at::Tensor& v, const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "hierkern::scatter_kv: k_cache, v_cache, k, v must be 4-D (batch, seq, kv_heads, head_dim)");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "hierkern::scatter_kv: k_cache and v_cache must have the same shape");
  TORCH_CHECK(k.sizes() == v.sizes(), "hierkern::scatter_kv: k and v must have the same shape");
  TORCH_CHECK(index.dim() == 2 && index.scalar_type() == at::kLong && index.size(0) == k.size(0) &&
                  index.size(1) == k.size(1),
              "hierkern::scatter_kv: index must be int64 (batch, n) matching k's first two dims");
  TORCH_CHECK(k.size(0) == k_cache.size(0) && k.size(2) == k_cache.size(2) && k.size(3) == k_cache.size(3),
              "hierkern::scatter_kv: k must be (batch, n, kv_heads, head_dim) of the cache");
  const auto dt = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == dt && k.scalar_type() == dt && v.scalar_type() == dt,
              "hierkern::scatter_kv: k_cache, v_cache, k, v must share a dtype");
  TORCH_CHECK(k_cache.device().is_cpu() && v_cache.device().is_cpu() && index.device().is_cpu() &&
                  k.device().is_cpu() && v.device().is_cpu(),
              "hierkern::scatter_kv (cpu): every tensor must be on the CPU");
  TORCH_CHECK(cos.has_value() == sin.has_value(), "hierkern::scatter_kv: pass both cos and sin, or neither");
  const int64_t B = k.size(0), n = k.size(1), max_len = k_cache.size(1), D = k.size(3);
  if (cos.has_value()) {
    TORCH_CHECK(D % 2 == 0, "hierkern::scatter_kv: rotary embedding needs an even head_dim, got ", D);
    for (const auto* t : {&*cos, &*sin})
      TORCH_CHECK(t->dim() == 2 && t->size(0) == max_len && t->size(1) == D / 2 && t->device().is_cpu() &&
                      (t->scalar_type() == at::kFloat || t->scalar_type() == dt) &&
                      t->scalar_type() == cos->scalar_type(),
                  "hierkern::scatter_kv: cos and sin must be (max_len, head_dim // 2) = (", max_len, ", ", D / 2,
                  ") CPU tensors, float32 or the cache dtype, one dtype");
  }
  // Every index is checked before anything is written: a rejected call leaves the caches untouched.
  const int64_t* ip = index.const_data_ptr<int64_t>();
  std::vector<uint8_t> seen(max_len);
  for (int64_t b = 0; b < B; ++b) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = ip[b * index.stride(0) + i * index.stride(1)];
      TORCH_CHECK(p >= 0 && p < max_len, "hierkern::scatter_kv: index[", b, ", ", i, "] = ", p,
                  " is out of range [0, max_len = ", max_len, ")");
      TORCH_CHECK(!seen[p], "hierkern::scatter_kv: index row ", b, " holds slot ", p,
                  " more than once (duplicated indices are an error: the write order would decide the result)");
      seen[p] = 1;
    }
  }
  by_dtype(dt, "hierkern::scatter_kv (cpu)", [&](auto tag) {
    using T = decltype(tag);
    if (!cos.has_value()) {
      scatter_kernel<T, float>(k_cache, v_cache, index, k, v, nullptr, nullptr, 0, 0, 0, 0);
    } else if (cos->scalar_type() == at::kFloat) {
      scatter_kernel<T, float>(k_cache, v_cache, index, k, v, cos->const_data_ptr<float>(),
                               sin->const_data_ptr<float>(), cos->stride(0), cos->stride(1), sin->stride(0),
                               sin->stride(1));
    } else {
      scatter_kernel<T, T>(k_cache, v_cache, index, k, v, cos->const_data_ptr<T>(), sin->const_data_ptr<T>(),
                           cos->stride(0), cos->stride(1), sin->stride(0), sin->stride(1));
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(hierkern, CPU, m) {
  m.impl("refresh_select", &refresh_select_cpu);
  m.impl("scatter_kv", &scatter_kv_cpu);
}

}  // namespace hierkern::cpu
