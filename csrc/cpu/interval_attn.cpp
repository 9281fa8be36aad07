// Interval attention on the CPU: flash-style tiles with an online softmax. Each query tile derives
// its rows' key ranges from the segment offsets (csrc/interval.h), visits only the key tiles that
// some row sees, and masks only the tiles that are partly visible. Forward parallel over
// (batch, head, q-tile); backward over (batch, kv-head) so GQA dK/dV need no atomics.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "cpu/attn_pack.h"
#include "cpu/cpu_math.h"
#include "cpu/output_cache.h"
#include "interval.h"
#include "interval_checks.h"

namespace hierkern::cpu {
namespace {

// Tile sizes; HIERKERN_CPU_BLOCK_Q / HIERKERN_CPU_BLOCK_K override them (read once) for tuning.
int64_t env_block(const char* name, int64_t dflt) {
  const char* s = std::getenv(name);
  const int64_t v = s ? std::atoll(s) : 0;
  return v > 0 ? v : dflt;
}
const int64_t kBlockQ = env_block("HIERKERN_CPU_BLOCK_Q", 128);
const int64_t kBlockK = env_block("HIERKERN_CPU_BLOCK_K", 512);
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Row stride of the score tiles: block_k plus one cache line. At block_k = 512 a 2 KiB row stride maps
// every row of a column walk (P^T dO, dS^T Q: six floats of each of 128 rows) to the same 2 of the
// L1's 64 sets, so each pass refetched them from L2; perf put those GEMMs 28% slower per flop than
// the others.
int64_t score_stride(int64_t block_k) { return block_k + 16; }
// Skip-causal blocks up to this size take the forward's small-block pass (block_size 1-16, where a
// 128-row tile would spend at least 7/8 of its block-diagonal work on masked keys).
constexpr int64_t kSmallBlock = 16;

// Forward schedule: per (batch, kv head) pair when there are at least two pairs per thread, else
// per query tile. HIERKERN_CPU_FWD_SCHEDULE=pairs|tiles forces one (tests run both).
const std::string kFwdSchedule = [] {
  const char* s = std::getenv("HIERKERN_CPU_FWD_SCHEDULE");
  return std::string(s ? s : "auto");
}();

bool use_per_kv_head_schedule(int64_t pairs) {
  if (kFwdSchedule == "pairs") return true;
  if (kFwdSchedule == "tiles") return false;
  return pairs >= 2 * at::get_num_threads();
}

enum class TileKind { kEmpty, kFull, kPartial };

// Per-row key ranges of one query tile, and classification of key tiles against them.
struct RowRanges {
  std::vector<KeyRanges> rows;
  // Key spans to visit, panel-aligned at the start, disjoint and ascending: the hull of all rows'
  // first ranges and the hull of their second ranges (merged when they touch). Visiting the two hulls
  // separately skips the gap between a noisy row's own block and the clean prefix (skip-causal)
  // instead of walking it tile by tile; segment patterns have one range and one span, as before.
  std::pair<int64_t, int64_t> spans[2];
  int64_t nspans = 0;

  // Start of each row's own block when build() split it off (split_own), else -1.
  std::vector<int64_t> own;

