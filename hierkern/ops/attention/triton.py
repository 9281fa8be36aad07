"""Triton kernels for interval attention (forward, backward) and their launchers.

Query row r sees the key range(s) that the pattern derives from the int32 cumulative segment offsets
(see csrc/interval.h and patterns.py). Nothing L x L and nothing per (batch, head) exists: each program
reads one row of a host-built tile schedule (tiling.py) and computes per-row key ranges in-kernel, so
a new sequence length or schedule never triggers a recompile: only head_dim, dtype and tile sizes are
compile-time constants, and the integers that change with the length or schedule are not specialised
(see _VARYING).

Kernels
  _fwd_kernel        grid (n_q_tiles, B*H): online softmax over the key tiles of one query tile.
  _bwd_delta_kernel  grid (cdiv(L, BLOCK), B*H): delta = rowsum(dO * O) in fp32.
  _bwd_dkdv_kernel   grid (n_k_tiles, B*Hkv): dK, dV of one key tile, looping over the q heads of its
                     GQA group and the query blocks that see it; accumulates in registers (no atomics).
  _bwd_dq_kernel     grid (n_dq_tiles, B*H): dQ of one query tile, schedule as the forward.

Every row sees at most two key ranges (every key is seen by at most two query ranges), and every
schedule row carries at most two spans of the other axis: for the block-diffusion masks a noisy tile
visits the union of its rows' own blocks and the clean prefix, skipping the gap between them. The
dQ and dK/dV programs walk both spans in one loop (which triton software-pipelines); the forward runs
one loop per span, because on sm_80 the merged loop's extra live bounds spill its 255-register
configs. Only edge blocks, those not fully visible to every valid row (or key) of the tile, apply the
element mask: range t of the rows is reduced once per tile to two scalars (max lo, min hi), and a
block of span t inside [max lo, min hi) takes the unmasked branch. Softmax runs in natural log, not
base 2: the backward recomputes P = exp(s - lse) from the stored float32 lse, and converting lse to
base 2 and back costs an ulp of |lse| each way, which with cos attention (logits up to 100) is a 1e-5
relative error in P.

Operands a dot needs transposed are loaded transposed from global memory rather than tl.trans'ed in
registers: on sm_80 a register transpose feeding mma keeps a whole tile per warp live and spills.
"""
import contextlib
import itertools
import json
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._aot import UNIT, aot_entry
from .patterns import BLOCK_CAUSAL, PATTERN_NAMES, SEGMENT_CAUSAL, SKIP_CLEAN_FIRST, SKIP_NOISY_FIRST

_SEGMENT_CAUSAL: tl.constexpr = tl.constexpr(SEGMENT_CAUSAL)
_SKIP_NOISY_FIRST: tl.constexpr = tl.constexpr(SKIP_NOISY_FIRST)
_SKIP_CLEAN_FIRST: tl.constexpr = tl.constexpr(SKIP_CLEAN_FIRST)
_BLOCK_CAUSAL: tl.constexpr = tl.constexpr(BLOCK_CAUSAL)
_TILE_COLS: tl.constexpr = tl.constexpr(6)  # a schedule row: one tile and two spans (tiling.py)
_LN100: tl.constexpr = tl.constexpr(math.log(100.0))

# Arguments that change with the sequence length or the tile schedule: never specialised (neither on
# the value 1 nor on divisibility by 16), so one compiled kernel serves every layout. The (B, H, L)
# lse / delta strides are multiples of L; the metadata pointers may sit at any offset.
# The batch strides of the BSHD tensors are deliberately left specialised: they are L * (row stride),
# so their divisibility by 16 does not change with L whenever the row stride is a multiple of 16 (every
# contiguous or head-transposed layout with H * D % 16 == 0), and without that alignment fact triton
# cannot vectorise any q/k/v load (the tile loads then fall back to scalar accesses and spill).
_VARYING = ["stride_lb", "stride_lh", "stride_deb", "stride_deh", "seq_len", "n_seg", "pattern", "block_size",
            "Offsets", "Tiles"]


# ----------------------------------------------------------------------------------------------------
# Mask semantics (mirror of csrc/interval.h and patterns.py). Every row (key) has two ranges
# (lo0, hi0, lo1, hi1); the segment patterns leave the second empty (0, 0).
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _segment_of(Offsets, n_seg, pos):
    """Per element of `pos`: the largest i < n_seg with offsets[i] <= pos (branch-free binary search
    with a uniform trip count, ceil(log2(n_seg)), so it needs no per-lane control flow)."""
    base = tl.zeros_like(pos)
    n = n_seg
    while n > 1:
        half = n // 2
        base = tl.where(tl.load(Offsets + base + half) <= pos, base + half, base)
        n -= half
    return base


@triton.jit
def _segment_bounds(Offsets, n_seg, pos):
    """Per position: the bounds [a, e) of its segment (document)."""
    s = _segment_of(Offsets, n_seg, pos)
    return tl.load(Offsets + s), tl.load(Offsets + s + 1)


# The range helpers below are pure arithmetic on the segment bounds [a, e).
@triton.jit
def _block_coords(a, e, pattern, block_size, pos):
    """Per position: half length n, whether skip-causal / noisy / noisy-first, the start of the clean
    half, the block index i within its half (or document, block-causal), the start of its block, and
    the block size. Branch-free, so one code path serves every pattern."""
    # block_size is 0 for the segment patterns, whose ranges do not use it: keep the division defined.
    bs = tl.maximum(block_size, 1)
    x = pos - a
    n = (e - a) // 2
    nf = pattern == _SKIP_NOISY_FIRST
    skip = nf | (pattern == _SKIP_CLEAN_FIRST)
    noisy = skip & ((x < n) == nf)
    clean0 = tl.where(nf, a + n, a)
    xh = tl.where(skip & (x >= n), x - n, x)
    i = xh // bs
    own0 = pos - xh % bs
    return n, skip, noisy, nf, clean0, i, own0, bs


