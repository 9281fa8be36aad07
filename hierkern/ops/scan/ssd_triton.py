"""Triton kernels for the SSD scan (hierkern.ssd_scan, Mamba-2), chunked as mamba-ssm does it, with the
matrix products on tensor cores (16-bit inputs), and their launchers.

Per (batch b, head h) the sequence is cut in chunks of Q steps (Q = the launcher's tile, not the
caller's chunk_size: chunk_size only blocks the computation, see hierkern.ssd_scan). Inside chunk c,
with dt already biased / softplus'ed and cum_i = sum_{t <= i} dt_t A (the decay from the chunk start):
    states_c  = sum_j exp(cum_last - cum_j) dt_j x_j B_j^T                    (p, n)
    S_in[c+1] = exp(cum_last) S_in[c] + states_c,   S_in[0] = initial_states
    y_i       = sum_{j <= i} (C_i . B_j) exp(cum_i - cum_j) dt_j x_j + exp(cum_i) S_in[c] C_i
    out       = (y + D x) * silu(z)
Kernels (forward)
  _chunk_state_kernel  grid (chunks, b*h): states_c = (x * w)^T B on tensor cores, w = dt exp(cum_last - cum);
                       also cum_last per chunk (the chunk's total decay, for the state passing).
  _state_pass_kernel   grid (state blocks, b*h): the sequential recurrence over chunks, overwriting
                       states_c with S_in[c] in place; writes final_states. No dot (exempt below).
  _chunk_out_kernel    grid (chunks, b*h): y from C B^T (masked by the decay matrix) times dt x and from
                       C S_in^T, both on tensor cores, then D and the z gate, in one pass.
Backward (recomputation: the forward's chunk states, and with z the gate's input y + D x, are recomputed
by the forward kernels above; autograd saves only the inputs)
  _dstate_local_kernel grid (chunks, b*h): chunk c's own pull on its entering state, (gy exp(cum))^T C.
  _dstate_pass_kernel  grid (state blocks, b*h): the adjoint recurrence from the last chunk back:
                       dS_out[c] (the gradient of the state leaving chunk c), d cum_last per chunk
                       (partial sums per state block) and dinitial_states.
  _chunk_bwd_kernel    grid (chunks, b*h, headdim blocks): the rest of one chunk's backward on the
                       headdim side: dx, dz, partial dD and the per-step sums behind ddt and dA (five
                       dots); the launcher finishes dt's gradient (the reverse cumsum of d cum, softplus').
  _chunk_bwd_bc_kernel grid (chunks, b*h, dstate blocks): its dstate side: this head's dB and dC (four
                       dots), summed over the heads of a group by the launcher.

Padded tails: the last chunk's steps t >= seqlen load x, B, C as 0 and get dt = 0 after bias and
softplus (softplus(bias) is not 0): decay 1 and no input, so the state passes through unchanged and
nothing NaN or stale is read; nothing is stored there.

Precision: float32 state, decays and accumulators. The dots take their operands in x's dtype (the
float32 states and decay-weighted tiles are rounded to it, as mamba-ssm does); float32 inputs take
ieee-precision products (FMA, not tensor cores: those only offer tf32 for float32 operands, whose
error would exceed the float32 reference's several-fold; the static check exempts those entries).
"""
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._aot import UNIT, aot_entry

# Never specialised: what changes with the sequence length (dt's batch stride is seqlen * nheads, whose
# divisibility by 16 would otherwise flip between calls), so scale-by-scale calls of any length reuse one
# compiled kernel. The other batch strides are multiples of headdim or dstate (64 / 128): left
# specialised, their alignment is what lets the tile loads vectorise.
_VARYING = ["seqlen", "n_chunks", "stride_dtb"]
_PASS_VARYING = ["n_chunks"]