  // split_own: a noisy row's own block (the block-diagonal term of the skip-causal patterns) is left
  // out of `rows` and the spans and recorded in `own`, for the small-block pass of the forward.
  void build(const int32_t* offsets, int64_t nseg, int64_t pattern, int64_t block_size, int64_t r0,
             int64_t r1, bool split_own = false) {
    rows.resize(r1 - r0);
    own.assign(r1 - r0, -1);
    constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
    int64_t lo[2] = {kMax, kMax}, hi[2] = {0, 0};
    for (int64_t r = r0; r < r1; ++r) {
      KeyRanges kr = row_key_ranges(offsets, nseg, pattern, block_size, r);
      if (split_own && is_noisy_row(offsets, nseg, pattern, r)) {
        // A noisy row's own block is the range holding the row itself (its clean range never does).
        if (kr.lo0 <= r && r < kr.hi0) {
          own[r - r0] = kr.lo0;
          kr.lo0 = kr.lo1, kr.hi0 = kr.hi1;
        } else {
          own[r - r0] = kr.lo1;
        }
        kr.lo1 = kr.hi1 = 0;
      }
      rows[r - r0] = kr;
      if (kr.hi0 > kr.lo0) { lo[0] = std::min(lo[0], kr.lo0); hi[0] = std::max(hi[0], kr.hi0); }
      if (kr.hi1 > kr.lo1) { lo[1] = std::min(lo[1], kr.lo1); hi[1] = std::max(hi[1], kr.hi1); }
    }
    nspans = 0;
    for (int t = 0; t < 2; ++t)
      if (hi[t] > 0) spans[nspans++] = {lo[t] / kPanel * kPanel, hi[t]};
    if (nspans == 2) {
      if (spans[1].first < spans[0].first) std::swap(spans[0], spans[1]);
      if (spans[1].first < spans[0].second) {  // overlapping after alignment: one span
        spans[0].second = std::max(spans[0].second, spans[1].second);
        nspans = 1;
      }
    }
  }

  // Calls f(c0, c1, kind) for every key tile (at most block_k keys, starting on a panel boundary)
  // that some row of the tile sees.
  template <typename F>
  void for_each_key_tile(int64_t block_k, F&& f) const {
    for (int64_t sp = 0; sp < nspans; ++sp)
      for (int64_t c0 = spans[sp].first; c0 < spans[sp].second; c0 += block_k) {
        const int64_t c1 = std::min(spans[sp].second, c0 + block_k);
        const TileKind kind = classify(c0, c1);
        if (kind != TileKind::kEmpty) f(c0, c1, kind);
      }
  }

  static int64_t overlap(int64_t lo, int64_t hi, int64_t c0, int64_t c1) {
    return std::max<int64_t>(0, std::min(hi, c1) - std::max(lo, c0));
  }

  TileKind classify(int64_t c0, int64_t c1) const {
    bool any = false, all = true;
    for (const KeyRanges& kr : rows) {
      const int64_t seen = overlap(kr.lo0, kr.hi0, c0, c1) + overlap(kr.lo1, kr.hi1, c0, c1);
      any |= seen > 0;
      all &= seen == c1 - c0;
    }
    return !any ? TileKind::kEmpty : (all ? TileKind::kFull : TileKind::kPartial);
  }

