"""Triton kernels for interval attention (forward, backward) and their launchers.

Query row r sees the key range(s) that the pattern derives from the int32 cumulative segment offsets
(see csrc/interval.h and patterns.py). Nothing L x L and nothing per (batch, head) exists: each program
reads one row of a host-built tile schedule (tiling.py) and computes per-row key ranges in-kernel, so
a new sequence length or schedule never triggers a recompile (only head_dim, dtype and tile sizes are
compile-time constants; every length- or schedule-dependent integer is in `do_not_specialize`).

Kernels
  _fwd_kernel        grid (n_q_tiles, B*H): online softmax over the key tiles of one query tile.
  _bwd_delta_kernel  grid (cdiv(L, BLOCK), B*H): delta = rowsum(dO * O) in fp32.
  _bwd_dkdv_kernel   grid (n_k_tiles, B*Hkv): dK, dV of one key tile, looping over the q heads of its
                     GQA group and the query blocks that see it; accumulates in registers (no atomics).
  _bwd_dq_kernel     grid (n_dq_tiles, B*H): dQ of one query tile, schedule as the forward.

Inside a tile's span only boundary blocks (not fully visible to every valid row / key of the tile) apply
the element mask; the visibility test runs once per tile on two scalars (max lo, min hi), so interior
blocks run the unmasked code path. Softmax runs in base 2 (qk is pre-scaled by scale * log2(e)); the
stored lse is the natural-log float32 value the reference returns.
"""
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .patterns import SEGMENT_CAUSAL, SEGMENT_DIAGONAL

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

# Integers that change with the sequence length or the tile schedule: never specialised (neither on
# value 1 nor on divisibility by 16), so one compiled kernel serves every layout.
_VARYING = ["stride_qb", "stride_kb", "stride_vb", "stride_ob", "stride_dob", "stride_dqb", "stride_dkb",
            "stride_dvb", "stride_lb", "stride_lh", "stride_deb", "stride_deh", "seq_len", "n_seg",
            "pattern", "block_size"]


# ----------------------------------------------------------------------------------------------------
# Mask semantics (mirror of csrc/interval.h). New patterns go here: a pattern with a second key range
# returns (lo0, hi0, lo1, hi1) from both helpers and the masked steps test both ranges.
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
def _row_key_range(Offsets, n_seg, pattern, block_size, rows):
    """[lo, hi): keys visible to each query row. `block_size` is for the block patterns to come."""
    s = _segment_of(Offsets, n_seg, rows)
    start = tl.load(Offsets + s)
    end = tl.load(Offsets + s + 1)
    lo = tl.where(pattern == 0, 0, start)  # 0: SEGMENT_CAUSAL, 1: SEGMENT_DIAGONAL
    return lo, end


@triton.jit
def _key_query_range(Offsets, n_seg, pattern, block_size, cols):
    """[lo, hi): query rows that see each key (the transpose of _row_key_range)."""
    s = _segment_of(Offsets, n_seg, cols)
    start = tl.load(Offsets + s)
    end = tl.load(Offsets + s + 1)
    hi = tl.where(pattern == 0, tl.load(Offsets + n_seg), end)
    return start, hi


