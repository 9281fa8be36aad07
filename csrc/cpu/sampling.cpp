// Top-k / top-p token sampling on the CPU, for the generation loops (hierkern/models/_sampling.py has
// the rule and the PyTorch version the other devices run). One row of logits per step of a task:
//   1. the k-th largest logit by a radix select on the float bits (O(V), no sort; ties with it all
//      survive);
//   2. the candidates in vocabulary order and their softmax numerators (vectorised exp);
//   3. top-p: tokens leave from the least likely up (value ascending, ties highest id first) while
//      the mass they take with them stays <= 1 - top_p; a heap orders only the ones that leave;
//   4. an inverse-CDF draw with the caller's uniform u, accumulated in vocabulary order (so two
//      candidates whose logits differ by rounding between runs do not reorder the draw).
// The torch version sorts the k candidates twice and runs ~20 ops per chunk of rows; here a row
// costs one copy, one selection and one pass over the candidates. With classifier-free guidance the
// guided row is formed here from the conditional and null rows (the copy), not as a (B, n, V) tensor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/cpu_math.h"

namespace hierkern::cpu {
namespace {

struct Scratch {
  std::vector<float> e, guided;
  std::vector<uint32_t> keys;
  std::vector<int64_t> id;
  std::vector<uint64_t> heap;
};

// float <-> uint32 keys whose unsigned order is the floats' order (NaN excluded by the caller).
inline uint32_t order_key(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

inline float key_float(uint32_t k) {
  const uint32_t b = (k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k;
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

// The k-th largest of keys[0, n) (1 <= k <= n) by most-significant-byte radix select: a histogram
// per byte keeps only the bucket that holds it, in place. Two or three short passes over a 4096-entry
// row instead of nth_element's partitioning (~3x faster here).
uint32_t kth_largest(uint32_t* keys, int64_t n, int64_t k) {
  for (int shift = 24; shift >= 0 && n > 1; shift -= 8) {
    int64_t hist[256] = {0};
    for (int64_t i = 0; i < n; ++i) ++hist[(keys[i] >> shift) & 255u];
    uint32_t b = 255;
    while (hist[b] < k) k -= hist[b--];
    int64_t m = 0;
    for (int64_t i = 0; i < n; ++i) {  // branch-free: the bucket can hold any share of the row
      keys[m] = keys[i];
      m += ((keys[i] >> shift) & 255u) == b;
    }
    n = m;
  }
  return keys[0];  // every key left agrees on all four bytes (or one is left)
}

// g[i] = (1 + r) * c[i] - r * n[i] with the float32 roundings of PyTorch's
// `(1 + ratio) * cond - ratio * uncond` (two products, then the difference): no FMA contraction.
__attribute__((optimize("fp-contract=off"))) void guide_row(const float* c, int64_t sc, const float* n,
                                                             int64_t sn, int64_t V, double ratio, float* g) {
  const float a = static_cast<float>(1.0 + ratio), b = static_cast<float>(ratio);
  for (int64_t i = 0; i < V; ++i) g[i] = a * c[i * sc] - b * n[i * sn];
}

// (vocabulary id, probability) of the token drawn from row x (V logits at stride sx).
std::pair<int64_t, float> sample_row(const float* x, int64_t sx, int64_t V, int64_t top_k, double top_p,
                                     float u, int64_t row, Scratch& s) {
  const bool use_k = top_k > 0 && top_k < V;
  float kth = -std::numeric_limits<float>::infinity();
  bool nan = false;
  for (int64_t i = 0; i < V; ++i) nan |= std::isnan(x[i * sx]);
  TORCH_CHECK(!nan, "hierkern::sample_top_k_top_p: logits row ", row, " contains NaN");
  if (use_k) {
    s.keys.resize(V);
    for (int64_t i = 0; i < V; ++i) s.keys[i] = order_key(x[i * sx]);
    kth = key_float(kth_largest(s.keys.data(), V, top_k));
  }
  // candidates (>= the k-th largest) in vocabulary order, compacted without a branch (a quarter of a
  // row passing is the worst case for prediction); their logits go to e, then exp in place
  s.e.resize(V);
  s.id.resize(V);
  int64_t n = 0;
  for (int64_t i = 0; i < V; ++i) {
    const float v = x[i * sx];
    s.e[n] = v;
    s.id[n] = i;
    n += (!use_k || v >= kth);
  }
  const float mx = row_max(s.e.data(), n);
  TORCH_CHECK(std::isfinite(mx), "hierkern::sample_top_k_top_p: logits row ", row,
              " has no finite maximum (every logit -inf, or a +inf)");
  // top-p orders candidates by logit: keep the logits' keys before e turns into the exps
  const bool use_p = top_p > 0.0 && top_p < 1.0 && n > 1;
  if (use_p) {
    s.heap.resize(n);
    for (int64_t j = 0; j < n; ++j) {
      // leaving order: smaller logit first; equal logits: higher id (= higher j) first, because the
      // top-down order lists ties lowest id first
      s.heap[j] = (static_cast<uint64_t>(order_key(s.e[j])) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(j));
    }
  }
  double total = exp_sub_sum(s.e.data(), n, mx);

  if (use_p) {
    // a min-heap of the leaving keys: only the tokens that leave (a few percent) get ordered
    std::make_heap(s.heap.begin(), s.heap.begin() + n, std::greater<uint64_t>());
    const double limit = (1.0 - top_p) * total;
    double tail = 0.0;
    auto end = s.heap.begin() + n;
    for (int64_t left = n; left > 1; --left) {  // the most likely token always stays
      const int64_t j = 0xFFFFFFFFu - static_cast<uint32_t>(s.heap.front());
      if (tail + s.e[j] > limit) break;
      tail += s.e[j];
      s.e[j] = 0.f;
      std::pop_heap(s.heap.begin(), end, std::greater<uint64_t>());
      --end;
    }
    total = 0.0;
    for (int64_t j = 0; j < n; ++j) total += s.e[j];
  }

  const double target = static_cast<double>(u) * total;
  double cdf = 0.0;
  int64_t pick = -1, last = -1;
  for (int64_t j = 0; j < n; ++j) {
    if (s.e[j] <= 0.f) continue;  // a zero-probability token is never drawn
    cdf += s.e[j];
    last = j;
    if (cdf > target) {
      pick = j;
      break;
    }
  }
  if (pick < 0) pick = last;  // rounding put u * total on the total
  return {s.id[pick], static_cast<float>(s.e[pick] / total)};
}

std::tuple<at::Tensor, at::Tensor> sample_top_k_top_p_cpu(const at::Tensor& logits, const at::Tensor& u,
                                                          int64_t top_k, double top_p,
                                                          const std::optional<at::Tensor>& uncond,
                                                          double cfg_ratio) {
  const char* name = "hierkern::sample_top_k_top_p";
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) >= 1, name, ": logits must be 2-D (rows, vocab) with vocab >= 1, got ",
              logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat, name, ": logits must be float32, got ", logits.scalar_type());
  TORCH_CHECK(u.dim() == 1 && u.size(0) == logits.size(0) && u.scalar_type() == at::kFloat, name,
              ": u must be float32 (rows,) = (", logits.size(0), ",), got ", u.scalar_type(), " ", u.sizes());
  TORCH_CHECK(logits.device().is_cpu() && u.device().is_cpu(), name, " (cpu): logits and u must be CPU tensors");
  TORCH_CHECK(top_k >= 0, name, ": top_k must be >= 0 (0 disables it), got ", top_k);
  TORCH_CHECK(top_p >= 0.0 && top_p <= 1.0, name, ": top_p must be in [0, 1] (0 or 1 disables it), got ", top_p);
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V < std::numeric_limits<int32_t>::max(), name, ": vocab must be < 2^31, got ", V);
  const bool guided = uncond.has_value() && uncond->defined();
  if (guided) {
    TORCH_CHECK(uncond->sizes() == logits.sizes() && uncond->scalar_type() == at::kFloat && uncond->device().is_cpu(),
                name, " (cpu): uncond must be a float32 CPU tensor of logits' shape ", logits.sizes(), ", got ",
                uncond->scalar_type(), " ", uncond->sizes(), " on ", uncond->device());
    TORCH_CHECK(std::isfinite(cfg_ratio), name, ": cfg_ratio must be finite, got ", cfg_ratio);
  }
  const float* np = guided ? uncond->const_data_ptr<float>() : nullptr;
  const int64_t n0 = guided ? uncond->stride(0) : 0, n1 = guided ? uncond->stride(1) : 0;
  auto ids = at::empty({R}, logits.options().dtype(at::kLong));
  auto conf = at::empty({R}, logits.options());
  const float* lp = logits.const_data_ptr<float>();
  const float* up = u.const_data_ptr<float>();
  int64_t* ip = ids.mutable_data_ptr<int64_t>();
  float* cp = conf.mutable_data_ptr<float>();
  const int64_t s0 = logits.stride(0), s1 = logits.stride(1), su = u.stride(0);
  // a row is ~V + k log k operations: 4 rows per task keep a small batch on one thread
  at::parallel_for(0, R, 4, [&](int64_t begin, int64_t end) {
    Scratch s;
    for (int64_t r = begin; r < end; ++r) {
      const float* row = lp + r * s0;
      int64_t stride = s1;
      if (guided) {  // the guided row, built once in the scratch instead of two full-tensor passes
        s.guided.resize(V);
        guide_row(row, s1, np + r * n0, n1, V, cfg_ratio, s.guided.data());
        row = s.guided.data();
        stride = 1;
      }
      std::tie(ip[r], cp[r]) = sample_row(row, stride, V, top_k, top_p, up[r * su], r, s);
    }
  });
  return {ids, conf};
}

}  // namespace

TORCH_LIBRARY_IMPL(hierkern, CPU, m) { m.impl("sample_top_k_top_p", &sample_top_k_top_p_cpu); }

}  // namespace hierkern::cpu