  // Sets s[i, j] = -inf where row r0 + i does not see key c0 + j: fills the gaps around each row's
  // (at most two) ranges rather than testing every element.
  void mask(float* s, int64_t ld, int64_t c0, int64_t c1) const {
    for (size_t i = 0; i < rows.size(); ++i) {
      KeyRanges kr = rows[i];
      if (kr.hi1 > kr.lo1 && (kr.hi0 <= kr.lo0 || kr.lo1 < kr.lo0)) {
        std::swap(kr.lo0, kr.lo1);
        std::swap(kr.hi0, kr.hi1);
      }
      float* si = s + i * ld - c0;
      int64_t cur = c0;
      for (const auto& [lo, hi] : {std::pair{kr.lo0, kr.hi0}, std::pair{kr.lo1, kr.hi1}}) {
        if (hi <= lo) continue;
        for (int64_t j = cur; j < std::min(lo, c1); ++j) si[j] = kNegInf;
        cur = std::max(cur, hi);
      }
      for (int64_t j = cur; j < c1; ++j) si[j] = kNegInf;
    }
  }
};

// Scale-aligned query tiles (the same rule as hierkern/ops/attention/tiling.py): consecutive small
// segments share a tile, big ones are split into full tiles. Rows of a tile inside one segment share
// their key ranges, so its key tiles need no mask and no key is computed only to be masked away.
std::vector<std::pair<int64_t, int64_t>> query_blocks(const int32_t* off, int64_t nseg, int64_t bq) {
  std::vector<std::pair<int64_t, int64_t>> tiles;
  int64_t cur0 = 0, cur1 = 0;
  for (int64_t i = 0; i < nseg; ++i) {
    const int64_t s0 = off[i], s1 = off[i + 1], n = s1 - s0;
    if (n <= bq && cur1 - cur0 + n <= bq) {
      cur1 = s1;
      continue;
    }
    if (cur1 > cur0) tiles.emplace_back(cur0, cur1);
    if (n <= bq) {
      cur0 = s0;
      cur1 = s1;
      continue;
    }
    const int64_t rem = n % bq;
    for (int64_t t = s0; t + bq <= s1; t += bq) tiles.emplace_back(t, t + bq);
    cur0 = s1 - rem;
    cur1 = s1;
  }
  if (cur1 > cur0) tiles.emplace_back(cur0, cur1);
  return tiles;
}

// Query-tile boundaries: the segment offsets, plus each document's noisy/clean midpoint for the
// skip-causal patterns, so that no query tile mixes noisy rows (own block + clean prefix) with clean
// rows (clean prefix only) of a document that fills tiles of its own.
std::vector<int32_t> tile_bounds(const int32_t* off, int64_t nseg, int64_t pattern) {
  std::vector<int32_t> b(off, off + nseg + 1);
  if (!is_skip_pattern(pattern)) return b;
  b.clear();
  for (int64_t i = 0; i < nseg; ++i) {
    b.push_back(off[i]);
    b.push_back(off[i] + (off[i + 1] - off[i]) / 2);
  }
  b.push_back(off[nseg]);
  return b;
}

std::vector<std::pair<int64_t, int64_t>> query_tiles(const int32_t* off, int64_t nseg, int64_t pattern,
                                                     int64_t bq) {
  const std::vector<int32_t> b = tile_bounds(off, nseg, pattern);
  return query_blocks(b.data(), (int64_t)b.size() - 1, bq);
}

struct Dims {
  int64_t B, L, H, D, Lk, Hk, Dv, group;
};

Dims dims_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  Dims d{q.size(0), q.size(1), q.size(2), q.size(3), k.size(1), k.size(2), v.size(3), 0};
  d.group = d.H / d.Hk;
  return d;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& offsets, int64_t pattern, int64_t block_size) {
  check_interval_inputs(q, k, v, offsets, pattern, c10::DeviceType::CPU, "cpu");
  const int32_t* off = offsets.data_ptr<int32_t>();
  const int64_t nseg = offsets.numel() - 1;
  TORCH_CHECK(off[0] == 0 && off[nseg] == q.size(1) && off[nseg] == k.size(1),
              "hierkern::interval_attn: offsets must start at 0 and end at the sequence length");
  for (int64_t i = 0; i < nseg; ++i)
    TORCH_CHECK(off[i] < off[i + 1], "hierkern::interval_attn: offsets must be strictly increasing, got offsets[",
                i, "] = ", off[i], " >= offsets[", i + 1, "] = ", off[i + 1]);
  if (!is_block_pattern(pattern)) return;
  // The block patterns' ranges are only well formed for these block sizes (interval.h).
  TORCH_CHECK(block_size >= 1, "hierkern::interval_attn: block_size must be >= 1 for pattern ", pattern,
              ", got ", block_size);
  if (!is_skip_pattern(pattern)) return;
  for (int64_t i = 0; i < nseg; ++i) {
    const int64_t n = off[i + 1] - off[i];
    TORCH_CHECK(n % 2 == 0 && (n / 2) % block_size == 0, "hierkern::interval_attn: skip-causal document ",
                i, " has length ", n, "; it must be 2N with N a multiple of block_size = ", block_size);
  }
}

template <typename T>
void fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& offsets, int64_t pattern, int64_t block_size, double scale_d,
                const float* temp,
                int64_t temp_stride, at::Tensor& out, at::Tensor& lse) {
  const Dims d = dims_of(q, k, v);
  const float scale = (float)scale_d;
  const int32_t* off = offsets.data_ptr<int32_t>();
  const int64_t nseg = offsets.numel() - 1;
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  float* lp = lse.mutable_data_ptr<float>();
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides(), os = out.strides();
  const auto qblocks = query_tiles(off, nseg, pattern, kBlockQ);
  const int64_t n_qt = (int64_t)qblocks.size();
  const int64_t block_k = (kBlockK + kPanel - 1) / kPanel * kPanel, lds = score_stride(block_k);
  // Small skip-causal blocks: a noisy tile's block-diagonal term would cost a full tile of keys for
  // block_size useful ones per row; the forward computes it block by block instead (see query_tile).
  const bool small_blocks = is_skip_pattern(pattern) && block_size <= kSmallBlock;

  // K^T and V of a (batch, kv head) pair are packed once in float panels (O(L * D) per pair) instead
  // of once per query tile; that also converts bf16 inputs a single time.
  // The diagonal pattern, where every row sees its own segment only, packs each segment from a fresh
  // panel (seg_panel[s]; the last panel's spare columns zero): a segment's key tiles then start at its
  // first key, not at the panel boundary below it, so no score left of the segment is computed and
  // masked (L=680: 256 keys in 16 panels instead of 17, 169 in 11 instead of 12). S = Q K^T is the
  // same arithmetic per (query, key) whichever column a key lands in, so the backward, which packs
  // unpadded, recomputes bit-identical scores.
  const bool seg_aligned = pattern == kSegmentDiagonal;
  std::vector<int64_t> seg_panel(nseg + 1, 0);
  for (int64_t s = 0; s < nseg; ++s)
    seg_panel[s + 1] = seg_panel[s] + (seg_aligned ? (off[s + 1] - off[s] + kPanel - 1) / kPanel : 0);
  const int64_t k_panels = seg_aligned ? seg_panel[nseg] : (d.Lk + kPanel - 1) / kPanel;
  const int64_t v_rows = seg_aligned ? k_panels * kPanel : d.Lk, v_panels = (d.Dv + kPanel - 1) / kPanel;
  const int64_t kpack_size = k_panels * d.D * kPanel, vpack_size = v_panels * v_rows * kPanel;
  const int64_t ldacc = v_panels * kPanel;
  auto pack = [&](int64_t b, int64_t hk, float* kdst, float* vdst) {
    const T* kb = kp + b * ks[0] + hk * ks[2];
    const T* vb = vp + b * vs[0] + hk * vs[2];
    if (!seg_aligned) {
      pack_kt_panels(kb, d.Lk, d.D, ks[1], ks[3], kdst, temp != nullptr);
      pack_v_panels(vb, d.Lk, d.Dv, vs[1], vs[3], vdst);
      return;
    }
    for (int64_t s = 0; s < nseg; ++s) {
      const int64_t n = off[s + 1] - off[s], c = seg_panel[s] * kPanel;
      pack_kt_panels(kb + off[s] * ks[1], n, d.D, ks[1], ks[3], kdst + c * d.D, temp != nullptr);
      pack_v_panels(vb + off[s] * vs[1], n, d.Dv, vs[1], vs[3], vdst + c * kPanel, v_rows);
    }
  };

  struct Scratch {
    std::vector<float> qbuf, s, acc, m, l;
    RowRanges rr;
  };
  auto make_scratch = [&] {
    return Scratch{std::vector<float>(kBlockQ * d.D), std::vector<float>(kBlockQ * lds),
                   std::vector<float>(kBlockQ * ldacc), std::vector<float>(kBlockQ),
                   std::vector<float>(kBlockQ), RowRanges{}};
  };
  // One query tile of head h against the packed K/V of its kv head.
  auto query_tile = [&](Scratch& w, int64_t b, int64_t h, int64_t qt, const float* kpanels,
                        const float* vpanels) {
    float* const sp = w.s.data();
    float* const acc = w.acc.data();
    const int64_t r0 = qblocks[qt].first, r1 = qblocks[qt].second, nr = r1 - r0;
    RowRanges& rr = w.rr;
    rr.build(off, nseg, pattern, block_size, r0, r1, small_blocks);
    int64_t ldq;
    const float* qt_ptr = load_tile(qp + b * qs[0] + r0 * qs[1] + h * qs[2], nr, d.D, qs[1], qs[3],
                                    w.qbuf.data(), &ldq, false, /*copy=*/temp != nullptr);
    if (temp) normalize_rows(w.qbuf.data(), nr, d.D, ldq, temperature_multiplier(temp[h * temp_stride]));
    std::fill(acc, acc + nr * ldacc, 0.f);
    std::fill(w.m.begin(), w.m.end(), kNegInf);
    std::fill(w.l.begin(), w.l.end(), 0.f);
    float* const m = w.m.data();
    float* const l = w.l.data();
    // Online-softmax update of tile rows [i0, i1) with their scores s (row stride lds) for keys
    // [c0, c0 + nc), then acc += P V.
    auto absorb = [&](int64_t i0, int64_t i1, float* s, int64_t c0, int64_t nc) {
      for (int64_t i = i0; i < i1; ++i) {
        float* si = s + (i - i0) * lds;
        const float m_new = std::max(m[i], row_max(si, nc));
        if (m_new == kNegInf) {  // row sees nothing yet: keep P = 0
          std::fill(si, si + nc, 0.f);
          continue;
        }
        const float sum = exp_sub_sum(si, nc, m_new);
        const float alpha = fast_exp(m[i] - m_new);
        float* ai = acc + i * ldacc;
        if (alpha != 1.f)
          for (int64_t j = 0; j < d.Dv; ++j) ai[j] *= alpha;
        l[i] = l[i] * alpha + sum;
        m[i] = m_new;
      }
      gemm_panels(i1 - i0, v_panels, nc, 1.f, s, lds, vpanels + c0 * kPanel, v_rows * kPanel,
                  acc + i0 * ldacc, ldacc, /*accumulate=*/true);
    };
    // Tile rows [i0, i1), which all see exactly keys [lo, hi), against those keys' panels alone
    // (lo, hi: positions in the packed keys).
    auto attend_run = [&](int64_t i0, int64_t i1, int64_t lo, int64_t hi) {
      for (int64_t c0 = lo / kPanel * kPanel; c0 < hi; c0 += block_k) {
        const int64_t nc = std::min(hi, c0 + block_k) - c0;
        gemm_panels(i1 - i0, (nc + kPanel - 1) / kPanel, d.D, scale, qt_ptr + i0 * ldq, ldq,
                    kpanels + c0 * d.D, d.D * kPanel, sp, lds, /*accumulate=*/false);
        if (c0 < lo)
          for (int64_t i = 0; i < i1 - i0; ++i) std::fill(sp + i * lds, sp + i * lds + (lo - c0), kNegInf);
        absorb(i0, i1, sp, c0, nc);
      }
    };
    // Diagonal: each segment's rows attend its own keys, packed from a fresh panel (seg_aligned). A
    // tile holding several whole segments (VAR's first scales share one) thus runs segment by
    // segment instead of every row against the hull of all of them (the L=680 first tile: 91 x 96
    // scores for 2,275 visible ones; 3,008 this way).
    if (seg_aligned) {
      for (int64_t i0 = 0, i1; i0 < nr; i0 = i1) {
        for (i1 = i0 + 1; i1 < nr && rr.rows[i1].lo0 == rr.rows[i0].lo0;) ++i1;
        const int64_t lo = seg_panel[segment_of(off, nseg, rr.rows[i0].lo0)] * kPanel;
        attend_run(i0, i1, lo, lo + rr.rows[i0].hi0 - rr.rows[i0].lo0);
      }
    } else {
      // Key tiles start on a panel boundary; keys left of a row's range are masked like any other.
      rr.for_each_key_tile(block_k, [&](int64_t c0, int64_t c1, TileKind kind) {
        const int64_t nc = c1 - c0;
        gemm_panels(nr, (nc + kPanel - 1) / kPanel, d.D, scale, qt_ptr, ldq, kpanels + c0 * d.D,
                    d.D * kPanel, sp, lds, /*accumulate=*/false);
        if (kind == TileKind::kPartial) rr.mask(sp, lds, c0, c1);
        absorb(0, nr, sp, c0, nc);
      });
    }
    // Small-block pass: each run of rows sharing an own block attends that block alone (its panels
    // only), instead of the whole tile's rows x the tile's width of keys.
    for (int64_t i0 = 0, i1; i0 < nr; i0 = i1) {
      for (i1 = i0 + 1; i1 < nr && rr.own[i1] == rr.own[i0];) ++i1;
      if (rr.own[i0] >= 0) attend_run(i0, i1, rr.own[i0], rr.own[i0] + block_size);
    }
    for (int64_t i = 0; i < nr; ++i) {
      const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
      // Compact the padded accumulator rows to Dv floats for store_tile (in place, row order).
      for (int64_t j = 0; j < d.Dv; ++j) acc[i * d.Dv + j] = acc[i * ldacc + j] * inv;
      lp[(b * d.H + h) * d.L + r0 + i] = l[i] > 0.f ? m[i] + std::log(l[i]) : kNegInf;
    }
    store_tile(acc, nr, d.Dv, op + b * os[0] + r0 * os[1] + h * os[2], os[1], os[3]);
  };

  if (use_per_kv_head_schedule(d.B * d.Hk)) {
    // Each task packs one (batch, kv head) pair into a per-thread buffer, which stays in L2 while the
    // task runs every query tile of the pair's heads: no big allocation, no separate packing pass.
    at::parallel_for(0, d.B * d.Hk, 1, [&](int64_t begin, int64_t end) {
      Scratch w = make_scratch();
      std::vector<float> kbuf(kpack_size), vbuf(vpack_size);
      const int64_t n_tiles = d.group * n_qt, share = (d.Lk + n_tiles - 1) / n_tiles;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t hk = t % d.Hk, b = t / d.Hk;
        pack(b, hk, kbuf.data(), vbuf.data());
        // The next pair's K and V rows, a share before each query tile (see prefetch_kv_rows).
        const bool next = t + 1 < end && ks[3] == 1 && vs[3] == 1;
        const T* nk = kp + (t + 1) / d.Hk * ks[0] + (t + 1) % d.Hk * ks[2];
        const T* nv = vp + (t + 1) / d.Hk * vs[0] + (t + 1) % d.Hk * vs[2];
        int64_t tile = 0;
        for (int64_t h = hk * d.group; h < (hk + 1) * d.group; ++h)
          for (int64_t qt = 0; qt < n_qt; ++qt, ++tile) {
            if (next)
              prefetch_kv_rows(nk, ks[1], d.D, nv, vs[1], d.Dv, std::min(d.Lk, tile * share),
                               std::min(d.Lk, (tile + 1) * share));
            query_tile(w, b, h, qt, kbuf.data(), vbuf.data());
          }
      }
    });
    return;
  }
  // Few (batch, kv head) pairs for the threads (batch 1, MQA): pack them all first, then spread the
  // query tiles of every head over the threads. As tensors from the output cache, which reports to
  // the profiler, so memory profiling (and the benchmarks' peak-memory column) sees the packed copy.
  const at::Tensor kpack_t = empty_cached({d.B * d.Hk * kpack_size}, q.options().dtype(at::kFloat));
  const at::Tensor vpack_t = empty_cached({d.B * d.Hk * vpack_size}, q.options().dtype(at::kFloat));
  float* const kpack = kpack_t.data_ptr<float>();
  float* const vpack = vpack_t.data_ptr<float>();
  at::parallel_for(0, d.B * d.Hk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      pack(t / d.Hk, t % d.Hk, kpack + t * kpack_size, vpack + t * vpack_size);
  });
  at::parallel_for(0, d.B * d.H * n_qt, 1, [&](int64_t begin, int64_t end) {
    Scratch w = make_scratch();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qt = task % n_qt, h = (task / n_qt) % d.H, b = task / (n_qt * d.H);
      const int64_t pair = b * d.Hk + h / d.group;
      query_tile(w, b, h, qt, kpack + pair * kpack_size, vpack + pair * vpack_size);
    }
  });
}