@triton.jit
def _dt_cum(DT, Bias, A, dt_off, hi, t, t_ok, stride_dtl, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(dt after bias / softplus, 0 on the padded tail; the pre-softplus value; cum = cumsum(dt A))."""
    v = tl.load(DT + dt_off + t * stride_dtl, mask=t_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(Bias + hi)
    if SOFTPLUS:
        dt = tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))))
    else:
        dt = v
    dt = tl.where(t_ok, dt, 0.0)
    cum = tl.cumsum(dt * tl.load(A + hi), 0)
    return dt, v, cum


@triton.jit
def _tile(P, off, rows, rows_ok, stride_r, cols, cols_ok, stride_c):
    return tl.load(P + off + rows[:, None] * stride_r + cols[None, :] * stride_c,
                   mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)


@triton.jit
def _mm(a, b, DT: tl.constexpr, PREC: tl.constexpr):
    return tl.dot(a.to(DT), b.to(DT), input_precision=PREC)


@triton.jit(do_not_specialize=_VARYING)
def _chunk_state_kernel(X, DT, A, Bias, Bm, States, CumLast, seqlen, n_chunks, nheads, head_per_group, p, n,
                        stride_xb, stride_xl, stride_xh, stride_xp, stride_dtb, stride_dtl, stride_dth,
                        stride_bb, stride_bl, stride_bg, stride_bn,
                        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, Q: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    c, bh = tl.program_id(0), tl.program_id(1)
    bi, hi = bh // nheads, bh % nheads
    t = c * Q + tl.arange(0, Q)
    t_ok = t < seqlen
    pp, nn = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    dt, _, cum = _dt_cum(DT, Bias, A, bi.to(tl.int64) * stride_dtb + hi * stride_dth, hi, t, t_ok, stride_dtl,
                         HAS_BIAS, SOFTPLUS)
    cum_last = tl.sum(dt, 0) * tl.load(A + hi)
    w = dt * tl.exp(cum_last - cum)
    # x loaded transposed (p, Q) from memory: a register transpose feeding the dot costs registers.
    xt = _tile(X, bi.to(tl.int64) * stride_xb + hi * stride_xh, pp, pp < p, stride_xp, t, t_ok, stride_xl)
    b = _tile(Bm, bi.to(tl.int64) * stride_bb + (hi // head_per_group) * stride_bg, t, t_ok, stride_bl,
              nn, nn < n, stride_bn)
    st = _mm(xt.to(tl.float32) * w[None, :], b, X.dtype.element_ty, PREC)
    off = (bh.to(tl.int64) * n_chunks + c) * p * n
    tl.store(States + off + pp[:, None] * n + nn[None, :], st, mask=(pp < p)[:, None] & (nn < n)[None, :])
    tl.store(CumLast + bh.to(tl.int64) * n_chunks + c, cum_last)


@triton.jit(do_not_specialize=_PASS_VARYING)
def _state_pass_kernel(States, CumLast, Init, Final, n_chunks, pn, HAS_INIT: tl.constexpr, BLOCK: tl.constexpr):
    blk, bh = tl.program_id(0), tl.program_id(1)
    e = blk * BLOCK + tl.arange(0, BLOCK)
    e_ok = e < pn
    base = bh.to(tl.int64) * pn
    if HAS_INIT:
        s = tl.load(Init + base + e, mask=e_ok, other=0.0)
    else:
        s = tl.zeros((BLOCK,), tl.float32)
    for c in range(n_chunks):
        ptr = States + (bh.to(tl.int64) * n_chunks + c) * pn + e
        st = tl.load(ptr, mask=e_ok, other=0.0)
        tl.store(ptr, s, mask=e_ok)
        s = tl.exp(tl.load(CumLast + bh.to(tl.int64) * n_chunks + c)) * s + st
    tl.store(Final + base + e, s, mask=e_ok)


@triton.jit(do_not_specialize=_VARYING)
def _chunk_out_kernel(X, DT, A, Bias, Bm, Cm, Dp, Z, States, Out, seqlen, n_chunks, nheads, head_per_group, p, n,
                      stride_xb, stride_xl, stride_xh, stride_xp, stride_dtb, stride_dtl, stride_dth,
                      stride_bb, stride_bl, stride_bg, stride_bn, stride_cb, stride_cl, stride_cg, stride_cn,
                      stride_dh, stride_dp, stride_zb, stride_zl, stride_zh, stride_zp,
                      stride_ob, stride_ol, stride_oh, stride_op,
                      HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                      Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PREC: tl.constexpr):
    c, bh = tl.program_id(0), tl.program_id(1)
    bi, hi = bh // nheads, bh % nheads
    gi = hi // head_per_group
    t = c * Q + tl.arange(0, Q)
    t_ok = t < seqlen
    pp = tl.arange(0, BLOCK_P)
    p_ok = pp < p
    DTY: tl.constexpr = X.dtype.element_ty
    dt, _, cum = _dt_cum(DT, Bias, A, bi.to(tl.int64) * stride_dtb + hi * stride_dth, hi, t, t_ok, stride_dtl,
                         HAS_BIAS, SOFTPLUS)
    # The two products over dstate, C B^T (Q, Q) and C S_in^T (Q, p; S_in^T read straight from the (p, n)
    # state), in BLOCK_K-column steps (float32's FMA products spilled with all of dstate at once).
    s_off = (bh.to(tl.int64) * n_chunks + c) * p * n
    cb = tl.zeros((Q, Q), tl.float32)
    y_off = tl.zeros((Q, BLOCK_P), tl.float32)
    for k in tl.static_range(0, BLOCK_N, BLOCK_K):
        nn = k + tl.arange(0, BLOCK_K)
        n_ok = nn < n
        cm = _tile(Cm, bi.to(tl.int64) * stride_cb + gi * stride_cg, t, t_ok, stride_cl, nn, n_ok, stride_cn)
        bt = _tile(Bm, bi.to(tl.int64) * stride_bb + gi * stride_bg, nn, n_ok, stride_bn, t, t_ok, stride_bl)
        cb += _mm(cm, bt, DTY, PREC)
        y_off += _mm(cm, _tile(States, s_off, nn, n_ok, 1, pp, p_ok, n), DTY, PREC)
    x = _tile(X, bi.to(tl.int64) * stride_xb + hi * stride_xh, t, t_ok, stride_xl, pp, p_ok, stride_xp)
    causal = t[:, None] >= t[None, :]
    decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
    y = _mm(cb * decay * dt[None, :], x, DTY, PREC) + y_off * tl.exp(cum)[:, None]
    if HAS_D:
        y += tl.load(Dp + hi * stride_dh + pp * stride_dp, mask=p_ok, other=0.0)[None, :] * x.to(tl.float32)
    if HAS_Z:
        zz = _tile(Z, bi.to(tl.int64) * stride_zb + hi * stride_zh, t, t_ok, stride_zl, pp, p_ok, stride_zp)
        zz = zz.to(tl.float32)
        y = y * zz * tl.sigmoid(zz)
    o_ptr = Out + bi.to(tl.int64) * stride_ob + hi * stride_oh + t[:, None] * stride_ol + pp[None, :] * stride_op
    tl.store(o_ptr, y.to(Out.dtype.element_ty), mask=t_ok[:, None] & p_ok[None, :])


@triton.jit
def _gated_grad(G, Z, g_off, z_off, t, t_ok, pp, p_ok, stride_gl, stride_gp, stride_zl, stride_zp,
                HAS_Z: tl.constexpr):
    """(grad_out * silu(z) (the gradient of y, before D and the gate), z (float32; 0 without z))."""
    g = _tile(G, g_off, t, t_ok, stride_gl, pp, p_ok, stride_gp).to(tl.float32)
    if HAS_Z:
        zz = _tile(Z, z_off, t, t_ok, stride_zl, pp, p_ok, stride_zp).to(tl.float32)
        return g * zz * tl.sigmoid(zz), zz
    return g, g * 0.0


@triton.jit(do_not_specialize=_VARYING)
def _dstate_local_kernel(G, Z, DT, A, Bias, Cm, DStates, seqlen, n_chunks, nheads, head_per_group, p, n,
                         stride_gb, stride_gl, stride_gh, stride_gp, stride_zb, stride_zl, stride_zh, stride_zp,
                         stride_dtb, stride_dtl, stride_dth, stride_cb, stride_cl, stride_cg, stride_cn,
                         HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, Q: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    c, bh = tl.program_id(0), tl.program_id(1)
    bi, hi = bh // nheads, bh % nheads
    t = c * Q + tl.arange(0, Q)
    t_ok = t < seqlen
    pp, nn = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    p_ok, n_ok = pp < p, nn < n
    _, _, cum = _dt_cum(DT, Bias, A, bi.to(tl.int64) * stride_dtb + hi * stride_dth, hi, t, t_ok, stride_dtl,
                        HAS_BIAS, SOFTPLUS)
    # gy^T (p, Q): grad_out and z loaded transposed.
    gyt, _ = _gated_grad(G, Z, bi.to(tl.int64) * stride_gb + hi * stride_gh,
                         bi.to(tl.int64) * stride_zb + hi * stride_zh,
                         pp, p_ok, t, t_ok, stride_gp, stride_gl, stride_zp, stride_zl, HAS_Z)
    cm = _tile(Cm, bi.to(tl.int64) * stride_cb + (hi // head_per_group) * stride_cg, t, t_ok, stride_cl, nn, n_ok,
               stride_cn)
    ds = _mm(gyt * tl.exp(cum)[None, :], cm, G.dtype.element_ty, PREC)
    off = (bh.to(tl.int64) * n_chunks + c) * p * n
    tl.store(DStates + off + pp[:, None] * n + nn[None, :], ds, mask=p_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=_PASS_VARYING)
def _dstate_pass_kernel(DStates, States, CumLast, DFinal, DInit, DCumLastPart, n_chunks, pn,
                        HAS_DFINAL: tl.constexpr, BLOCK: tl.constexpr):
    blk, bh = tl.program_id(0), tl.program_id(1)
    e = blk * BLOCK + tl.arange(0, BLOCK)
    e_ok = e < pn
    base = bh.to(tl.int64) * pn
    if HAS_DFINAL:
        r = tl.load(DFinal + base + e, mask=e_ok, other=0.0)
    else:
        r = tl.zeros((BLOCK,), tl.float32)
    n_blk = tl.num_programs(0)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        off = (bh.to(tl.int64) * n_chunks + c) * pn + e
        local = tl.load(DStates + off, mask=e_ok, other=0.0)
        tl.store(DStates + off, r, mask=e_ok)
        s_in = tl.load(States + off, mask=e_ok, other=0.0)
        decay = tl.exp(tl.load(CumLast + bh.to(tl.int64) * n_chunks + c))
        # S_out = decay S_in + states: d cum_last = decay <S_in, dS_out> (this block's share).
        tl.store(DCumLastPart + (bh.to(tl.int64) * n_chunks + c) * n_blk + blk, decay * tl.sum(s_in * r, 0))
        r = decay * r + local
    tl.store(DInit + base + e, r, mask=e_ok)


@triton.jit(do_not_specialize=_VARYING)
def _chunk_bwd_kernel(G, X, DT, A, Bias, Bm, Cm, Dp, Z, YPre, States, DStates,
                      DX, DZ, DDTPart, DCumPart, DDPart, seqlen, n_chunks, nheads, head_per_group, p, n,
                      stride_xb, stride_xl, stride_xh, stride_xp, stride_dtb, stride_dtl, stride_dth,
                      stride_bb, stride_bl, stride_bg, stride_bn, stride_cb, stride_cl, stride_cg, stride_cn,
                      stride_dh, stride_dp, stride_zb, stride_zl, stride_zh, stride_zp,
                      stride_gb, stride_gl, stride_gh, stride_gp,
                      HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                      Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PREC: tl.constexpr):
    """The headdim side of one chunk's backward, for one block of headdim columns: dx, dz, partial
    dD, and this block's share of d dt and d cum (both sums over headdim; the launcher adds the blocks
    and finishes dt's gradient). dB / dC are _chunk_bwd_bc_kernel's: one kernel holding both, or all
    of headdim at once, spilled. Outputs contiguous: DX / DZ (b, l, h, p), DDTPart / DCumPart (b*h,
    chunks, headdim blocks, Q) float32, DDPart (b*h, chunks, p)."""
    c, bh, pb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bi, hi = bh // nheads, bh % nheads
    gi = hi // head_per_group
    t = c * Q + tl.arange(0, Q)
    t_ok = t < seqlen
    pp = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = pp < p
    DTY: tl.constexpr = X.dtype.element_ty
    dt, _, cum = _dt_cum(DT, Bias, A, bi.to(tl.int64) * stride_dtb + hi * stride_dth, hi, t, t_ok, stride_dtl,
                         HAS_BIAS, SOFTPLUS)
    cum_last = tl.sum(dt, 0) * tl.load(A + hi)
    x_off = bi.to(tl.int64) * stride_xb + hi * stride_xh
    x = _tile(X, x_off, t, t_ok, stride_xl, pp, p_ok, stride_xp)
    b_off = bi.to(tl.int64) * stride_bb + gi * stride_bg
    c_off = bi.to(tl.int64) * stride_cb + gi * stride_cg
    s_off = (bh.to(tl.int64) * n_chunks + c) * p * n
    g_off = bi.to(tl.int64) * stride_gb + hi * stride_gh
    z_off = bi.to(tl.int64) * stride_zb + hi * stride_zh
    gy, zz = _gated_grad(G, Z, g_off, z_off, t, t_ok, pp, p_ok, stride_gl, stride_gp, stride_zl, stride_zp, HAS_Z)
    exp_cum = tl.exp(cum)
    to_end = tl.exp(cum_last - cum)
    xf = x.to(tl.float32)
    row = (bi.to(tl.int64) * seqlen + t) * nheads + hi
    if HAS_D:
        d_row = tl.load(Dp + hi * stride_dh + pp * stride_dp, mask=p_ok, other=0.0)
        tl.store(DDPart + (bh.to(tl.int64) * n_chunks + c) * p + pp, tl.sum(gy * xf, 0), mask=p_ok)
    if HAS_Z:
        # The gate's input y + D x, recomputed by the launcher (the forward's output kernel without z):
        # recomputing it here too spilled on sm_90.
        ypre = tl.load(YPre + row[:, None] * p + pp[None, :], mask=t_ok[:, None] & p_ok[None, :], other=0.0)
        g = _tile(G, g_off, t, t_ok, stride_gl, pp, p_ok, stride_gp)
        sig = tl.sigmoid(zz)
        dz = g.to(tl.float32) * ypre.to(tl.float32) * sig * (1.0 + zz * (1.0 - sig))
        tl.store(DZ + row[:, None] * p + pp[None, :], dz.to(DZ.dtype.element_ty), mask=t_ok[:, None] & p_ok[None, :])

    # The three products over dstate, in BLOCK_K-column steps (float32's FMA products spilled with all
    # of dstate at once): C S_in^T (Q, p), (B C^T) (j, i) and B dS_out^T (Q, p). Everything Q x Q is
    # built transposed (rows j, columns i), straight from transposed loads: a register transpose
    # feeding mma spilled on sm_80.
    y_off = tl.zeros((Q, BLOCK_P), tl.float32)
    bds = tl.zeros((Q, BLOCK_P), tl.float32)
    bc_t = tl.zeros((Q, Q), tl.float32)
    for k in tl.static_range(0, BLOCK_N, BLOCK_K):
        nn = k + tl.arange(0, BLOCK_K)
        n_ok = nn < n
        bm = _tile(Bm, b_off, t, t_ok, stride_bl, nn, n_ok, stride_bn)
        y_off += _mm(_tile(Cm, c_off, t, t_ok, stride_cl, nn, n_ok, stride_cn),
                     _tile(States, s_off, nn, n_ok, 1, pp, p_ok, n), DTY, PREC)
        bc_t += _mm(bm, _tile(Cm, c_off, nn, n_ok, stride_cn, t, t_ok, stride_cl), DTY, PREC)
        bds += _mm(bm, _tile(DStates, s_off, nn, n_ok, 1, pp, p_ok, n), DTY, PREC)
    # Entering state: y_i += exp(cum_i) C_i S_in^T.
    dcum = exp_cum * tl.sum(gy * y_off, 1)
    # Intra-chunk: y_i = sum_{j <= i} scores_ij dt_j x_j, scores_ij = (C_i . B_j) exp(cum_i - cum_j).
    later = t[None, :] >= t[:, None]
    decay_t = tl.exp(tl.where(later, cum[None, :] - cum[:, None], float("-inf")))
    scores_t = bc_t * decay_t
    gy_t, _ = _gated_grad(G, Z, g_off, z_off, pp, p_ok, t, t_ok, stride_gp, stride_gl, stride_zp, stride_zl, HAS_Z)
    gmat_t = _mm(x, gy_t, DTY, PREC)                                 # (j, i): x_j . gy_i
    dx = _mm(scores_t, gy, DTY, PREC) * dt[:, None]
    ddt = tl.sum(scores_t * gmat_t, 1)
    m_t = gmat_t * scores_t * dt[:, None]
    dcum += tl.sum(m_t, 0) - tl.sum(m_t, 1)
    # Chunk state: states = sum_j exp(cum_last - cum_j) dt_j x_j B_j^T, its gradient is dS_out (bds =
    # dS_out B_j per row).
    w = dt * to_end
    dx += bds * w[:, None]
    term = tl.sum(xf * bds, 1)                                       # x_j . (dS_out B_j)
    ddt += to_end * term
    dcum -= w * term
    dcum += tl.where(tl.arange(0, Q) == Q - 1, tl.sum(w * term, 0), 0.0)   # cum_last = cum[Q - 1]
    if HAS_D:
        dx += d_row[None, :] * gy
    part = ((bh.to(tl.int64) * n_chunks + c) * tl.num_programs(2) + pb) * Q + tl.arange(0, Q)
    tl.store(DDTPart + part, ddt)
    tl.store(DCumPart + part, dcum)
    tl.store(DX + row[:, None] * p + pp[None, :], dx.to(DX.dtype.element_ty), mask=t_ok[:, None] & p_ok[None, :])


@triton.jit(do_not_specialize=_VARYING)
def _chunk_bwd_bc_kernel(G, X, DT, A, Bias, Bm, Cm, Z, States, DStates, DBh, DCh,
                         seqlen, n_chunks, nheads, head_per_group, p, n,
                         stride_xb, stride_xl, stride_xh, stride_xp, stride_dtb, stride_dtl, stride_dth,
                         stride_bb, stride_bl, stride_bg, stride_bn, stride_cb, stride_cl, stride_cg, stride_cn,
                         stride_zb, stride_zl, stride_zh, stride_zp, stride_gb, stride_gl, stride_gh, stride_gp,
                         HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, Q: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """The dstate side of one chunk's backward, for one block of dstate columns: this head's dB and dC,
    (b, l, h, n) float32 (the launcher sums the heads of each group)."""
    c, bh, nb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bi, hi = bh // nheads, bh % nheads
    gi = hi // head_per_group
    t = c * Q + tl.arange(0, Q)
    t_ok = t < seqlen
    pp, nn = tl.arange(0, BLOCK_P), nb * BLOCK_N + tl.arange(0, BLOCK_N)
    p_ok, n_ok = pp < p, nn < n
    DTY: tl.constexpr = X.dtype.element_ty
    dt, _, cum = _dt_cum(DT, Bias, A, bi.to(tl.int64) * stride_dtb + hi * stride_dth, hi, t, t_ok, stride_dtl,
                         HAS_BIAS, SOFTPLUS)
    cum_last = tl.sum(dt, 0) * tl.load(A + hi)
    x_off = bi.to(tl.int64) * stride_xb + hi * stride_xh
    xt = _tile(X, x_off, pp, p_ok, stride_xp, t, t_ok, stride_xl)
    gy, _ = _gated_grad(G, Z, bi.to(tl.int64) * stride_gb + hi * stride_gh,
                        bi.to(tl.int64) * stride_zb + hi * stride_zh, t, t_ok, pp, p_ok, stride_gl, stride_gp,
                        stride_zl, stride_zp, HAS_Z)
    causal = t[:, None] >= t[None, :]
    decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
    # d(C_i . B_j) = (gy_i . x_j) dt_j exp(cum_i - cum_j) for j <= i.
    dcb = _mm(gy, xt, DTY, PREC) * dt[None, :] * decay
    s_off = (bh.to(tl.int64) * n_chunks + c) * p * n
    b_off = bi.to(tl.int64) * stride_bb + gi * stride_bg
    bm = _tile(Bm, b_off, t, t_ok, stride_bl, nn, n_ok, stride_bn)
    dc = _mm(dcb, bm, DTY, PREC)
    dc += _mm(gy * tl.exp(cum)[:, None], _tile(States, s_off, pp, p_ok, n, nn, n_ok, 1), DTY, PREC)
    row = (bi.to(tl.int64) * seqlen + t) * nheads + hi
    tl.store(DCh + row[:, None] * n + nn[None, :], dc, mask=t_ok[:, None] & n_ok[None, :])
    cm = _tile(Cm, bi.to(tl.int64) * stride_cb + gi * stride_cg, t, t_ok, stride_cl, nn, n_ok, stride_cn)
    db = _mm(tl.trans(dcb), cm, DTY, PREC)
    # x^T loaded once, transposed back for the (Q, p) @ (p, n) product with dS_out.
    x = _tile(X, x_off, t, t_ok, stride_xl, pp, p_ok, stride_xp)
    db += _mm(x, _tile(DStates, s_off, pp, p_ok, n, nn, n_ok, 1), DTY, PREC) * (dt * tl.exp(cum_last - cum))[:, None]
    tl.store(DBh + row[:, None] * n + nn[None, :], db, mask=t_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Config:
    q: int            # chunk length (the Q x Q tiles)
    warps: int        # the chunk kernels
    pass_block: int   # state elements per program of the two sequential passes
    pass_warps: int
    bwd_block_p: int  # headdim columns per program of the backward's headdim-side kernel
    bc_block_n: int   # dstate columns per program of its dstate side
    block_k: int      # dstate columns per step of the products over dstate (output / headdim side)


MAX_DIM = 128  # headdim and dstate: one program holds a whole (p, n) state tile
# GPU: Q = 64 for 16-bit inputs (mamba-ssm uses 64-256); 8 warps keep the backward's Q x Q and (Q, p) float32 tiles in
# registers. The interpreter runs one program at a time: Q = 16 makes the tests' short sequences span
# several chunks.
_GPU = _Config(q=64, warps=8, pass_block=256, pass_warps=4, bwd_block_p=16, bc_block_n=32, block_k=64)
# float32 operands take twice the registers of 16-bit ones: the backward kernels spilled at Q = 64.
_GPU_F32 = _Config(q=32, warps=8, pass_block=256, pass_warps=4, bwd_block_p=16, bc_block_n=32, block_k=32)
_INTERP = _Config(q=16, warps=1, pass_block=64, pass_warps=1, bwd_block_p=16, bc_block_n=16, block_k=16)
_GPU_TILES = ((64, 64), (64, 128))  # (BLOCK_P, BLOCK_N) the static check compiles: M-VAR, mamba-ssm defaults


def _interpreted(device):
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _gpu_config(dtype):
    return _GPU_F32 if dtype == torch.float32 else _GPU


def _block_k(cfg, n):
    return min(cfg.block_k, _block(n))


def _block(d):
    return max(16, triton.next_power_of_2(d))  # tl.dot needs every tile dimension >= 16


def _prec(dtype):
    # float32: exact FMA products. tf32 would cost float32 accuracy, and tf32x3 (three tf32 products)
    # spilled the backward kernels at every tile tried (sm_90).
    return "ieee" if dtype == torch.float32 else "tf32"


def check_dims(p, n):
    if p > MAX_DIM or n > MAX_DIM:
        raise NotImplementedError(f"ssd_scan: impl='triton' supports headdim and dstate up to {MAX_DIM} (one "
                                  f"program holds a whole (headdim, dstate) state tile), got headdim={p}, "
                                  f"dstate={n}; use impl='cpu' or impl='reference'")


def _common(x, dt, B):
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    cfg = _INTERP if _interpreted(x.device) else _gpu_config(x.dtype)
    return b, l, h, p, g, n, cfg, triton.cdiv(l, cfg.q)


def _states(x, dt, A, B, dt_bias, initial_states, dt_softplus, cfg, nc):
    """S_in per chunk (b*h, chunks, p, n) float32 and final_states (b, h, p, n)."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    states = x.new_empty((b * h, nc, p, n), dtype=torch.float32)
    cum_last = x.new_empty((b * h, nc), dtype=torch.float32)
    _chunk_state_kernel[(nc, b * h)](
        x, dt, A, x if dt_bias is None else dt_bias, B, states, cum_last, l, nc, h, h // g, p, n,
        *x.stride(), *dt.stride(), *B.stride(),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, Q=cfg.q, BLOCK_P=_block(p), BLOCK_N=_block(n),
        PREC=_prec(x.dtype), num_warps=cfg.warps)
    final = x.new_empty((b, h, p, n), dtype=torch.float32)
    init = initial_states.contiguous() if initial_states is not None else None
    _state_pass_kernel[(triton.cdiv(p * n, cfg.pass_block), b * h)](
        states, cum_last, final if init is None else init, final, nc, p * n,
        HAS_INIT=init is not None, BLOCK=cfg.pass_block, num_warps=cfg.pass_warps)
    return states, cum_last, final


def _d_strides(D):
    if D is None:
        return 0, 0
    return (D.stride(0), D.stride(1)) if D.dim() == 2 else (D.stride(0), 0)


def ssd_scan_fwd(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, chunk_size):
    b, l, h, p, g, n, cfg, nc = _common(x, dt, B)
    check_dims(p, n)
    states, _, final = _states(x, dt, A, B, dt_bias, initial_states, dt_softplus, cfg, nc)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _chunk_out_kernel[(nc, b * h)](
        x, dt, A, x if dt_bias is None else dt_bias, B, C, x if D is None else D, x if z is None else z, states,
        out, l, nc, h, h // g, p, n, *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *_d_strides(D),
        *(z.stride() if z is not None else (0, 0, 0, 0)), *out.stride(),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_D=D is not None, HAS_Z=z is not None,
        Q=cfg.q, BLOCK_P=_block(p), BLOCK_N=_block(n), BLOCK_K=_block_k(cfg, n), PREC=_prec(x.dtype),
        num_warps=cfg.warps)
    return out, final


def _finish_ddt(ddt, dcum, dcum_last, dt, A, dt_bias, dt_softplus, q):
    """dt's gradient from the chunk kernel's two per-step sums (b*h, chunks, Q): ddt (through dt as a
    multiplier) and dcum (through cum = cumsum(dt A) within the chunk), plus d cum_last from the state
    passing. Returns (ddt (b, l, h) float32 before the cast to dt's dtype, dA (h,))."""
    b, l, h = dt.shape
    nc = dcum.shape[1]
    dcum = dcum.clone()
    dcum[:, :, -1] += dcum_last
    da = dcum.flip(-1).cumsum(-1).flip(-1)  # d(dt_t A) = sum_{i >= t} dcum_i
    v = dt.float() + (dt_bias if dt_bias is not None else 0.0)
    dtp = torch.nn.functional.softplus(v) if dt_softplus else v
    # (b, l, h) -> (b*h, chunks, Q), the padded tail dt = 0 as in the kernels.
    dtp = torch.nn.functional.pad(dtp.permute(0, 2, 1), (0, nc * q - l)).reshape(b * h, nc, q)
    Ah = A.repeat(b)[:, None, None]
    dA = (da * dtp).view(b, h, -1).sum((0, 2))
    ddt = (ddt + da * Ah).reshape(b, h, nc * q)[:, :, :l].permute(0, 2, 1).contiguous()
    if dt_softplus:
        ddt = ddt * torch.sigmoid(v)
    return ddt, dA


def ssd_scan_bwd(grad_out, grad_final_states, x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus,
                 chunk_size):
    b, l, h, p, g, n, cfg, nc = _common(x, dt, B)
    check_dims(p, n)
    f32 = torch.float32
    states, cum_last, _ = _states(x, dt, A, B, dt_bias, initial_states, dt_softplus, cfg, nc)
    flags = dict(HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, Q=cfg.q, BLOCK_P=_block(p),
                 BLOCK_N=_block(n), PREC=_prec(x.dtype), num_warps=cfg.warps)
    bias = x if dt_bias is None else dt_bias
    z_strides = z.stride() if z is not None else (0, 0, 0, 0)
    dstates = torch.empty_like(states)
    _dstate_local_kernel[(nc, b * h)](
        grad_out, x if z is None else z, dt, A, bias, C, dstates, l, nc, h, h // g, p, n,
        *grad_out.stride(), *z_strides, *dt.stride(), *C.stride(), HAS_Z=z is not None, **flags)
    n_blk = triton.cdiv(p * n, cfg.pass_block)
    dinit = x.new_empty((b, h, p, n), dtype=f32)
    dcl_part = x.new_empty((b * h, nc, n_blk), dtype=f32)
    dfinal = grad_final_states.contiguous() if grad_final_states is not None else None
    _dstate_pass_kernel[(n_blk, b * h)](
        dstates, states, cum_last, dinit if dfinal is None else dfinal, dinit, dcl_part, nc, p * n,
        HAS_DFINAL=dfinal is not None, BLOCK=cfg.pass_block, num_warps=cfg.pass_warps)
    dcl = dcl_part.sum(2)

    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dz = torch.empty(x.shape, dtype=x.dtype, device=x.device) if z is not None else x.new_empty((0,))
    dbh = x.new_empty((b, l, h, n), dtype=f32)
    dch = x.new_empty((b, l, h, n), dtype=f32)
    dd_part = x.new_empty((b * h, nc, p), dtype=f32)
    if z is not None:
        ypre = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _chunk_out_kernel[(nc, b * h)](
            x, dt, A, bias, B, C, x if D is None else D, x, states, ypre, l, nc, h, h // g, p, n,
            *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *_d_strides(D), 0, 0, 0, 0, *ypre.stride(),
            HAS_D=D is not None, HAS_Z=False, BLOCK_K=_block_k(cfg, n), **flags)
    else:
        ypre = x
    n_pb = triton.cdiv(p, cfg.bwd_block_p)
    ddt_part = x.new_empty((b * h, nc, n_pb, cfg.q), dtype=f32)
    dcum_part = torch.empty_like(ddt_part)
    _chunk_bwd_kernel[(nc, b * h, n_pb)](
        grad_out, x, dt, A, bias, B, C, x if D is None else D, x if z is None else z, ypre, states, dstates,
        dx, dx if z is None else dz, ddt_part, dcum_part, dd_part, l, nc, h, h // g, p, n,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *_d_strides(D), *z_strides, *grad_out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, BLOCK_K=_block_k(cfg, n),
        **dict(flags, BLOCK_P=min(cfg.bwd_block_p, _block(p))))
    _chunk_bwd_bc_kernel[(nc, b * h, triton.cdiv(n, cfg.bc_block_n))](
        grad_out, x, dt, A, bias, B, C, x if z is None else z, states, dstates, dbh, dch, l, nc, h, h // g, p, n,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *z_strides, *grad_out.stride(),
        HAS_Z=z is not None, **dict(flags, BLOCK_N=min(cfg.bc_block_n, _block(n))))
    ddt, da = _finish_ddt(ddt_part.sum(2), dcum_part.sum(2), dcl, dt, A, dt_bias, dt_softplus, cfg.q)
    # Sums over batch, chunks and the heads of a group, in float32, rounded once.
    d_dt_bias = ddt.sum((0, 1))
    db = dbh.view(b, l, g, h // g, n).sum(3).to(B.dtype)
    dc = dch.view(b, l, g, h // g, n).sum(3).to(C.dtype)
    if D is None:
        dd = x.new_zeros((h,), dtype=f32)  # dropped by the caller, dense as the schema promises
    else:
        dd = dd_part.view(b, h, nc, p).sum((0, 2))
        dd = dd.sum(1) if D.dim() == 1 else dd
    return dx, ddt.to(dt.dtype), da, db, dc, dd, dz, d_dt_bias, dinit


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time configurations (tests/static_gpu_check.py compiles each for sm_80 and sm_90)
# ----------------------------------------------------------------------------------------------------
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Pointers in x's dtype (B / C too: the common case; float32 B / C with 16-bit x are converted to x's
# dtype for the dots, like every other operand); every other pointer is a float32 buffer or parameter.
_X_POINTERS = {"X", "DT", "Z", "G", "Out", "DX", "DZ", "Bm", "Cm", "YPre"}
# Unit strides of contiguous x / z / grad_out / dt / B / C and of a (nheads, headdim) D, which triton
# specialises to 1 on a real call.
_UNIT = {"stride_xp", "stride_zp", "stride_gp", "stride_op", "stride_dth", "stride_bn", "stride_cn", "stride_dp"}
# The sequential passes have no matrix product (an elementwise recurrence over chunks): no tensor cores
# to check, only compile, spills and shared memory.
_PASS_EXEMPT = "state passing: an elementwise recurrence over chunks, no matrix product"
_FP32_EXEMPT = "float32: ieee-precision FMA products by design (tensor cores offer only tf32 for float32)"


def _aot_entry(name, kernel, dtype, constexprs, num_warps, uses_dot):
    def classify(arg):
        if arg[0].isupper():  # torch allocations
            return "*" + (_TRITON_DTYPE[dtype] if arg in _X_POINTERS else "fp32"), True
        if arg in _UNIT:
            return UNIT
        # Multiples of headdim or dstate (64 / 128 here), which triton marks 16-divisible on a real
        # call: without that alignment fact no tile load is vectorised (and the tiles' per-element
        # addresses spill). dt's strides are multiples of nheads, not assumed.
        return "i32", arg in ("p", "n") or (arg.startswith("stride_") and not arg.startswith("stride_dt"))
    exempt = None if uses_dot else (_FP32_EXEMPT if "BLOCK_P" in constexprs else _PASS_EXEMPT)
    return aot_entry(name, kernel, constexprs, classify, num_warps=num_warps, uses_dot=uses_dot, exempt=exempt)


def aot_configs() -> list[dict]:
    """Every kernel the GPU launchers compile, per input dtype, at the headdim / dstate tiles of the
    Mamba-2 layers this library serves (64: M-VAR's and mamba-ssm's default headdim; 64 and 128
    dstate), with every optional input present (the most live registers): the format of
    hierkern.ops.attention.triton.aot_configs. The chunk kernels' dots must lower to tensor cores for
    float16 / bfloat16; float32 (ieee FMA products) and the two passes are exempt (_FP32_EXEMPT,
    _PASS_EXEMPT)."""
    entries = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        cfg = _gpu_config(dtype)
        tag = _TRITON_DTYPE[dtype]
        for bp, bn in _GPU_TILES:
            dims = dict(Q=cfg.q, BLOCK_P=bp, BLOCK_N=bn, PREC=_prec(dtype), HAS_BIAS=True, SOFTPLUS=True)
            full = dict(dims, HAS_D=True, HAS_Z=True)
            sfx = f"{tag}_p{bp}_n{bn}"
            tc = dtype != torch.float32  # float32: ieee products, no tensor cores (see _prec)
            entries.append(_aot_entry(f"ssd_chunk_state_{sfx}", _chunk_state_kernel, dtype, dims, cfg.warps, tc))
            entries.append(_aot_entry(f"ssd_chunk_out_{sfx}", _chunk_out_kernel, dtype,
                                      dict(full, BLOCK_K=min(bn, cfg.block_k)), cfg.warps, tc))
            entries.append(_aot_entry(f"ssd_dstate_local_{sfx}", _dstate_local_kernel, dtype,
                                      dict(dims, HAS_Z=True), cfg.warps, tc))
            entries.append(_aot_entry(f"ssd_chunk_bwd_{sfx}", _chunk_bwd_kernel, dtype,
                                      dict(full, BLOCK_P=min(bp, cfg.bwd_block_p), BLOCK_K=min(bn, cfg.block_k)),
                                      cfg.warps, tc))
            entries.append(_aot_entry(f"ssd_chunk_bwd_bc_{sfx}", _chunk_bwd_bc_kernel, dtype,
                                      dict(dims, HAS_Z=True, BLOCK_N=min(bn, cfg.bc_block_n)), cfg.warps, tc))
        entries.append(_aot_entry(f"ssd_state_pass_{tag}", _state_pass_kernel, dtype,
                                  dict(HAS_INIT=True, BLOCK=cfg.pass_block), cfg.pass_warps, False))
        entries.append(_aot_entry(f"ssd_dstate_pass_{tag}", _dstate_pass_kernel, dtype,
                                  dict(HAS_DFINAL=True, BLOCK=cfg.pass_block), cfg.pass_warps, False))
    return entries
