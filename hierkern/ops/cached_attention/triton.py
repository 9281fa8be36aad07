"""Triton kernels for cached attention (queries over the first kv_len rows of a K/V cache, no mask).

Rows are packed per GQA group: packed row p of kv head hk is query p // G of head hk * G + p % G, so
one K/V tile serves every head that shares it and a decode step (q_len 1) still fills a 16-row dot.

Kernels
  _fwd_kernel      grid (row tiles, splits, B*Hkv). Online softmax over the keys of one split. With
                   SPLIT the program writes its normalised partial out (float32) and lse to a
                   scratch buffer; otherwise out and lse directly.
  _combine_kernel  grid (row tiles, B*Hkv): merges the splits' partials by their lse.
  _bwd_dkdv_kernel grid (key tiles, B*Hkv): dK, dV of one key tile over every packed row (no atomics).
  _bwd_dq_kernel   grid (row tiles, B*Hkv): dQ of one row tile over all keys.
  The delta preprocess (rowsum(dO * O)) is the interval-attention kernel's (BSHD in, (B, H, L) out).

Short queries (q_len <= 64, decode-like) use the split-KV path: a small row tile and several programs
per (batch, kv head) over key chunks, so a decode step fills the GPU. Longer queries use large tiles.

qk_norm (cos attention) is fused without normalised copies of the tiles: q_hat = q * rq (rq = exp(min(
t[h], ln 100)) / |q| per row) and k_hat = k * ck (ck = 1 / |k| per key) enter only as row / column
scales of the raw score tile, s = (q k^T) * rq * ck, and of dS in the backward (dQ_hat = (dS * ck) K,
dK_hat = (dS * rq)^T Q). The dots read the tiles as loaded: a normalised float32 copy of a K tile in
registers spilled. The backward returns the gradients w.r.t. q_hat and k_hat (chain rule in op.py).

Scores stay in natural-log units (exp2 of (s - m) * log2 e): the backward recomputes P as
exp(s - lse) from the stored lse, and with qk_norm logits reach 100, where pre-scaling the scores by
log2 e before the subtraction would add two roundings at that magnitude to every P.

kv_len, q_len, the split chunk and the lse/delta strides are never specialised: a new length never
triggers a recompile (a decode loop calls with kv_len + 1 every step).
"""
import math

import torch
import triton
import triton.language as tl

from .._aot import UNIT, aot_entry
from ..attention.triton import (_HEAD_DIM_BUCKETS, _TRITON_DTYPE, _UNIT_STRIDES, _Config, _bucket, _bwd_delta_kernel, _dot_precision,
                                _interpreted, _load_cols, _load_rows)
from ..attention.cos_attention import MAX_LOG_MULTIPLIER as MAX_LOG_MULT, NORM_EPS

LOG2E = math.log2(math.e)
_LOG2E: tl.constexpr = tl.constexpr(LOG2E)
_MAX_LOG_MULT: tl.constexpr = tl.constexpr(MAX_LOG_MULT)
_EPS: tl.constexpr = tl.constexpr(NORM_EPS)

_VARYING = ["q_len", "kv_len", "chunk", "stride_lb", "stride_lh", "stride_deb", "stride_deh"]


# ----------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _packed_rows(start, q_len, hk, group, BLOCK_M: tl.constexpr):
    """(packed row ids, valid mask, query index, head index) of a row tile."""
    p = start + tl.arange(0, BLOCK_M)
    return p, p < q_len * group, p // group, hk * group + p % group


@triton.jit
def _inv_norm(x, AXIS: tl.constexpr):
    """1 / max(|x|, eps) along AXIS (the head dim), float32."""
    xf = x.to(tl.float32)
    return 1.0 / tl.maximum(tl.sqrt(tl.sum(xf * xf, AXIS)), _EPS)