@triton.jit
def _row_key_ranges(a, e, pattern, block_size, rows):
    """(lo0, hi0, lo1, hi1): the keys visible to each query row of segment [a, e), ascending."""
    n, skip, noisy, nf, clean0, i, own0, bs = _block_coords(a, e, pattern, block_size, rows)
    # Segment-causal [0, e), segment-diagonal [a, e), block-causal [a, min(end of own block, e)).
    lo0 = tl.where(pattern == _SEGMENT_CAUSAL, 0, a)
    hi0 = tl.where(pattern == _BLOCK_CAUSAL, tl.minimum(own0 + bs, e), e)
    # Skip-causal: clean block i -> clean blocks <= i; noisy block i -> own block and clean blocks < i,
    # ordered by where the halves lie.
    prefix_hi = clean0 + tl.where(noisy, i, i + 1) * bs
    lo0 = tl.where(skip, tl.where(noisy & nf, own0, clean0), lo0)
    hi0 = tl.where(skip, tl.where(noisy & nf, own0 + bs, prefix_hi), hi0)
    lo1 = tl.where(noisy, tl.where(nf, clean0, own0), 0)
    hi1 = tl.where(noisy, tl.where(nf, prefix_hi, own0 + bs), 0)
    return lo0, hi0, lo1, hi1


@triton.jit
def _key_query_ranges(a, e, seq_end, pattern, block_size, cols):
    """(lo0, hi0, lo1, hi1): the query rows that see each key of segment [a, e) (the transpose of
    _row_key_ranges); seq_end is the sequence length."""
    n, skip, noisy, nf, clean0, i, own0, bs = _block_coords(a, e, pattern, block_size, cols)
    # Segment-causal [a, L), segment-diagonal [a, e), block-causal [start of own block, e).
    lo0 = tl.where(pattern == _BLOCK_CAUSAL, own0, a)
    hi0 = tl.where(pattern == _SEGMENT_CAUSAL, seq_end, e)
    # Skip-causal: a noisy key is seen by its own block's rows; a clean key of block i by noisy rows of
    # blocks > i and clean rows of blocks >= i.
    noisy0 = tl.where(nf, a, a + n)
    lo0 = tl.where(skip, tl.where(noisy, own0, tl.where(nf, noisy0 + (i + 1) * bs, clean0 + i * bs)), lo0)
    hi0 = tl.where(skip, tl.where(noisy, own0 + bs, a + n), hi0)
    clean = skip & ~noisy
    lo1 = tl.where(clean, tl.where(nf, clean0 + i * bs, noisy0 + (i + 1) * bs), 0)
    hi1 = tl.where(clean, e, 0)
    return lo0, hi0, lo1, hi1


@triton.jit
def _first(x, BLOCK: tl.constexpr):
    """x[0] of a per-entry vector (entry 0 of a tile is always valid)."""
    return tl.sum(tl.where(tl.arange(0, BLOCK) == 0, x, 0), 0)


@triton.jit
def _unmasked(idx_ok, lo, hi, span_start, span_end):
    """[max lo, min(min hi, span end)) over the valid entries: the part of a span that every valid entry
    of the tile sees through this range; blocks inside it skip the element mask."""
    full_lo = tl.maximum(tl.max(tl.where(idx_ok, lo, 0), 0), span_start)
    full_hi = tl.minimum(tl.min(tl.where(idx_ok, hi, span_end), 0), span_end)
    return full_lo, full_hi


@triton.jit
def _span_block(it, n0, s0, e0, u0_lo, u0_hi, s1, e1, u1_lo, u1_hi, BLOCK: tl.constexpr):
    """Block `it` of the walk over spans [s0, e0) (n0 blocks) then [s1, e1): (start, span end, edge)."""
    second = it >= n0
    start = tl.where(second, s1 + (it - n0) * BLOCK, s0 + it * BLOCK)
    end = tl.where(second, e1, e0)
    lo = tl.where(second, u1_lo, u0_lo)
    hi = tl.where(second, u1_hi, u0_hi)
    return start, end, (start < lo) | (start + BLOCK > hi)


# Edge-block masks. A tile's loop keeps three vectors per row (or key) live: its own range [lo, hi) and
# the one per-row bound of its second range, whose other bound is a tile-uniform scalar (only
# skip-causal tiles have a second range). That relies on the schedule (tiling.py): a block-pattern
# tile never mixes documents or noisy and clean entries. Keeping four bounds per entry live (or the
# segment bounds, recomputing the ranges in the masked branch) spills the widest configs on sm_80.
@triton.jit
def _row_mask_params(a, e, pattern, block_size, rows, BLOCK_M: tl.constexpr):
    """(lo, hi, p_lo, p_hi): row r sees [lo, hi) and [p_lo, p_hi). For a noisy row [lo, hi) is its own
    block and [p_lo, p_hi) its clean prefix, p_lo (the clean half's start) uniform over the tile, p_hi
    = lo + N (noisy-first) or lo - N (clean-first); other tiles get an empty second range (p_lo past
    every key)."""
    n, skip, noisy, nf, clean0, i, own0, bs = _block_coords(a, e, pattern, block_size, rows)
    lo0, hi0, lo1, hi1 = _row_key_ranges(a, e, pattern, block_size, rows)
    lo = tl.where(noisy, own0, lo0)
    hi = tl.where(noisy, own0 + bs, hi0)
    p_lo = tl.where(_first(noisy.to(tl.int32), BLOCK_M) != 0, _first(clean0, BLOCK_M), 2147483647)
    return lo, hi, p_lo, lo + _first(tl.where(nf, n, -n), BLOCK_M)


@triton.jit
def _row_mask(lo, hi, p_lo, p_hi, cols):
    """(rows, cols) visibility for _row_mask_params: compares only, no (rows, cols) integer temporary."""
    return (((cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]))
            | ((cols >= p_lo)[None, :] & (cols[None, :] < p_hi[:, None])))


@triton.jit
def _key_mask_params(a, e, seq_end, pattern, block_size, cols, BLOCK_N: tl.constexpr):
    """(lo, hi, t_lo, t_hi): key j is seen by rows [lo, hi) and [t_lo, t_hi). For a clean key [lo, hi)
    is its clean rows and [t_lo, t_hi) its noisy rows, t_hi (the noisy half's end) uniform over the
    tile, t_lo = lo + B - N (noisy-first) or lo + N + B (clean-first); other tiles get an empty second
    range (t_hi = 0)."""
    n, skip, noisy, nf, clean0, i, own0, bs = _block_coords(a, e, pattern, block_size, cols)
    lo0, hi0, lo1, hi1 = _key_query_ranges(a, e, seq_end, pattern, block_size, cols)
    clean = skip & ~noisy
    lo = tl.where(clean & nf, lo1, lo0)
    hi = tl.where(clean & nf, hi1, hi0)
    t_hi = tl.where(_first(clean.to(tl.int32), BLOCK_N) != 0, _first(tl.where(nf, a + n, e), BLOCK_N), 0)
    return lo, hi, lo + _first(tl.where(nf, bs - n, n + bs), BLOCK_N), t_hi