@triton.jit
def _interior_blocks(span_start, span_end, full_lo, full_hi, BLOCK: tl.constexpr):
    """Blocks [span_start + t * BLOCK) for t < n cover the span; blocks t in [t_a, t_b) lie inside
    [full_lo, full_hi), the part every valid row (or key) of the tile sees, and need no element mask."""
    n = (span_end - span_start + BLOCK - 1) // BLOCK
    t_a = tl.minimum(tl.maximum((full_lo - span_start + BLOCK - 1) // BLOCK, 0), n)
    t_b = tl.maximum(tl.minimum((full_hi - span_start) // BLOCK, n), t_a)
    return t_a, t_b, n


@triton.jit
def _load_tile(ptrs, idx_ok, d_ok, MASK_IDX: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile, masking only what can be out of range (unmasked loads vectorise)."""
    if MASK_IDX:
        if EVEN_D:
            x = tl.load(ptrs, mask=idx_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=idx_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_step(acc, l_i, m_i, q, K_base, V_base, stride_kl, stride_kd, stride_vl, stride_vd, start_n,
              k_end, lo, hi, offs_d, d_ok, qk_scale, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
              MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < k_end
    k = _load_tile(K_base + cols[:, None] * stride_kl + offs_d[None, :] * stride_kd, col_ok, d_ok,
                   MASKED, EVEN_D)
    v = _load_tile(V_base + cols[:, None] * stride_vl + offs_d[None, :] * stride_vd, col_ok, d_ok,
                   MASKED, EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        visible = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=_VARYING)
def _fwd_kernel(Q, K, V, Out, Lse, Offsets, Tiles,
                stride_qb, stride_ql, stride_qh, stride_qd,
                stride_kb, stride_kl, stride_kh, stride_kd,
                stride_vb, stride_vl, stride_vh, stride_vd,
                stride_ob, stride_ol, stride_oh, stride_od,
                stride_lb, stride_lh, stride_ll,
                n_heads, group, n_seg, pattern, block_size, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    hk = h // group
    q_start = tl.load(Tiles + tile * 4)
    q_end = tl.load(Tiles + tile * 4 + 1)
    k_start = tl.load(Tiles + tile * 4 + 2)
    k_end = tl.load(Tiles + tile * 4 + 3)

    rows = q_start + tl.arange(0, BLOCK_M)
    row_ok = rows < q_end
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _load_tile(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                   row_ok, d_ok, True, EVEN_D)

    lo, hi = _row_key_range(Offsets, n_seg, pattern, block_size, rows)
    lo = tl.where(row_ok, lo, 0)  # padding rows see nothing
    hi = tl.where(row_ok, hi, 0)
    full_lo = tl.max(tl.where(row_ok, lo, 0), 0)
    full_hi = tl.min(tl.where(row_ok, hi, k_end), 0)
    t_a, t_b, n_blocks = _interior_blocks(k_start, k_end, full_lo, full_hi, BLOCK_N)

    K_base = K + b * stride_kb + hk * stride_kh
    V_base = V + b * stride_vb + hk * stride_vh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for t in range(0, t_a):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K_base, V_base, stride_kl, stride_kd, stride_vl, stride_vd,
                                  k_start + t * BLOCK_N, k_end, lo, hi, offs_d, d_ok, qk_scale, BLOCK_N,
                                  EVEN_D, True, DOT_PRECISION)
    for t in range(t_a, t_b):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K_base, V_base, stride_kl, stride_kd, stride_vl, stride_vd,
                                  k_start + t * BLOCK_N, k_end, lo, hi, offs_d, d_ok, qk_scale, BLOCK_N,
                                  EVEN_D, False, DOT_PRECISION)
    for t in range(t_b, n_blocks):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K_base, V_base, stride_kl, stride_kd, stride_vl, stride_vd,
                                  k_start + t * BLOCK_N, k_end, lo, hi, offs_d, d_ok, qk_scale, BLOCK_N,
                                  EVEN_D, True, DOT_PRECISION)

    # Rows that saw no key: out 0, lse -inf.
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, float("-inf"))
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
    o = _load_tile(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_ol + offs_d[None, :] * stride_od,
                   row_ok, d_ok, True, HEAD_DIM == BLOCK_D)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dol
                    + offs_d[None, :] * stride_dod, row_ok, d_ok, True, HEAD_DIM == BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + b * stride_deb + h * stride_deh + rows, delta, mask=row_ok)


@triton.jit
def _bwd_dkdv_step(dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base, stride_ql, stride_qd, stride_dol,
                   stride_dod, stride_ll, start_m, q_end, q_lo, q_hi, offs_d, d_ok, qk_scale, BLOCK_M: tl.constexpr,
                   EVEN_D: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < q_end
    q = _load_tile(Q_base + rows[:, None] * stride_ql + offs_d[None, :] * stride_qd, row_ok, d_ok, MASKED, EVEN_D)
    do = _load_tile(DO_base + rows[:, None] * stride_dol + offs_d[None, :] * stride_dod, row_ok, d_ok, MASKED,
                    EVEN_D)
    if MASKED:
        lse2 = tl.load(Lse_base + rows * stride_ll, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(Delta_base + rows, mask=row_ok, other=0.0)
    else:
        lse2 = tl.load(Lse_base + rows * stride_ll) * 1.4426950408889634
        delta = tl.load(Delta_base + rows)
    # Transposed scores (keys x queries), so dK and dV come out of plain dots without transposing P.
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
    p_t = tl.math.exp2(s_t - lse2[None, :])
    if MASKED:
        # Rows outside a key's query range (padding rows, rows with lse = -inf included) get p = 0.
        visible = (rows[None, :] >= q_lo[:, None]) & (rows[None, :] < q_hi[:, None])
        p_t = tl.where(visible, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_VARYING)
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, Lse, Delta, Offsets, Tiles,
                     stride_qb, stride_ql, stride_qh, stride_qd,
                     stride_kb, stride_kl, stride_kh, stride_kd,
                     stride_vb, stride_vl, stride_vh, stride_vd,
                     stride_dob, stride_dol, stride_doh, stride_dod,
                     stride_dkb, stride_dkl, stride_dkh, stride_dkd,
                     stride_dvb, stride_dvl, stride_dvh, stride_dvd,
                     stride_lb, stride_lh, stride_ll, stride_deb, stride_deh,
                     n_kv_heads, group, n_seg, pattern, block_size, qk_scale, scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    tile = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // n_kv_heads).to(tl.int64)
    hk = bhk % n_kv_heads
    k_start = tl.load(Tiles + tile * 4)
    k_end = tl.load(Tiles + tile * 4 + 1)
    q_start = tl.load(Tiles + tile * 4 + 2)
    q_end = tl.load(Tiles + tile * 4 + 3)

    cols = k_start + tl.arange(0, BLOCK_N)
    col_ok = cols < k_end
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k = _load_tile(K + b * stride_kb + hk * stride_kh + cols[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                   col_ok, d_ok, True, EVEN_D)
    v = _load_tile(V + b * stride_vb + hk * stride_vh + cols[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                   col_ok, d_ok, True, EVEN_D)

    # Transposed ranges per key, computed once; padding keys are seen by nobody.
    q_lo, q_hi = _key_query_range(Offsets, n_seg, pattern, block_size, cols)
    q_lo = tl.where(col_ok, q_lo, 0)
    q_hi = tl.where(col_ok, q_hi, 0)
    full_lo = tl.max(tl.where(col_ok, q_lo, 0), 0)
    full_hi = tl.min(tl.where(col_ok, q_hi, q_end), 0)
    t_a, t_b, n_blocks = _interior_blocks(q_start, q_end, full_lo, full_hi, BLOCK_M)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, group):
        h = hk * group + g
        Q_base = Q + b * stride_qb + h * stride_qh
        DO_base = DO + b * stride_dob + h * stride_doh
        Lse_base = Lse + b * stride_lb + h * stride_lh
        Delta_base = Delta + b * stride_deb + h * stride_deh
        for t in range(0, t_a):
            dk, dv = _bwd_dkdv_step(dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base, stride_ql, stride_qd,
                                    stride_dol, stride_dod, stride_ll, q_start + t * BLOCK_M, q_end, q_lo, q_hi, offs_d,
                                    d_ok, qk_scale, BLOCK_M, EVEN_D, True, DOT_PRECISION)
        for t in range(t_a, t_b):
            dk, dv = _bwd_dkdv_step(dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base, stride_ql, stride_qd,
                                    stride_dol, stride_dod, stride_ll, q_start + t * BLOCK_M, q_end, q_lo, q_hi, offs_d,
                                    d_ok, qk_scale, BLOCK_M, EVEN_D, False, DOT_PRECISION)
        for t in range(t_b, n_blocks):
            dk, dv = _bwd_dkdv_step(dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base, stride_ql, stride_qd,
                                    stride_dol, stride_dod, stride_ll, q_start + t * BLOCK_M, q_end, q_lo, q_hi, offs_d,
                                    d_ok, qk_scale, BLOCK_M, EVEN_D, True, DOT_PRECISION)

    out_mask = col_ok[:, None] & d_ok[None, :]
    tl.store(DK + b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dkl + offs_d[None, :] * stride_dkd,
             (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + cols[:, None] * stride_dvl + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _bwd_dq_step(dq, q, do, lse2, delta, K_base, V_base, stride_kl, stride_kd, stride_vl, stride_vd, start_n,
                 k_end, lo, hi, offs_d, d_ok, qk_scale, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
                 MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < k_end
    k = _load_tile(K_base + cols[:, None] * stride_kl + offs_d[None, :] * stride_kd, col_ok, d_ok,
                   MASKED, EVEN_D)
    v = _load_tile(V_base + cols[:, None] * stride_vl + offs_d[None, :] * stride_vd, col_ok, d_ok,
                   MASKED, EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    p = tl.math.exp2(s - lse2[:, None])
    if MASKED:
        visible = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=_VARYING)
def _bwd_dq_kernel(Q, K, V, DO, DQ, Lse, Delta, Offsets, Tiles,
                   stride_qb, stride_ql, stride_qh, stride_qd,
                   stride_kb, stride_kl, stride_kh, stride_kd,
                   stride_vb, stride_vl, stride_vh, stride_vd,
                   stride_dob, stride_dol, stride_doh, stride_dod,
                   stride_dqb, stride_dql, stride_dqh, stride_dqd,
                   stride_lb, stride_lh, stride_ll, stride_deb, stride_deh,
                   n_heads, group, n_seg, pattern, block_size, qk_scale, scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    hk = h // group
    q_start = tl.load(Tiles + tile * 4)
    q_end = tl.load(Tiles + tile * 4 + 1)
    k_start = tl.load(Tiles + tile * 4 + 2)
    k_end = tl.load(Tiles + tile * 4 + 3)

    rows = q_start + tl.arange(0, BLOCK_M)
    row_ok = rows < q_end
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _load_tile(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                   row_ok, d_ok, True, EVEN_D)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dol
                    + offs_d[None, :] * stride_dod, row_ok, d_ok, True, EVEN_D)
    lse2 = tl.load(Lse + b * stride_lb + h * stride_lh + rows * stride_ll, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + b * stride_deb + h * stride_deh + rows, mask=row_ok, other=0.0)

    lo, hi = _row_key_range(Offsets, n_seg, pattern, block_size, rows)
    lo = tl.where(row_ok, lo, 0)
    hi = tl.where(row_ok, hi, 0)
    full_lo = tl.max(tl.where(row_ok, lo, 0), 0)
    full_hi = tl.min(tl.where(row_ok, hi, k_end), 0)
    t_a, t_b, n_blocks = _interior_blocks(k_start, k_end, full_lo, full_hi, BLOCK_N)

    K_base = K + b * stride_kb + hk * stride_kh
    V_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for t in range(0, t_a):
        dq = _bwd_dq_step(dq, q, do, lse2, delta, K_base, V_base, stride_kl, stride_kd, stride_vl, stride_vd,
                          k_start + t * BLOCK_N, k_end, lo, hi, offs_d, d_ok, qk_scale, BLOCK_N, EVEN_D, True,
                          DOT_PRECISION)
    for t in range(t_a, t_b):
        dq = _bwd_dq_step(dq, q, do, lse2, delta, K_base, V_base, stride_kl, stride_kd, stride_vl, stride_vd,
                          k_start + t * BLOCK_N, k_end, lo, hi, offs_d, d_ok, qk_scale, BLOCK_N, EVEN_D, False,
                          DOT_PRECISION)
    for t in range(t_b, n_blocks):
        dq = _bwd_dq_step(dq, q, do, lse2, delta, K_base, V_base, stride_kl, stride_kd, stride_vl, stride_vd,
                          k_start + t * BLOCK_N, k_end, lo, hi, offs_d, d_ok, qk_scale, BLOCK_N, EVEN_D, True,
                          DOT_PRECISION)

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


# GPU tables, keyed by (head-dim bucket, element size); PLACEHOLDER: tuned by the static check.
_FWD_GPU = {}
_DKDV_GPU = {}
_DQ_GPU = {}
_DELTA_BLOCK_M = 64  # the delta preprocess is a row reduction: any tile height works, 64 rows is plenty
_DELTA_WARPS = 4

# The interpreter runs on CPU tensors one program at a time: small tiles keep tests fast and exercise
# packing, splitting and the masked/unmasked block paths on short sequences.
_INTERP_FWD = _Config(32, 16, 4, 1)
_INTERP_BWD = _Config(16, 32, 4, 1)
_INTERP_DQ = _Config(32, 16, 4, 1)

_HEAD_DIM_BUCKETS = (64, 128, 256)


def _bucket(head_dim):
    for b in _HEAD_DIM_BUCKETS:
        if head_dim <= b:
            return b
    raise ValueError(f"interval attention (triton): head_dim {head_dim} > 256 is not supported")


def _interpreted(device):
    return torch.device(device).type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _fwd_config(head_dim, dtype, device):
    if _interpreted(device):
        return _INTERP_FWD
    return _FWD_GPU[(_bucket(head_dim), torch.finfo(dtype).bits)]


def _dkdv_config(head_dim, dtype, device):
    if _interpreted(device):
        return _INTERP_BWD
    return _DKDV_GPU[(_bucket(head_dim), torch.finfo(dtype).bits)]


def _dq_config(head_dim, dtype, device):
    if _interpreted(device):
        return _INTERP_DQ
    return _DQ_GPU[(_bucket(head_dim), torch.finfo(dtype).bits)]


def fwd_blocks(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the forward; q_tiles must be built with this BLOCK_M."""
    cfg = _fwd_config(head_dim, dtype, device)
    return cfg.block_m, cfg.block_n


def bwd_blocks(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M of the dQ pass, defining dq_tiles; BLOCK_N of the dK/dV pass, defining k_tiles)."""
    return _dq_config(head_dim, dtype, device).block_m, _dkdv_config(head_dim, dtype, device).block_n


def _dot_precision(dtype):
    # fp32 inputs: exact fp32 products (FMA), not tf32. Ignored for 16-bit inputs.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_pattern(pattern):
    if pattern not in (SEGMENT_CAUSAL, SEGMENT_DIAGONAL):
        raise ValueError(f"interval attention (triton): unsupported pattern id {pattern}")


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def interval_attn_fwd(q, k, v, offsets, q_tiles, pattern: int, block_size: int, scale: float):
    """out (B, L, H, D) in q.dtype and lse (B, H, L) float32; q_tiles from tiling.q_tiles with
    fwd_blocks()[0]. Inputs may have any strides."""
    _check_pattern(pattern)
    B, L, H, D = q.shape
    out = torch.empty((B, L, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    n_tiles = q_tiles.shape[0]
    if n_tiles == 0 or B * H == 0:
        return out, lse
    cfg = _fwd_config(D, q.dtype, q.device)
    _fwd_kernel[(n_tiles, B * H)](
        q, k, v, out, lse, offsets, q_tiles,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        H, H // k.shape[2], offsets.numel() - 1, pattern, block_size, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def interval_attn_bwd(grad_out, q, k, v, out, lse, offsets, dq_tiles, k_tiles, pattern: int,
                      block_size: int, scale: float):
    """(dq, dk, dv) shaped and strided like (q, k, v); dq_tiles / k_tiles from tiling.q_tiles /
    tiling.k_tiles with bwd_blocks()."""
    _check_pattern(pattern)
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

    common = (n_seg, pattern, block_size, scale * LOG2E, scale)
    cfg = _dkdv_config(D, q.dtype, q.device)
    _bwd_dkdv_kernel[(k_tiles.shape[0], B * Hkv)](
        q, k, v, grad_out, dk, dv, lse, delta, offsets, k_tiles,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        *lse.stride(), delta.stride(0), delta.stride(1), Hkv, group, *common,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    cfg = _dq_config(D, q.dtype, q.device)
    _bwd_dq_kernel[(dq_tiles.shape[0], B * H)](
        q, k, v, grad_out, dq, lse, delta, offsets, dq_tiles,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        *lse.stride(), delta.stride(0), delta.stride(1), H, group, *common,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq, dk, dv