@triton.jit
def _q_factor(q, Temp, h, row_ok, AXIS: tl.constexpr):
    """exp(min(t[h], ln 100)) / max(|q|, eps) per query row: q_hat = q * factor."""
    mult = tl.exp(tl.minimum(tl.load(Temp + h, mask=row_ok, other=0.0), _MAX_LOG_MULT))
    return mult * _inv_norm(q, AXIS)


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_VARYING)
def _fwd_kernel(Q, K, V, Temp, Out, Lse, PartO, PartLse,
                stride_qb, stride_ql, stride_qh, stride_qd,
                stride_kb, stride_kl, stride_kh, stride_kd,
                stride_vb, stride_vl, stride_vh, stride_vd,
                stride_ob, stride_ol, stride_oh, stride_od,
                stride_lb, stride_lh, stride_ll,
                n_kv_heads, group, q_len, kv_len, chunk, scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                QK_NORM: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    split = tl.program_id(1)
    bhk = tl.program_id(2)
    b = (bhk // n_kv_heads).to(tl.int64)
    hk = bhk % n_kv_heads
    p, row_ok, qi, h = _packed_rows(tl.program_id(0) * BLOCK_M, q_len, hk, group, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _load_rows(Q + b * stride_qb + qi[:, None] * stride_ql + h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                   row_ok, d_ok, EVEN_D)
    if QK_NORM:
        q_fac = _q_factor(q, Temp, h, row_ok, 1) * scale

    K_base = K + b * stride_kb + hk * stride_kh
    V_base = V + b * stride_vb + hk * stride_vh
    k_start = split * chunk
    k_end = tl.minimum(kv_len, k_start + chunk)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for start_n in range(k_start, k_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < k_end
        k_t = _load_cols(K_base + cols[None, :] * stride_kl + offs_d[:, None] * stride_kd, col_ok, d_ok, EVEN_D)
        v = _load_rows(V_base + cols[:, None] * stride_vl + offs_d[None, :] * stride_vd, col_ok, d_ok, EVEN_D)
        if QK_NORM:
            s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * q_fac[:, None] * _inv_norm(k_t, 0)[None, :]
        else:
            s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale
        if start_n + BLOCK_N > k_end:  # the chunk's last block: keys past its end must not count
            s = tl.where(col_ok[None, :], s, float("-inf"))
        # Every block holds a valid key, so m_new is finite and no row needs a -inf guard.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p_ij = tl.math.exp2((s - m_new[:, None]) * _LOG2E)
        alpha = tl.math.exp2((m_i - m_new) * _LOG2E)
        l_i = l_i * alpha + tl.sum(p_ij, 1)
        acc = acc * alpha[:, None] + tl.dot(p_ij.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    lse = m_i + tl.log(l_i)
    if SPLIT:
        row = (split * tl.num_programs(2) + bhk).to(tl.int64) * q_len * group + p
        tl.store(PartO + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(PartLse + row, lse, mask=row_ok)
    else:
        tl.store(Out + b * stride_ob + qi[:, None] * stride_ol + h[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(Lse + b * stride_lb + h * stride_lh + qi * stride_ll, lse, mask=row_ok)


@triton.jit(do_not_specialize=_VARYING + ["n_split"])
def _combine_kernel(PartO, PartLse, Out, Lse,
                    stride_ob, stride_ol, stride_oh, stride_od,
                    stride_lb, stride_lh, stride_ll,
                    n_kv_heads, group, q_len, n_split,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    bhk = tl.program_id(1)
    b = (bhk // n_kv_heads).to(tl.int64)
    hk = bhk % n_kv_heads
    p, row_ok, qi, h = _packed_rows(tl.program_id(0) * BLOCK_M, q_len, hk, group, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, n_split):
        row = (s * tl.num_programs(1) + bhk).to(tl.int64) * q_len * group + p
        lse = tl.load(PartLse + row, mask=row_ok, other=0.0)
        o = tl.load(PartO + row[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m_i, lse)
        alpha = tl.exp(m_i - m_new)
        w = tl.exp(lse - m_new)
        acc = acc * alpha[:, None] + w[:, None] * o
        l_i = l_i * alpha + w
        m_i = m_new
    tl.store(Out + b * stride_ob + qi[:, None] * stride_ol + h[:, None] * stride_oh + offs_d[None, :] * stride_od,
             (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=mask)
    tl.store(Lse + b * stride_lb + h * stride_lh + qi * stride_ll, m_i + tl.log(l_i), mask=row_ok)


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_VARYING)
def _bwd_dkdv_kernel(Q, K, V, Temp, DO, DK, DV, Lse, Delta,
                     stride_qb, stride_ql, stride_qh, stride_qd,
                     stride_kb, stride_kl, stride_kh, stride_kd,
                     stride_vb, stride_vl, stride_vh, stride_vd,
                     stride_dob, stride_dol, stride_doh, stride_dod,
                     stride_dkb, stride_dkl, stride_dkh, stride_dkd,
                     stride_dvb, stride_dvl, stride_dvh, stride_dvd,
                     stride_lb, stride_lh, stride_ll, stride_deb, stride_deh,
                     n_kv_heads, group, q_len, kv_len, scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     QK_NORM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    bhk = tl.program_id(1)
    b = (bhk // n_kv_heads).to(tl.int64)
    hk = bhk % n_kv_heads
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < kv_len
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k = _load_rows(K + b * stride_kb + hk * stride_kh + cols[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                   col_ok, d_ok, EVEN_D)
    if QK_NORM:
        k_fac = _inv_norm(k, 1) * scale
    v = _load_rows(V + b * stride_vb + hk * stride_vh + cols[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                   col_ok, d_ok, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, q_len * group, BLOCK_M):
        p, row_ok, qi, h = _packed_rows(start_m, q_len, hk, group, BLOCK_M)
        q_t = _load_cols(Q + b * stride_qb + qi[None, :] * stride_ql + h[None, :] * stride_qh
                         + offs_d[:, None] * stride_qd, row_ok, d_ok, EVEN_D)
        do = _load_rows(DO + b * stride_dob + qi[:, None] * stride_dol + h[:, None] * stride_doh
                        + offs_d[None, :] * stride_dod, row_ok, d_ok, EVEN_D)
        lse = tl.load(Lse + b * stride_lb + h * stride_lh + qi * stride_ll, mask=row_ok, other=0.0)
        delta = tl.load(Delta + b * stride_deb + h * stride_deh + qi, mask=row_ok, other=0.0)
        if QK_NORM:
            q_fac = _q_factor(q_t, Temp, h, row_ok, 0)
            s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * k_fac[:, None] * q_fac[None, :]
        else:
            s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * scale
        # Padding rows (q = 0, lse = 0) would give p = 1: zero them.
        p_t = tl.where(row_ok[None, :], tl.math.exp2((s_t - lse[None, :]) * _LOG2E), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if QK_NORM:  # dK_hat = dS^T Q_hat, with Q_hat = Q * q_fac
            ds_t = ds_t * q_fac[None, :]
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)

    out_mask = col_ok[:, None] & d_ok[None, :]
    tl.store(DK + b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dkl + offs_d[None, :] * stride_dkd,
             (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + cols[:, None] * stride_dvl + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=_VARYING)
def _bwd_dq_kernel(Q, K, V, Temp, DO, DQ, Lse, Delta,
                   stride_qb, stride_ql, stride_qh, stride_qd,
                   stride_kb, stride_kl, stride_kh, stride_kd,
                   stride_vb, stride_vl, stride_vh, stride_vd,
                   stride_dob, stride_dol, stride_doh, stride_dod,
                   stride_dqb, stride_dql, stride_dqh, stride_dqd,
                   stride_lb, stride_lh, stride_ll, stride_deb, stride_deh,
                   n_kv_heads, group, q_len, kv_len, scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   QK_NORM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    bhk = tl.program_id(1)
    b = (bhk // n_kv_heads).to(tl.int64)
    hk = bhk % n_kv_heads
    p, row_ok, qi, h = _packed_rows(tl.program_id(0) * BLOCK_M, q_len, hk, group, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _load_rows(Q + b * stride_qb + qi[:, None] * stride_ql + h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                   row_ok, d_ok, EVEN_D)
    if QK_NORM:
        q_fac = _q_factor(q, Temp, h, row_ok, 1) * scale
    do = _load_rows(DO + b * stride_dob + qi[:, None] * stride_dol + h[:, None] * stride_doh
                    + offs_d[None, :] * stride_dod, row_ok, d_ok, EVEN_D)
    lse = tl.load(Lse + b * stride_lb + h * stride_lh + qi * stride_ll, mask=row_ok, other=0.0)
    delta = tl.load(Delta + b * stride_deb + h * stride_deh + qi, mask=row_ok, other=0.0)
    K_base = K + b * stride_kb + hk * stride_kh
    V_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, kv_len, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < kv_len
        k_t = _load_cols(K_base + cols[None, :] * stride_kl + offs_d[:, None] * stride_kd, col_ok, d_ok, EVEN_D)
        v_t = _load_cols(V_base + cols[None, :] * stride_vl + offs_d[:, None] * stride_vd, col_ok, d_ok, EVEN_D)
        if QK_NORM:
            k_fac = _inv_norm(k_t, 0)
            s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * q_fac[:, None] * k_fac[None, :]
        else:
            s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale
        # Keys past kv_len read 0, which would give p = exp(-lse) > 0: zero them.
        p_ij = tl.where(col_ok[None, :], tl.math.exp2((s - lse[:, None]) * _LOG2E), 0.0)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        ds = p_ij * (dp - delta[:, None])
        if QK_NORM:  # dQ_hat = dS K_hat, with K_hat = K * k_fac
            ds = ds * k_fac[None, :]
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)
    tl.store(DQ + b * stride_dqb + qi[:, None] * stride_dql + h[:, None] * stride_dqh + offs_d[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------------
DECODE_MAX_Q_LEN = 64  # q_len at or below this takes the split-KV path

# GPU tables keyed by (head-dim bucket, dtype bits); every entry compiles spill-free for sm_80 and
# sm_90 (tests/static_gpu_check.py). fp32 runs exact ieee dots (FMA), hence smaller tiles.
# Split-KV (decode) tiles are 16 rows on purpose: a decode step has q_len * G rows (often 1-16), and a
# 64-row wgmma tile would be mostly padding. Triton lowers M=16 dots to mma.sync on both archs, which
# is why these entries are checked for mma (not wgmma) on sm_90.
_DECODE_GPU = {
    (64, 16): _Config(16, 64, 4, 3),
    (128, 16): _Config(16, 64, 4, 3),
    (256, 16): _Config(16, 64, 4, 2),
    (64, 32): _Config(16, 32, 4, 2),
    (128, 32): _Config(16, 32, 4, 2),
    (256, 32): _Config(16, 16, 4, 2),
}
_TILED_GPU = {
    (64, 16): _Config(128, 64, 8, 3),
    (128, 16): _Config(128, 32, 8, 2),
    (256, 16): _Config(64, 64, 8, 2),
    (64, 32): _Config(64, 32, 8, 2),
    (128, 32): _Config(32, 16, 4, 2),
    (256, 32): _Config(16, 16, 4, 2),
}
# dK/dV: block_n is the key tile, block_m the packed-row block it steps through.
_DKDV_GPU = {
    (64, 16): _Config(32, 64, 4, 1),
    (128, 16): _Config(32, 64, 8, 2),
    (256, 16): _Config(16, 32, 8, 1),  # see _WGMMA_EXEMPT
    (64, 32): _Config(16, 32, 4, 2),
    (128, 32): _Config(16, 16, 8, 1),
    (256, 32): _Config(16, 16, 8, 1),
}
_DQ_GPU = {
    (64, 16): _Config(64, 32, 4, 2),
    (128, 16): _Config(64, 64, 8, 2),
    (256, 16): _Config(64, 32, 8, 2),
    (64, 32): _Config(32, 32, 4, 2),
    (128, 32): _Config(16, 32, 8, 2),
    (256, 32): _Config(32, 16, 8, 1),
}
# Entries whose 16-bit dots run on mma.sync rather than wgmma on sm_90, and why (checked as such).
_DECODE_EXEMPT = ("split-KV decode tile: 16 rows by design (q_len * G is 1-16 in decode); wgmma needs 64, "
                  "so its dots are checked for mma.sync on sm_90 too")
_WGMMA_EXEMPT = {
    ("dkdv", 256): "d256 dK/dV: with 64-key tiles (wgmma) the dK and dV float32 accumulators plus the K/V "
                   "tiles exceed 255 registers and spill at 4 or 8 warps; 32-key tiles run on mma.sync",
}
_COMBINE_BLOCK_M, _COMBINE_WARPS = 16, 4  # an elementwise merge: no dot, any tile works
_DELTA_BLOCK_M, _DELTA_WARPS = 64, 4

# The interpreter runs one program at a time on CPU tensors: tiny tiles keep tests fast and exercise
# several row tiles, key blocks and splits on short inputs.
_INTERP = {"decode": _Config(16, 16, 4, 1), "tiled": _Config(32, 16, 4, 1), "dkdv": _Config(16, 16, 4, 1),
           "dq": _Config(16, 16, 4, 1)}
_TABLES = {"decode": _DECODE_GPU, "tiled": _TILED_GPU, "dkdv": _DKDV_GPU, "dq": _DQ_GPU}
def _config(kind, head_dim, dtype, device):
    if _interpreted(device):
        return _INTERP[kind]
    return _TABLES[kind][(_bucket(head_dim), torch.finfo(dtype).bits)]


def _n_programs_target(device):
    """Programs that fill the device twice over; under the interpreter a small number, so the tests'
    tiny shapes still take the split path."""
    if _interpreted(device):
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def split_plan(num_splits, programs, kv_len, block_n, device):
    """(n_split, chunk): key chunks of whole BLOCK_N blocks, each non-empty. num_splits > 0 forces a
    count (capped by the number of blocks); 0 picks enough to fill the device."""
    n_blocks = triton.cdiv(kv_len, block_n)
    n = num_splits if num_splits > 0 else triton.cdiv(_n_programs_target(device), programs)
    n = max(1, min(n, n_blocks))
    chunk = triton.cdiv(n_blocks, n) * block_n
    return triton.cdiv(kv_len, chunk), chunk


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def cached_attn_fwd(q, k_cache, v_cache, temperature, kv_len: int, qk_norm: bool, scale: float, num_splits: int):
    """out (B, Lq, H, D) in q.dtype and lse (B, H, Lq) float32. Inputs may have any strides."""
    B, Lq, H, D = q.shape
    Hk = k_cache.shape[2]
    group = H // Hk
    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    cfg = _config("decode" if Lq <= DECODE_MAX_Q_LEN else "tiled", D, q.dtype, q.device)
    n_row_tiles = triton.cdiv(Lq * group, cfg.block_m)
    auto = num_splits if num_splits > 0 else (0 if Lq <= DECODE_MAX_Q_LEN else 1)
    n_split, chunk = split_plan(auto, n_row_tiles * B * Hk, kv_len, cfg.block_n, q.device)
    block_d = triton.next_power_of_2(D)
    temp = temperature if qk_norm else lse  # never read without qk_norm
    part_o = part_lse = lse  # placeholders, never written without SPLIT
    if n_split > 1:
        part_o = torch.empty((n_split, B * Hk, Lq * group, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((n_split, B * Hk, Lq * group), dtype=torch.float32, device=q.device)
    _fwd_kernel[(n_row_tiles, n_split, B * Hk)](
        q, k_cache, v_cache, temp, out, lse, part_o, part_lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), *lse.stride(),
        Hk, group, Lq, kv_len, chunk, scale,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, QK_NORM=qk_norm,
        SPLIT=n_split > 1, DOT_PRECISION=_dot_precision(q.dtype), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    if n_split > 1:
        _combine_kernel[(triton.cdiv(Lq * group, _COMBINE_BLOCK_M), B * Hk)](
            part_o, part_lse, out, lse, *out.stride(), *lse.stride(), Hk, group, Lq, n_split,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=_COMBINE_BLOCK_M, num_warps=_COMBINE_WARPS, num_stages=1)
    return out, lse


def cached_attn_bwd(grad_out, q, k_cache, v_cache, temperature, out, lse, kv_len: int, qk_norm: bool,
                    scale: float):
    """(dq, dk_cache, dv_cache) shaped like (q, k_cache, v_cache); cache rows from kv_len on get 0.
    With qk_norm, dq / dk are float32 and w.r.t. the normalised q and k (see the module docstring)."""
    B, Lq, H, D = q.shape
    Hk = k_cache.shape[2]
    group = H // Hk
    gdtype = torch.float32 if qk_norm else q.dtype  # intermediates for op.prologue_backward
    dq = torch.empty_like(q, dtype=gdtype)
    dk = torch.empty_like(k_cache, dtype=gdtype)
    dv = torch.empty_like(v_cache)
    dk[:, kv_len:].zero_()
    dv[:, kv_len:].zero_()
    block_d = triton.next_power_of_2(D)
    precision = _dot_precision(q.dtype)
    temp = temperature if qk_norm else lse

    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(Lq, _DELTA_BLOCK_M), B * H)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), delta.stride(0), delta.stride(1), H, Lq,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=_DELTA_BLOCK_M, num_warps=_DELTA_WARPS, num_stages=1)

    common = (Hk, group, Lq, kv_len, scale)
    cfg = _config("dkdv", D, q.dtype, q.device)
    _bwd_dkdv_kernel[(triton.cdiv(kv_len, cfg.block_n), B * Hk)](
        q, k_cache, v_cache, temp, grad_out, dk, dv, lse, delta,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        *lse.stride(), delta.stride(0), delta.stride(1), *common,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, QK_NORM=qk_norm,
        DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    cfg = _config("dq", D, q.dtype, q.device)
    _bwd_dq_kernel[(triton.cdiv(Lq * group, cfg.block_m), B * Hk)](
        q, k_cache, v_cache, temp, grad_out, dq, lse, delta,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *grad_out.stride(), *dq.stride(),
        *lse.stride(), delta.stride(0), delta.stride(1), *common,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, QK_NORM=qk_norm,
        DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time configurations (tests/static_gpu_check.py compiles each for sm_80 and sm_90)
# ----------------------------------------------------------------------------------------------------
_F32_POINTERS = {"Temp", "Lse", "PartO", "PartLse", "Delta"}
def _aot_entry(name, kernel, dtype, constexprs, cfg, uses_dot, wgmma_exempt=None):
    f32_grads = constexprs.get("QK_NORM", False)  # dq / dk are float32 intermediates with qk_norm

    def classify(arg):
        if arg[0].isupper():  # torch allocations; Temp is a whole (H,) tensor
            f32 = arg in _F32_POINTERS or (f32_grads and arg in ("DQ", "DK"))
            return ("*fp32" if f32 else "*" + _TRITON_DTYPE[dtype]), True
        if arg in _UNIT_STRIDES:
            return UNIT
        if arg == "scale":
            return "fp32", False
        # row / head strides of BSHD tensors are multiples of head_dim
        return "i32", arg.startswith("stride_") and arg not in _VARYING
    return aot_entry(name, kernel, constexprs, classify, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                     uses_dot=uses_dot, wgmma_exempt=wgmma_exempt)


def aot_configs() -> list[dict]:
    """Every kernel configuration the GPU launchers can pick, in the format of
    hierkern.ops.attention.triton.aot_configs (plus an optional wgmma_exempt reason). `uses_dot` is
    false for fp32 (exact ieee FMA dots by design) and for the combine kernel (no dot)."""
    entries = []
    fwd_kinds = (("decode_split", "decode", True), ("decode", "decode", False), ("tiled", "tiled", False))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        bits = torch.finfo(dtype).bits
        tdt = _TRITON_DTYPE[dtype]
        for head_dim in _HEAD_DIM_BUCKETS + ((96,) if dtype == torch.float16 else ()):
            block_d = triton.next_power_of_2(head_dim)
            for qk_norm in (False, True):
                base = {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "QK_NORM": qk_norm,
                        "DOT_PRECISION": _dot_precision(dtype)}
                tag = f"{tdt}_d{head_dim}{'_qknorm' if qk_norm else ''}"
                for kname, table, split in fwd_kinds:
                    cfg = _TABLES[table][(_bucket(head_dim), bits)]
                    entries.append(_aot_entry(
                        f"cached_fwd_{kname}_{tag}", _fwd_kernel, dtype,
                        {**base, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "SPLIT": split}, cfg,
                        uses_dot=bits == 16, wgmma_exempt=_DECODE_EXEMPT if table == "decode" else None))
                for kname, kernel in (("dkdv", _bwd_dkdv_kernel), ("dq", _bwd_dq_kernel)):
                    cfg = _TABLES[kname][(_bucket(head_dim), bits)]
                    entries.append(_aot_entry(f"cached_{kname}_{tag}", kernel, dtype,
                                              {**base, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n}, cfg,
                                              uses_dot=bits == 16,
                                              wgmma_exempt=_WGMMA_EXEMPT.get((kname, _bucket(head_dim)))))
        entries.append(_aot_entry(f"cached_combine_{tdt}_d128", _combine_kernel, dtype,
                                  {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_M": _COMBINE_BLOCK_M},
                                  _Config(_COMBINE_BLOCK_M, 0, _COMBINE_WARPS, 1), uses_dot=False))
    return entries