@triton.jit
def _key_mask(lo, hi, t_lo, t_hi, rows):
    """(keys, rows) visibility for _key_mask_params: compares only."""
    return (((rows[None, :] >= lo[:, None]) & (rows[None, :] < hi[:, None]))
            | ((rows[None, :] >= t_lo[:, None]) & (rows < t_hi)[None, :]))


@triton.jit
def _load_rows(ptrs, row_ok, d_ok, EVEN_D: tl.constexpr):
    """(rows, BLOCK_D) tile; rows past the end read 0. The row mask is constant along the contiguous
    head dim, so loads stay vectorised; the head-dim mask exists only when HEAD_DIM < BLOCK_D."""
    if EVEN_D:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    return x


@triton.jit
def _load_cols(ptrs, col_ok, d_ok, EVEN_D: tl.constexpr):
    """(BLOCK_D, cols) tile: a transposed operand loaded directly in the layout the dot consumes."""
    if EVEN_D:
        x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
    return x


@triton.jit
def _unit_rows(x, mult):
    """Cos-attention prologue on a (rows, D) tile: rows scaled to L2 norm `mult` (norm clamped at
    1e-12 as F.normalize), computed in fp32 and returned in the tile's dtype for the dots."""
    xf = x.to(tl.float32)
    inv = mult / tl.maximum(tl.sqrt(tl.sum(xf * xf, 1)), 1e-12)
    return (xf * inv[:, None]).to(x.dtype)


@triton.jit
def _unit_cols(x, mult):
    """_unit_rows for a transposed (D, cols) tile."""
    xf = x.to(tl.float32)
    inv = mult / tl.maximum(tl.sqrt(tl.sum(xf * xf, 0)), 1e-12)
    return (xf * inv[None, :]).to(x.dtype)


@triton.jit
def _head_multiplier(Temp, h, QK_NORM: tl.constexpr):
    """exp(min(temperature[h], ln 100)) with qk_norm, else 1."""
    if QK_NORM:
        return tl.exp(tl.minimum(tl.load(Temp + h), _LN100))
    else:
        return 1.0


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_step(acc, l_i, m_i, q, K_base, V_base, stride_kl, stride_kd, stride_vl, stride_vd, start_n, k_end,
              edge, lo, hi, p_lo, p_hi, offs_d, d_ok, qk_scale, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
              DOT_PRECISION: tl.constexpr, QK_NORM: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < k_end
    k_t = _load_cols(K_base + cols[None, :] * stride_kl + offs_d[:, None] * stride_kd, col_ok, d_ok, EVEN_D)
    if QK_NORM:
        k_t = _unit_cols(k_t, 1.0)
    v = _load_rows(V_base + cols[:, None] * stride_vl + offs_d[None, :] * stride_vd, col_ok, d_ok, EVEN_D)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
    if edge:  # a block at the edge of the visible span: element mask
        # Columns past the span's end are masked even where a row's other range covers them: the
        # other span visits those keys (and they were loaded as zeros here).
        s = tl.where(_row_mask(lo, hi, p_lo, p_hi, cols) & col_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp gives 0, not NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_use[:, None])
    alpha = tl.exp(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _query_tile(Tiles, n_heads, group):
    """(batch, head, kv head, q_start, q_end, k0_start, k0_end, k1_start, k1_end) of this program:
    axis 0 picks a row of the tile schedule, axis 1 a (batch, head) pair."""
    tile = Tiles + tl.program_id(0) * _TILE_COLS
    bh = tl.program_id(1)
    h = bh % n_heads
    return ((bh // n_heads).to(tl.int64), h, h // group, tl.load(tile), tl.load(tile + 1), tl.load(tile + 2),
            tl.load(tile + 3), tl.load(tile + 4), tl.load(tile + 5))


@triton.jit(do_not_specialize=_VARYING)
def _fwd_kernel(Q, K, V, Out, Lse, Offsets, Tiles, Temp,
                stride_qb, stride_ql, stride_qh, stride_qd,
                stride_kb, stride_kl, stride_kh, stride_kd,
                stride_vb, stride_vl, stride_vh, stride_vd,
                stride_ob, stride_ol, stride_oh, stride_od,
                stride_lb, stride_lh, stride_ll,
                n_heads, group, n_seg, pattern, block_size, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, QK_NORM: tl.constexpr):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    b, h, hk, q_start, q_end, k0_start, k0_end, k1_start, k1_end = _query_tile(Tiles, n_heads, group)
    rows = q_start + tl.arange(0, BLOCK_M)
    row_ok = rows < q_end
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _load_rows(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                   row_ok, d_ok, EVEN_D)
    if QK_NORM:
        q = _unit_rows(q, _head_multiplier(Temp, h, QK_NORM))
    a, e = _segment_bounds(Offsets, n_seg, rows)
    lo0, hi0, lo1, hi1 = _row_key_ranges(a, e, pattern, block_size, rows)
    u0_lo, u0_hi = _unmasked(row_ok, lo0, hi0, k0_start, k0_end)
    u1_lo, u1_hi = _unmasked(row_ok, lo1, hi1, k1_start, k1_end)
    lo, hi, p_lo, p_hi = _row_mask_params(a, e, pattern, block_size, rows, BLOCK_M)

    K_base = K + b * stride_kb + hk * stride_kh
    V_base = V + b * stride_vb + hk * stride_vh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # One loop per span (an unused span (0, 0) runs none): triton software-pipelines each.
    for start_n in range(k0_start, k0_end, BLOCK_N):
        edge = (start_n < u0_lo) | (start_n + BLOCK_N > u0_hi)
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K_base, V_base, stride_kl, stride_kd, stride_vl, stride_vd,
                                  start_n, k0_end, edge, lo, hi, p_lo, p_hi, offs_d, d_ok, qk_scale, BLOCK_N,
                                  EVEN_D, DOT_PRECISION, QK_NORM)
    for start_n in range(k1_start, k1_end, BLOCK_N):
        edge = (start_n < u1_lo) | (start_n + BLOCK_N > u1_hi)
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K_base, V_base, stride_kl, stride_kd, stride_vl, stride_vd,
                                  start_n, k1_end, edge, lo, hi, p_lo, p_hi, offs_d, d_ok, qk_scale, BLOCK_N,
                                  EVEN_D, DOT_PRECISION, QK_NORM)

    # Rows that saw no key: out 0, lse -inf.
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, m_i + tl.log(l_safe), float("-inf"))
    o_ptrs = Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_ol + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + b * stride_lb + h * stride_lh + rows * stride_ll, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_VARYING)