template <typename T>
void bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                const at::Tensor& offsets, int64_t pattern, int64_t block_size, double scale_d,
                const float* temp,
                int64_t temp_stride, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const Dims d = dims_of(q, k, v);
  const float scale = (float)scale_d;
  const int32_t* off = offsets.data_ptr<int32_t>();
  const int64_t nseg = offsets.numel() - 1;
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const T* op = out.const_data_ptr<T>();
  const T* gp = dout.const_data_ptr<T>();
  const float* lp = lse.const_data_ptr<float>();
  const auto lss = lse.strides();
  T* dqp = dq.mutable_data_ptr<T>();
  T* dkp = dk.mutable_data_ptr<T>();
  T* dvp = dv.mutable_data_ptr<T>();
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides(), os = out.strides(),
             gs = dout.strides(), dqs = dq.strides(), dks = dk.strides(), dvs = dv.strides();
  const auto qblocks = query_tiles(off, nseg, pattern, kBlockQ);
  const int64_t block_k = (kBlockK + kPanel - 1) / kPanel * kPanel, lds = score_stride(block_k);
  const int64_t k_panels = (d.Lk + kPanel - 1) / kPanel;

  at::parallel_for(0, d.B * d.Hk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qbuf(kBlockQ * d.D), gbuf(kBlockQ * d.Dv), obuf(kBlockQ * d.Dv);
    std::vector<float> kbuf(block_k * d.D);
    std::vector<float> p(kBlockQ * lds), dp(kBlockQ * lds), dqa(kBlockQ * d.D);
    std::vector<float> dka(d.Lk * d.D), dva(d.Lk * d.Dv), lrow(kBlockQ), delta(kBlockQ);
    // K^T and V^T panels as the forward packs them: S = Q K^T is then recomputed with the very same
    // arithmetic as the forward, so P = exp(S - lse) is consistent with the stored lse to the last
    // bit (this matters with cos attention, whose logits reach 100).
    std::vector<float> ktp(k_panels * d.D * kPanel), vtp(k_panels * d.Dv * kPanel);
    RowRanges rr;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t hk = task % d.Hk, b = task / d.Hk;
      pack_kt_panels(kp + b * ks[0] + hk * ks[2], d.Lk, d.D, ks[1], ks[3], ktp.data(), temp != nullptr);
      pack_kt_panels(vp + b * vs[0] + hk * vs[2], d.Lk, d.Dv, vs[1], vs[3], vtp.data(), false);
      std::fill(dka.begin(), dka.end(), 0.f);
      std::fill(dva.begin(), dva.end(), 0.f);
      for (int64_t h = hk * d.group; h < (hk + 1) * d.group; ++h) {
        for (const auto& [r0, r1] : qblocks) {
          const int64_t nr = r1 - r0;
          rr.build(off, nseg, pattern, block_size, r0, r1);
          int64_t ldq, ldg, ldo;
          const float* qt_ptr = load_tile(qp + b * qs[0] + r0 * qs[1] + h * qs[2], nr, d.D, qs[1],
                                          qs[3], qbuf.data(), &ldq, /*pack=*/true, temp != nullptr);
          if (temp)
            normalize_rows(qbuf.data(), nr, d.D, ldq, temperature_multiplier(temp[h * temp_stride]));
          const float* gt = load_tile(gp + b * gs[0] + r0 * gs[1] + h * gs[2], nr, d.Dv, gs[1],
                                      gs[3], gbuf.data(), &ldg, /*pack=*/true);
          const float* ot = load_tile(op + b * os[0] + r0 * os[1] + h * os[2], nr, d.Dv, os[1],
                                      os[3], obuf.data(), &ldo);
          for (int64_t i = 0; i < nr; ++i) {
            delta[i] = dot(gt + i * ldg, ot + i * ldo, d.Dv);
            lrow[i] = lp[b * lss[0] + h * lss[1] + (r0 + i) * lss[2]];
          }
          std::fill(dqa.begin(), dqa.begin() + nr * d.D, 0.f);
          rr.for_each_key_tile(block_k, [&](int64_t c0, int64_t c1, TileKind kind) {
            const int64_t nc = c1 - c0;
            const int64_t np = (nc + kPanel - 1) / kPanel;
            int64_t ldk;
            const float* kt = load_tile(kp + b * ks[0] + c0 * ks[1] + hk * ks[2], nc, d.D, ks[1],
                                        ks[3], kbuf.data(), &ldk, /*pack=*/true, temp != nullptr);
            if (temp) normalize_rows(kbuf.data(), nc, d.D, ldk, 1.f);
            gemm_panels(nr, np, d.D, scale, qt_ptr, ldq, ktp.data() + c0 * d.D, d.D * kPanel, p.data(), lds,
                        /*accumulate=*/false);
            if (kind == TileKind::kPartial) rr.mask(p.data(), lds, c0, c1);
            for (int64_t i = 0; i < nr; ++i) exp_sub(p.data() + i * lds, nc, lrow[i]);
            // dV += P^T dO ; dP = dO V^T ; dS = P (dP - delta) ; dQ += dS K ; dK += dS^T Q
            gemm_acc_narrow(true, nc, d.Dv, nr, 1.f, p.data(), lds, gt, ldg, dva.data() + c0 * d.Dv,
                            d.Dv);
            gemm_panels(nr, np, d.Dv, 1.f, gt, ldg, vtp.data() + c0 * d.Dv, d.Dv * kPanel, dp.data(), lds,
                        /*accumulate=*/false);
            for (int64_t i = 0; i < nr; ++i) {
              float* pi = p.data() + i * lds;
              const float* dpi = dp.data() + i * lds;
              const float di = delta[i];
#pragma omp simd
              for (int64_t j = 0; j < nc; ++j) pi[j] = pi[j] * (dpi[j] - di);
            }
            gemm_acc_narrow(false, nr, d.D, nc, scale, p.data(), lds, kt, ldk, dqa.data(), d.D);
            gemm_acc_narrow(true, nc, d.D, nr, scale, p.data(), lds, qt_ptr, ldq, dka.data() + c0 * d.D,
                            d.D);
          });
          store_tile(dqa.data(), nr, d.D, dqp + b * dqs[0] + r0 * dqs[1] + h * dqs[2], dqs[1],
                     dqs[3]);
        }
      }
      store_tile(dka.data(), d.Lk, d.D, dkp + b * dks[0] + hk * dks[2], dks[1], dks[3]);
      store_tile(dva.data(), d.Lk, d.Dv, dvp + b * dvs[0] + hk * dvs[2], dvs[1], dvs[3]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> interval_attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v,
                                                         const at::Tensor& offsets, int64_t pattern,
                                                         int64_t block_size, double scale,
                                                         const c10::optional<at::Tensor>& temperature) {
  check_inputs(q, k, v, offsets, pattern, block_size);
  check_temperature(temperature, q);
  const float* temp = temperature ? temperature->const_data_ptr<float>() : nullptr;
  const int64_t temp_stride = temperature ? temperature->stride(0) : 0;
  at::Tensor out = empty_cached({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  by_dtype(q.scalar_type(), "hierkern::interval_attn_fwd (cpu)", [&](auto tag) {
    fwd_kernel<decltype(tag)>(q, k, v, offsets, pattern, block_size, scale, temp, temp_stride, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> interval_attn_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& offsets, int64_t pattern,
    int64_t block_size, double scale, const c10::optional<at::Tensor>& temperature) {
  check_inputs(q, k, v, offsets, pattern, block_size);
  check_temperature(temperature, q);
  const float* temp = temperature ? temperature->const_data_ptr<float>() : nullptr;
  const int64_t temp_stride = temperature ? temperature->stride(0) : 0;
  TORCH_CHECK(dout.sizes() == out.sizes() && dout.scalar_type() == q.scalar_type(),
              "hierkern::interval_attn_bwd: grad_out must match out in shape and dtype");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3,
              "hierkern::interval_attn_bwd: lse must be float32 (batch, heads, seq)");
  at::Tensor dq = empty_like_cached(q);
  at::Tensor dk = empty_like_cached(k);
  at::Tensor dv = empty_like_cached(v);
  by_dtype(q.scalar_type(), "hierkern::interval_attn_bwd (cpu)", [&](auto tag) {
    bwd_kernel<decltype(tag)>(dout, q, k, v, out, lse, offsets, pattern, block_size, scale, temp, temp_stride, dq,
                              dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(hierkern, CPU, m) {
  m.impl("interval_attn_fwd", &interval_attn_fwd_cpu);
  m.impl("interval_attn_bwd", &interval_attn_bwd_cpu);
}

}  // namespace hierkern::cpu