def _bwd_delta_kernel(Out, DO, Delta,
                      stride_ob, stride_ol, stride_oh, stride_od,
                      stride_dob, stride_dol, stride_doh, stride_dod,
                      stride_deb, stride_deh,
                      n_heads, seq_len,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seq_len
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    o = _load_rows(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_ol + offs_d[None, :] * stride_od,
                   row_ok, d_ok, HEAD_DIM == BLOCK_D)
    do = _load_rows(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dol + offs_d[None, :] * stride_dod,
                    row_ok, d_ok, HEAD_DIM == BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + b * stride_deb + h * stride_deh + rows, delta, mask=row_ok)


@triton.jit
def _bwd_dkdv_step(dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base, stride_ql, stride_qd, stride_dol,
                   stride_dod, stride_ll, start_m, q_end, edge, lo, hi, t_lo, t_hi, offs_d, d_ok, qk_scale, q_mult,
                   BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   QK_NORM: tl.constexpr):
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < q_end
    q_t = _load_cols(Q_base + rows[None, :] * stride_ql + offs_d[:, None] * stride_qd, row_ok, d_ok, EVEN_D)
    if QK_NORM:
        q_t = _unit_cols(q_t, q_mult)
    do = _load_rows(DO_base + rows[:, None] * stride_dol + offs_d[None, :] * stride_dod, row_ok, d_ok, EVEN_D)
    lse_rows = tl.load(Lse_base + rows * stride_ll, mask=row_ok, other=0.0)
    delta = tl.load(Delta_base + rows, mask=row_ok, other=0.0)
    # Transposed scores (keys x queries), so dK and dV come out of plain dots.
    s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale
    p_t = tl.exp(s_t - lse_rows[None, :])
    if edge:
        # Rows outside a key's query ranges (padding rows, rows with lse = -inf included) get p = 0, and
        # so do rows past the span's end, which the other span visits.
        p_t = tl.where(_key_mask(lo, hi, t_lo, t_hi, rows) & row_ok[None, :], p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_VARYING)
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, Lse, Delta, Offsets, Tiles, Temp,
                     stride_qb, stride_ql, stride_qh, stride_qd,
                     stride_kb, stride_kl, stride_kh, stride_kd,
                     stride_vb, stride_vl, stride_vh, stride_vd,
                     stride_dob, stride_dol, stride_doh, stride_dod,
                     stride_dkb, stride_dkl, stride_dkh, stride_dkd,
                     stride_dvb, stride_dvl, stride_dvh, stride_dvd,
                     stride_lb, stride_lh, stride_ll, stride_deb, stride_deh,
                     n_kv_heads, group, n_seg, pattern, block_size, qk_scale, scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, QK_NORM: tl.constexpr):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    tile = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // n_kv_heads).to(tl.int64)
    hk = bhk % n_kv_heads
    k_start = tl.load(Tiles + tile * _TILE_COLS)
    k_end = tl.load(Tiles + tile * _TILE_COLS + 1)
    q0_start = tl.load(Tiles + tile * _TILE_COLS + 2)
    q0_end = tl.load(Tiles + tile * _TILE_COLS + 3)
    q1_start = tl.load(Tiles + tile * _TILE_COLS + 4)
    q1_end = tl.load(Tiles + tile * _TILE_COLS + 5)

    cols = k_start + tl.arange(0, BLOCK_N)
    col_ok = cols < k_end
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k = _load_rows(K + b * stride_kb + hk * stride_kh + cols[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                   col_ok, d_ok, EVEN_D)
    v = _load_rows(V + b * stride_vb + hk * stride_vh + cols[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                   col_ok, d_ok, EVEN_D)
    if QK_NORM:
        k = _unit_rows(k, 1.0)
    # Transposed ranges per key, computed once for all heads of the group.
    a, e = _segment_bounds(Offsets, n_seg, cols)
    seq_end = tl.load(Offsets + n_seg)
    q_lo0, q_hi0, q_lo1, q_hi1 = _key_query_ranges(a, e, seq_end, pattern, block_size, cols)
    u0_lo, u0_hi = _unmasked(col_ok, q_lo0, q_hi0, q0_start, q0_end)
    u1_lo, u1_hi = _unmasked(col_ok, q_lo1, q_hi1, q1_start, q1_end)
    lo, hi, t_lo, t_hi = _key_mask_params(a, e, seq_end, pattern, block_size, cols, BLOCK_N)
    n0 = tl.cdiv(q0_end - q0_start, BLOCK_M)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, group):
        h = hk * group + g
        Q_base = Q + b * stride_qb + h * stride_qh
        DO_base = DO + b * stride_dob + h * stride_doh
        Lse_base = Lse + b * stride_lb + h * stride_lh
        Delta_base = Delta + b * stride_deb + h * stride_deh
        q_mult = _head_multiplier(Temp, h, QK_NORM)
        for it in range(0, n0 + tl.cdiv(q1_end - q1_start, BLOCK_M)):
            start_m, span_end, edge = _span_block(it, n0, q0_start, q0_end, u0_lo, u0_hi, q1_start, q1_end, u1_lo,
                                                  u1_hi, BLOCK_M)
            dk, dv = _bwd_dkdv_step(dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base, stride_ql, stride_qd,
                                    stride_dol, stride_dod, stride_ll, start_m, span_end, edge, lo, hi, t_lo, t_hi,
                                    offs_d, d_ok, qk_scale, q_mult, BLOCK_M, EVEN_D, DOT_PRECISION, QK_NORM)

    out_mask = col_ok[:, None] & d_ok[None, :]
    tl.store(DK + b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dkl + offs_d[None, :] * stride_dkd,
             (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + cols[:, None] * stride_dvl + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _bwd_dq_step(dq, q, do, lse_rows, delta, K_base, V_base, stride_kl, stride_kd, stride_vl, stride_vd, start_n,
                 k_end, edge, lo, hi, p_lo, p_hi, offs_d, d_ok, qk_scale, BLOCK_N: tl.constexpr,
                 EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, QK_NORM: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < k_end
    k_t = _load_cols(K_base + cols[None, :] * stride_kl + offs_d[:, None] * stride_kd, col_ok, d_ok, EVEN_D)
    if QK_NORM:
        k_t = _unit_cols(k_t, 1.0)
    v_t = _load_cols(V_base + cols[None, :] * stride_vl + offs_d[:, None] * stride_vd, col_ok, d_ok, EVEN_D)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
    p = tl.exp(s - lse_rows[:, None])
    if edge:
        p = tl.where(_row_mask(lo, hi, p_lo, p_hi, cols) & col_ok[None, :], p, 0.0)
    dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=_VARYING)
def _bwd_dq_kernel(Q, K, V, DO, DQ, Lse, Delta, Offsets, Tiles, Temp,
                   stride_qb, stride_ql, stride_qh, stride_qd,
                   stride_kb, stride_kl, stride_kh, stride_kd,
                   stride_vb, stride_vl, stride_vh, stride_vd,
                   stride_dob, stride_dol, stride_doh, stride_dod,
                   stride_dqb, stride_dql, stride_dqh, stride_dqd,
                   stride_lb, stride_lh, stride_ll, stride_deb, stride_deh,
                   n_heads, group, n_seg, pattern, block_size, qk_scale, scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, QK_NORM: tl.constexpr):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    b, h, hk, q_start, q_end, k0_start, k0_end, k1_start, k1_end = _query_tile(Tiles, n_heads, group)
    rows = q_start + tl.arange(0, BLOCK_M)
    row_ok = rows < q_end
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _load_rows(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                   row_ok, d_ok, EVEN_D)
    do = _load_rows(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dol + offs_d[None, :] * stride_dod,
                    row_ok, d_ok, EVEN_D)
    if QK_NORM:
        q = _unit_rows(q, _head_multiplier(Temp, h, QK_NORM))
    lse_rows = tl.load(Lse + b * stride_lb + h * stride_lh + rows * stride_ll, mask=row_ok, other=0.0)
    delta = tl.load(Delta + b * stride_deb + h * stride_deh + rows, mask=row_ok, other=0.0)
    a, e = _segment_bounds(Offsets, n_seg, rows)
    lo0, hi0, lo1, hi1 = _row_key_ranges(a, e, pattern, block_size, rows)
    u0_lo, u0_hi = _unmasked(row_ok, lo0, hi0, k0_start, k0_end)
    u1_lo, u1_hi = _unmasked(row_ok, lo1, hi1, k1_start, k1_end)
    lo, hi, p_lo, p_hi = _row_mask_params(a, e, pattern, block_size, rows, BLOCK_M)

    K_base = K + b * stride_kb + hk * stride_kh
    V_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n0 = tl.cdiv(k0_end - k0_start, BLOCK_N)
    for it in range(0, n0 + tl.cdiv(k1_end - k1_start, BLOCK_N)):
        start_n, span_end, edge = _span_block(it, n0, k0_start, k0_end, u0_lo, u0_hi, k1_start, k1_end, u1_lo,
                                              u1_hi, BLOCK_N)
        dq = _bwd_dq_step(dq, q, do, lse_rows, delta, K_base, V_base, stride_kl, stride_kd, stride_vl, stride_vd,
                          start_n, span_end, edge, lo, hi, p_lo, p_hi, offs_d, d_ok, qk_scale, BLOCK_N, EVEN_D,
                          DOT_PRECISION, QK_NORM)

    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dql + offs_d[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# GPU tables, keyed by (head-dim bucket, dtype bits), the same for sm_80 and sm_90: each entry fits the
# A100's shared memory and compiles without register spills for both archs, with mma (sm_80) and wgmma
# (sm_90) for 16-bit dtypes (tests/static_gpu_check.py verifies all of it). fp32 runs exact ieee dots
# (FMA, no tensor cores), so its tiles are smaller. ptxas is erratic near the register limit: retune an
# entry with the static check, not by rule of thumb.
_FWD_GPU = {
    # 8 warps: with 4, the qk_norm bf16 variant spilled 8 B on sm_90 once rows carry two key ranges.
    (64, 16): _Config(128, 64, 8, 3),
    (128, 16): _Config(128, 64, 8, 2),
    (256, 16): _Config(64, 64, 8, 2),
    (64, 32): _Config(64, 32, 8, 2),
    (128, 32): _Config(32, 16, 4, 2),
    (256, 32): _Config(32, 16, 4, 1),
}
# dK/dV: block_n is the key tile (k_tiles), block_m the query block it steps through.
# 16-bit d64 / d128 on Hopper: two stages, so the next query block's loads are in flight (cp.async)
# while this one's dots run; with one stage the sm_90 code has no async copies at all and every step
# waits for its loads. Chosen from the compiled code, not yet timed on a GPU: bench/tune_triton.py
# times it against the one-stage config (a candidate) on the next lent H200.
_DKDV_GPU = {
    (64, 16): _Config(32, 64, 4, 2),
    (128, 16): _Config(32, 64, 8, 2),
    (256, 16): _Config(16, 64, 8, 1),
    # 16 keys: with 32, ptxas spills (16 B on sm_90) once the two-span loop's bounds are live.
    (64, 32): _Config(16, 16, 4, 1),
    (128, 32): _Config(32, 32, 8, 1),
    (256, 32): _Config(32, 32, 8, 1),
}
# Ampere overrides (capability < 9): d256 16-bit dK/dV with 64-key tiles spills on sm_80 (8-24 B at
# every block_m / warps / stages tried; the dK and dV accumulators are 2 x 64 x 256 floats), and 32-key
# tiles are too short for Hopper's wgmma (64 rows), so each architecture gets its own key tile. At d64
# and d128 the two-stage Hopper configs spill on sm_80 (16-40 B): Ampere keeps one stage.
_DKDV_GPU_SM80 = {
    (64, 16): _Config(32, 64, 4, 1),
    (128, 16): _Config(32, 64, 8, 1),
    (256, 16): _Config(16, 32, 8, 1),
}
_DQ_GPU = {
    (64, 16): _Config(64, 64, 4, 2),
    (128, 16): _Config(64, 64, 8, 2),
    (256, 16): _Config(64, 32, 8, 2),
    (64, 32): _Config(32, 32, 4, 2),
    (128, 32): _Config(32, 32, 8, 1),
    (256, 32): _Config(32, 16, 8, 1),
}
# Alternatives bench/tune_triton.py times against the table entries on a lent GPU (16-bit, the head dims
# of VAR / HMAR (64) and Infinity (128)); tests/static_gpu_check.py compiles each for sm_90 (the H200)
# with the same checks as the tables, so any of them can become an entry (or an override) as is.
TUNE_CANDIDATES = {
    "fwd": {
        (64, 16): [_Config(128, 128, 8, 3), _Config(64, 64, 4, 3), _Config(128, 64, 8, 4),
                   _Config(128, 32, 4, 4)],
        (128, 16): [_Config(128, 64, 8, 3), _Config(64, 64, 4, 3), _Config(128, 32, 8, 3)],
    },
    "dkdv": {
        (64, 16): [_Config(32, 64, 4, 1), _Config(32, 64, 4, 3), _Config(32, 128, 8, 3), _Config(64, 64, 8, 2)],
        (128, 16): [_Config(32, 64, 8, 1), _Config(32, 128, 8, 2)],
    },
    "dq": {
        (64, 16): [_Config(64, 64, 4, 3), _Config(128, 64, 8, 2), _Config(64, 32, 4, 3), _Config(128, 32, 8, 3)],
        (128, 16): [_Config(64, 64, 8, 3), _Config(128, 64, 8, 2), _Config(64, 32, 4, 2)],
    },
}

_DELTA_BLOCK_M = 64  # the delta preprocess is a row reduction: any tile height works, 64 rows is plenty
_DELTA_WARPS = 4

# The interpreter runs on CPU tensors one program at a time: small tiles keep tests fast and exercise
# packing, splitting and the masked/unmasked block paths on short sequences.
_INTERP_FWD = _Config(32, 16, 4, 1)
_INTERP_DKDV = _Config(16, 32, 4, 1)
_INTERP_DQ = _Config(32, 16, 4, 1)

_HEAD_DIM_BUCKETS = (64, 128, 256)


def _bucket(head_dim):
    for b in _HEAD_DIM_BUCKETS:
        if head_dim <= b:
            return b
    raise ValueError(f"hierkern triton attention kernels: head_dim {head_dim} > 256 is not supported")


def _interpreted(device):
    return torch.device(device).type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _config(kernel, table, interpreted_cfg, head_dim, dtype, device, ampere=None):
    key = (_bucket(head_dim), torch.finfo(dtype).bits)
    override = _OVERRIDES.get((kernel,) + key)
    if override is not None:
        return override
    if _interpreted(device):
        return interpreted_cfg
    if ampere and key in ampere and torch.cuda.get_device_capability(device)[0] < 9:
        return ampere[key]
    return table[key]


def _fwd_config(head_dim, dtype, device):
    return _config("fwd", _FWD_GPU, _INTERP_FWD, head_dim, dtype, device)


def _dkdv_config(head_dim, dtype, device):
    return _config("dkdv", _DKDV_GPU, _INTERP_DKDV, head_dim, dtype, device, ampere=_DKDV_GPU_SM80)


def _dq_config(head_dim, dtype, device):
    return _config("dq", _DQ_GPU, _INTERP_DQ, head_dim, dtype, device)


# ----------------------------------------------------------------------------------------------------
# Config overrides (tuning on a GPU without editing the tables)
# ----------------------------------------------------------------------------------------------------
# HIERKERN_TRITON_CONFIGS (read at import: a JSON file's path, or the JSON text itself) or
# override_configs() replace table entries: a JSON list of objects
#   {"kernel": "fwd" | "dkdv" | "dq", "head_dim": 64 | 128 | 256 (the bucket), "dtype": "float16" |
#    "bfloat16" | "float32", "block_m": int, "block_n": int, "num_warps": int, "num_stages": int}.
# bits: float16 and bfloat16 share a table entry (16), as in the tables. An override wins everywhere,
# the interpreter and Ampere included; an entry no table has (e.g. head_dim 96) is refused. Nothing is
# compiled until a call needs it, and a config outside tests/static_gpu_check.py's list has not been
# checked for spills: bench/tune_triton.py only times the candidates below, which the check compiles.
_KERNELS = ("fwd", "dkdv", "dq")
_DTYPE_BITS = {"float16": 16, "bfloat16": 16, "float32": 32}
_CONFIG_FIELDS = ("block_m", "block_n", "num_warps", "num_stages")
_OVERRIDES: dict = {}


def parse_config_overrides(spec, source="HIERKERN_TRITON_CONFIGS") -> dict:
    """{(kernel, head-dim bucket, dtype bits): _Config} from the JSON list described above (a list, a
    JSON string or a path to a JSON file). Raises ValueError naming the entry and field at fault."""
    if isinstance(spec, str):
        text = spec
        if not spec.lstrip().startswith("["):
            try:
                with open(spec) as f:
                    text = f.read()
            except OSError as e:
                raise ValueError(f"{source}: expected a JSON list or the path of a JSON file, got {spec!r} ({e})")
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: invalid JSON: {e}") from None
    if not isinstance(spec, list):
        raise ValueError(f"{source}: expected a JSON list of config objects, got {type(spec).__name__}")
    out = {}
    for i, entry in enumerate(spec):
        where = f"{source}[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {entry!r}")
        unknown = set(entry) - {"kernel", "head_dim", "dtype", *_CONFIG_FIELDS}
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
        missing = [f for f in ("kernel", "head_dim", "dtype", *_CONFIG_FIELDS) if f not in entry]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        if entry["kernel"] not in _KERNELS:
            raise ValueError(f"{where}: kernel must be one of {_KERNELS}, got {entry['kernel']!r}")
        if entry["head_dim"] not in _HEAD_DIM_BUCKETS:
            raise ValueError(f"{where}: head_dim must be a head-dim bucket {_HEAD_DIM_BUCKETS}, got {entry['head_dim']!r}")
        if entry["dtype"] not in _DTYPE_BITS:
            raise ValueError(f"{where}: dtype must be one of {sorted(_DTYPE_BITS)}, got {entry['dtype']!r}")
        vals = {f: entry[f] for f in _CONFIG_FIELDS}
        for f, v in vals.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{where}: {f} must be a positive int, got {v!r}")
        for f in ("block_m", "block_n"):
            if vals[f] < 16 or vals[f] & (vals[f] - 1):
                raise ValueError(f"{where}: {f} must be a power of two >= 16 (tl.dot tiles), got {vals[f]}")
        if vals["num_warps"] not in (1, 2, 4, 8, 16):
            raise ValueError(f"{where}: num_warps must be 1, 2, 4, 8 or 16, got {vals['num_warps']}")
        out[(entry["kernel"], entry["head_dim"], _DTYPE_BITS[entry["dtype"]])] = _Config(**vals)
    return out


def config_entry(kernel, head_dim, dtype, cfg) -> dict:
    """The JSON object of one override (head_dim is bucketed, dtype a torch dtype)."""
    return {"kernel": kernel, "head_dim": _bucket(head_dim), "dtype": str(dtype).removeprefix("torch."),
            **{f: getattr(cfg, f) for f in _CONFIG_FIELDS}}


def active_overrides() -> list:
    """The overrides in force, as JSON objects (dtype reported as float16 for a 16-bit entry)."""
    names = {16: "float16", 32: "float32"}
    return [{"kernel": k, "head_dim": d, "dtype": names[b], **{f: getattr(c, f) for f in _CONFIG_FIELDS}}
            for (k, d, b), c in sorted(_OVERRIDES.items())]


@contextlib.contextmanager
def _overrides_in_force(parsed):
    """Within the block, `parsed` ({(kernel, bucket, bits): _Config}) is added to the overrides."""
    saved = dict(_OVERRIDES)
    _OVERRIDES.update(parsed)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


def override_configs(spec):
    """Within the block, the configs of `spec` (as HIERKERN_TRITON_CONFIGS) replace the table entries."""
    return _overrides_in_force(parse_config_overrides(spec, source="override_configs"))


if os.environ.get("HIERKERN_TRITON_CONFIGS"):
    _OVERRIDES.update(parse_config_overrides(os.environ["HIERKERN_TRITON_CONFIGS"]))


def fwd_blocks(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the forward; q_tiles must be built with this BLOCK_M."""
    cfg = _fwd_config(head_dim, dtype, device)
    return cfg.block_m, cfg.block_n


def bwd_blocks(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M of the dQ pass, defining dq_tiles; BLOCK_N of the dK/dV pass, defining k_tiles)."""
    return _dq_config(head_dim, dtype, device).block_m, _dkdv_config(head_dim, dtype, device).block_n


def bwd_configs(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """(dK/dV config, dQ config) in force: the forward records them with the tiles it builds for the
    backward (op.py), which runs them even when the overrides have changed since."""
    return _dkdv_config(head_dim, dtype, device), _dq_config(head_dim, dtype, device)


def pinned_bwd_configs(head_dim: int, dtype: torch.dtype, device: torch.device, configs: tuple):
    """Within the block, the backward launcher uses `configs` (from bwd_configs at forward time): its
    tiles were cut for their block sizes, and a backward run after an override_configs block (or inside
    another one) would otherwise pair them with other tiles (wrong gradients, no error). A no-op in the
    usual case, where nothing changed."""
    if bwd_configs(head_dim, dtype, device) == configs:
        return contextlib.nullcontext()
    key = (_bucket(head_dim), torch.finfo(dtype).bits)
    return _overrides_in_force({("dkdv",) + key: configs[0], ("dq",) + key: configs[1]})


def _dot_precision(dtype):
    # fp32 inputs: exact fp32 products (FMA), not tf32. Ignored for 16-bit inputs.
    return "ieee" if dtype == torch.float32 else "tf32"


def _temperature_arg(temperature, placeholder):
    """The Temp pointer: the temperature, or any float32 tensor when QK_NORM is off (never read)."""
    if temperature is None:
        return placeholder
    if temperature.dtype != torch.float32 or temperature.dim() != 1:
        raise ValueError("interval attention (triton): temperature must be a 1-D float32 tensor")
    return temperature


def _check_pattern(pattern, block_size):
    if pattern not in PATTERN_NAMES:
        raise ValueError(f"interval attention (triton): unsupported pattern id {pattern}")
    if pattern in (SKIP_NOISY_FIRST, SKIP_CLEAN_FIRST, BLOCK_CAUSAL) and block_size < 1:
        raise ValueError(f"interval attention (triton): block_size must be >= 1 for pattern "
                         f"{PATTERN_NAMES[pattern]}, got {block_size}")


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def interval_attn_fwd(q, k, v, offsets, q_tiles, pattern: int, block_size: int, scale: float, temperature=None):
    """out (B, L, H, D) in q.dtype and lse (B, H, L) float32; q_tiles from tiling.q_tiles with
    fwd_blocks()[0]. Inputs may have any strides. temperature: the qk_norm prologue's (H,) float32."""
    _check_pattern(pattern, block_size)
    B, L, H, D = q.shape
    out = torch.empty((B, L, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    n_tiles = q_tiles.shape[0]
    if n_tiles == 0 or B * H == 0:
        return out, lse
    cfg = _fwd_config(D, q.dtype, q.device)
    _fwd_kernel[(n_tiles, B * H)](
        q, k, v, out, lse, offsets, q_tiles, _temperature_arg(temperature, lse),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        H, H // k.shape[2], offsets.numel() - 1, pattern, block_size, scale,
        HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        DOT_PRECISION=_dot_precision(q.dtype), QK_NORM=temperature is not None, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return out, lse


def interval_attn_bwd(grad_out, q, k, v, out, lse, offsets, dq_tiles, k_tiles, pattern: int,
                      block_size: int, scale: float, temperature=None):
    """(dq, dk, dv) shaped and strided like (q, k, v); dq_tiles / k_tiles from tiling.q_tiles /
    tiling.k_tiles with bwd_blocks(). With a temperature, dq / dk are the gradients with respect to
    the normalised q_hat / k_hat (cos_attention.backward finishes the chain rule)."""
    _check_pattern(pattern, block_size)
    B, L, H, D = q.shape
    Hkv = k.shape[2]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if B * H * L == 0:
        return dq, dk, dv
    block_d = triton.next_power_of_2(D)
    precision = _dot_precision(q.dtype)
    n_seg = offsets.numel() - 1
    group = H // Hkv

    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(L, _DELTA_BLOCK_M), B * H)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), delta.stride(0), delta.stride(1), H, L,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=_DELTA_BLOCK_M, num_warps=_DELTA_WARPS, num_stages=1)

    common = (n_seg, pattern, block_size, scale, scale)
    cfg = _dkdv_config(D, q.dtype, q.device)
    _bwd_dkdv_kernel[(k_tiles.shape[0], B * Hkv)](
        q, k, v, grad_out, dk, dv, lse, delta, offsets, k_tiles, _temperature_arg(temperature, lse),
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        *lse.stride(), delta.stride(0), delta.stride(1), Hkv, group, *common,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_PRECISION=precision,
        QK_NORM=temperature is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    cfg = _dq_config(D, q.dtype, q.device)
    _bwd_dq_kernel[(dq_tiles.shape[0], B * H)](
        q, k, v, grad_out, dq, lse, delta, offsets, dq_tiles, _temperature_arg(temperature, lse),
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        *lse.stride(), delta.stride(0), delta.stride(1), H, group, *common,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_PRECISION=precision,
        QK_NORM=temperature is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time configurations (tests/static_gpu_check.py compiles each for sm_80 and sm_90)
# ----------------------------------------------------------------------------------------------------
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_POINTER_DTYPE = {"Offsets": "*i32", "Tiles": "*i32", "Lse": "*fp32", "Delta": "*fp32", "Temp": "*fp32"}
# Strides that are 1 for contiguous head_dim (and lse rows): triton specialises them to the constant 1,
# so the AOT signature does the same to compile the variant that real (contiguous) calls run.
_UNIT_STRIDES = {"stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_dod", "stride_dqd", "stride_dkd",
                 "stride_dvd", "stride_ll"}


def _aot_entry(name, kernel, dtype, constexprs, cfg_warps, cfg_stages, uses_dot):
    def classify(arg):
        if arg[0].isupper():
            return _POINTER_DTYPE.get(arg, "*" + _TRITON_DTYPE[dtype]), arg not in _VARYING
        if arg in _UNIT_STRIDES:
            return UNIT
        if arg in ("qk_scale", "scale"):
            return "fp32", False
        # row / head strides of BSHD tensors are multiples of head_dim
        return "i32", arg.startswith("stride_") and arg not in _VARYING
    return aot_entry(name, kernel, constexprs, classify, num_warps=cfg_warps, num_stages=cfg_stages,
                     uses_dot=uses_dot)


def aot_configs() -> list[dict]:
    """Every kernel configuration the GPU launchers can pick, for the static compile check.

    Each dict: name, kernel (the @triton.jit function), signature (arg -> triton type, "constexpr" for
    compile-time args), constexprs, divisible_by_16 (args triton would mark 16-aligned on a real call),
    num_warps, num_stages, uses_dot. `uses_dot` means "its dots must lower to tensor-core mma/wgmma":
    false for the delta preprocess (a row reduction, no dot) and for fp32, whose ieee-precision dots are
    exact FMA loops by design (tensor cores only offer tf32 for fp32 inputs).
    """
    entries = []
    kernels = (("fwd", _fwd_kernel, _FWD_GPU), ("dkdv", _bwd_dkdv_kernel, _DKDV_GPU), ("dq", _bwd_dq_kernel, _DQ_GPU))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        bits = torch.finfo(dtype).bits
        # Every head-dim bucket at its widest head_dim (most registers), plus 96 for the masked-D path.
        head_dims = _HEAD_DIM_BUCKETS + ((96,) if dtype == torch.float16 else ())
        for head_dim in head_dims:
            block_d = triton.next_power_of_2(head_dim)
            # The cos-attention prologue (QK_NORM) at the head dims VAR (64) and Infinity (128) use.
            qk_norms = (False, True) if head_dim in (64, 128) and bits == 16 else (False,)
            for (kname, kernel, table), qk_norm in itertools.product(kernels, qk_norms):
                key = (_bucket(head_dim), bits)
                ampere = _DKDV_GPU_SM80.get(key) if kname == "dkdv" else None
                # (config, archs it serves): an Ampere override splits an entry in two.
                variants = [(table[key], None)] if ampere is None else [(ampere, (80,)), (table[key], (90,))]
                for cfg, archs in variants:
                    constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_M": cfg.block_m,
                                  "BLOCK_N": cfg.block_n, "DOT_PRECISION": _dot_precision(dtype),
                                  "QK_NORM": qk_norm}
                    name = f"{kname}_{_TRITON_DTYPE[dtype]}_d{head_dim}" + ("_qknorm" if qk_norm else "")
                    entry = _aot_entry(name, kernel, dtype, constexprs, cfg.num_warps, cfg.num_stages,
                                       uses_dot=bits == 16)
                    if archs:
                        entry["archs"] = archs
                    entries.append(entry)
        if dtype == torch.bfloat16:  # the tuning candidates, for the H200 (sm_90) only
            for kname, kernel, _ in kernels:
                for (bucket, _bits), cfgs in TUNE_CANDIDATES[kname].items():
                    for cfg, qk_norm in itertools.product(cfgs, (False, True)):
                        constexprs = {"HEAD_DIM": bucket, "BLOCK_D": bucket, "BLOCK_M": cfg.block_m,
                                      "BLOCK_N": cfg.block_n, "DOT_PRECISION": "tf32", "QK_NORM": qk_norm}
                        name = (f"{kname}_bf16_d{bucket}_cand_{cfg.block_m}x{cfg.block_n}"
                                f"_w{cfg.num_warps}s{cfg.num_stages}" + ("_qknorm" if qk_norm else ""))
                        entry = _aot_entry(name, kernel, dtype, constexprs, cfg.num_warps, cfg.num_stages,
                                           uses_dot=True)
                        entry["archs"] = (90,)
                        entries.append(entry)
        entries.append(_aot_entry(f"delta_{_TRITON_DTYPE[dtype]}_d128", _bwd_delta_kernel, dtype,
                                  {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_M": _DELTA_BLOCK_M},
                                  _DELTA_WARPS, 1, uses_dot=False))
    return entries
