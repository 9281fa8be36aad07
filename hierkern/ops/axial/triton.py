"""Triton kernels for axial attention (hierkern.axial_attention).

Tensors are (B, H, W, heads, D) with any strides. A "line" is one column (axis 1) or row (axis 2);
line l = (b, o) with o the index along the other spatial axis, position p runs along the axis. The
launcher passes each tensor's strides as (batch, axis, other, head, dim), so a column is read at the H
stride directly: nothing is permuted or copied.

Packing short lines: a program owns BLOCK query rows of one (batch, head), split into segments of
`seg` = min(S, BLOCK) positions; row r belongs to line pid_l * pack + r // seg (pack = BLOCK // seg lines
of that batch element) at position pid_m * seg + r % seg. Key tiles use the same layout, so a program
of 16-pixel rows runs four of them in one 64 x 64 tile (one tl.dot per product) and masks the
cross-line pairs; a line of S >= BLOCK is one line per program with the usual flash loop over key tiles. seg, S and the line counts are runtime
values (no recompile per image size).

Kernels
  _fwd_kernel   grid (position blocks, line packs, batch * heads): online softmax in base 2, writes out and
                the float32 lse (B, H, W, heads).
  _bwd_dq_kernel  same grid: Delta = rowsum(dO * O) for its rows (stored for the next kernel) and dq.
  _bwd_dkdv_kernel  grid (key blocks, line packs, batch * kv heads): loops over the GQA group's query heads and
                the query blocks that see its keys; owns its dk / dv (no atomics).
fp32 inputs use exact ieee dots (not tf32), as the other attention kernels; their AOT entries have
uses_dot=False. 16-bit entries must show mma (sm_80) / wgmma (sm_90).
"""
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._aot import UNIT, aot_entry

_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
_NEG: tl.constexpr = tl.constexpr(-1.0e30)  # finite: idle rows keep a finite max and never produce NaN
_VARYING = ["S", "seg", "n_other", "n_heads"]


@triton.jit
def _rows(pid_m, pid_l, seg, S, n_other, BLOCK: tl.constexpr):
    """Line-packed row layout of BLOCK tile rows: (line slot, position, line index o, valid)."""
    r = tl.arange(0, BLOCK)
    ll = r // seg
    pos = pid_m * seg + r % seg
    o = pid_l * (BLOCK // seg) + ll
    ok = (ll < BLOCK // seg) & (o < n_other) & (pos < S)
    return ll, pos, o, ok


@triton.jit
def _tile(Ptr, o, pos, so, sa, d, ok, d_ok, sd):
    # 32-bit offsets inside one batch element (the launcher checks its span < 2**31): the program's
    # batch offset is a 64-bit scalar folded into Ptr, so no 64-bit per-row vectors are kept live.
    return tl.load(Ptr + (o * so + pos * sa)[:, None] + d[None, :] * sd, mask=ok[:, None] & d_ok[None, :],
                   other=0.0)


@triton.jit(do_not_specialize=_VARYING)
def _fwd_kernel(Q, K, V, O, Lse, scale, S, seg, n_other, n_heads, group,
                stride_qb, stride_qa, stride_qo, stride_qh, stride_qd,
                stride_kb, stride_ka, stride_ko, stride_kh, stride_kd,
                stride_vb, stride_va, stride_vo, stride_vh, stride_vd,
                stride_ob, stride_oa, stride_oo, stride_oh, stride_od,
                stride_lb, stride_la, stride_lo, stride_lh,
                CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    pid_m, pid_l, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (pid_bh // n_heads).to(tl.int64)
    h = pid_bh % n_heads
    hk = h // group
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    ll, pos, o, ok = _rows(pid_m, pid_l, seg, S, n_other, BLOCK)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = _tile(Q, o, pos, stride_qo, stride_qa, d, ok, d_ok, stride_qd)
    qk_scale = scale * _LOG2E
    m_i = tl.zeros((BLOCK,), tl.float32) + _NEG
    l_i = tl.zeros((BLOCK,), tl.float32)
    acc = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * seg)
    for start in range(0, hi, seg):
        kll, kpos, ko, k_ok = _rows(0, pid_l, seg, S, n_other, BLOCK)
        kpos += start
        k_ok = k_ok & (kpos < S)
        k = _tile(K, ko, kpos, stride_ko, stride_ka, d, k_ok, d_ok, stride_kd)
        v = _tile(V, ko, kpos, stride_vo, stride_va, d, k_ok, d_ok, stride_vd)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        keep = (ll[:, None] == kll[None, :]) & k_ok[None, :]
        if CAUSAL:
            keep = keep & (kpos[None, :] <= pos[:, None])
        s = tl.where(keep, s, _NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.where(keep, tl.math.exp2(s - m_new[:, None]), 0.0)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    O += b * stride_ob + h * stride_oh
    tl.store(O + (o * stride_oo + pos * stride_oa)[:, None] + d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=ok[:, None] & d_ok[None, :])
    Lse += b * stride_lb + h * stride_lh
    tl.store(Lse + o * stride_lo + pos * stride_la, (m_i + tl.math.log2(l_safe)) * _LN2, mask=ok)


@triton.jit(do_not_specialize=_VARYING)
def _bwd_dq_kernel(Q, K, V, O, DO, Lse, Delta, DQ, scale, S, seg, n_other, n_heads, group,
                   stride_qb, stride_qa, stride_qo, stride_qh, stride_qd,
                   stride_kb, stride_ka, stride_ko, stride_kh, stride_kd,
                   stride_vb, stride_va, stride_vo, stride_vh, stride_vd,
                   stride_ob, stride_oa, stride_oo, stride_oh, stride_od,
                   stride_gb, stride_ga, stride_go, stride_gh, stride_gd,
                   stride_lb, stride_la, stride_lo, stride_lh,
                   stride_dqb, stride_dqa, stride_dqo, stride_dqh, stride_dqd,
                   CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    pid_m, pid_l, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (pid_bh // n_heads).to(tl.int64)
    h = pid_bh % n_heads
    hk = h // group
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    ll, pos, o, ok = _rows(pid_m, pid_l, seg, S, n_other, BLOCK)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = _tile(Q + b * stride_qb + h * stride_qh, o, pos, stride_qo, stride_qa, d, ok, d_ok, stride_qd)
    do = _tile(DO + b * stride_gb + h * stride_gh, o, pos, stride_go, stride_ga, d, ok, d_ok, stride_gd)
    out = _tile(O + b * stride_ob + h * stride_oh, o, pos, stride_oo, stride_oa, d, ok, d_ok, stride_od)
    # Lse and Delta share the (B, H, W, heads) float32 layout.
    l_off = b * stride_lb + h * stride_lh
    l_rows = o * stride_lo + pos * stride_la
    delta = tl.sum(do.to(tl.float32) * out.to(tl.float32), 1)
    tl.store(Delta + l_off + l_rows, delta, mask=ok)
    lse2 = tl.load(Lse + l_off + l_rows, mask=ok, other=0.0) * _LOG2E
    qk_scale = scale * _LOG2E
    dq = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * seg)
    for start in range(0, hi, seg):
        kll, kpos, ko, k_ok = _rows(0, pid_l, seg, S, n_other, BLOCK)
        kpos += start
        k_ok = k_ok & (kpos < S)
        k = _tile(K, ko, kpos, stride_ko, stride_ka, d, k_ok, d_ok, stride_kd)
        v = _tile(V, ko, kpos, stride_vo, stride_va, d, k_ok, d_ok, stride_vd)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        keep = (ll[:, None] == kll[None, :]) & k_ok[None, :] & ok[:, None]
        if CAUSAL:
            keep = keep & (kpos[None, :] <= pos[:, None])
        p = tl.where(keep, tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    DQ += b * stride_dqb + h * stride_dqh
    tl.store(DQ + (o * stride_dqo + pos * stride_dqa)[:, None] + d[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=_VARYING)
def _bwd_dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DV, scale, S, seg, n_other, n_heads, group,
                     stride_qb, stride_qa, stride_qo, stride_qh, stride_qd,
                     stride_kb, stride_ka, stride_ko, stride_kh, stride_kd,
                     stride_vb, stride_va, stride_vo, stride_vh, stride_vd,
                     stride_gb, stride_ga, stride_go, stride_gh, stride_gd,
                     stride_lb, stride_la, stride_lo, stride_lh,
                     stride_dkb, stride_dka, stride_dko, stride_dkh, stride_dkd,
                     stride_dvb, stride_dva, stride_dvo, stride_dvh, stride_dvd,
                     CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    # n_heads is the number of kv heads here: one program per (key block, line pack, batch, kv head).
    pid_n, pid_l, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (pid_bh // n_heads).to(tl.int64)
    hk = pid_bh % n_heads
    kll, kpos, ko, k_ok = _rows(pid_n, pid_l, seg, S, n_other, BLOCK)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    k = _tile(K + b * stride_kb + hk * stride_kh, ko, kpos, stride_ko, stride_ka, d, k_ok, d_ok, stride_kd)
    v = _tile(V + b * stride_vb + hk * stride_vh, ko, kpos, stride_vo, stride_va, d, k_ok, d_ok, stride_vd)
    qk_scale = scale * _LOG2E
    dk = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    lo = 0
    if CAUSAL:
        lo = pid_n * seg  # earlier query positions see none of these keys
    for g in range(0, group):
        h = hk * group + g
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DO + b * stride_gb + h * stride_gh
        l_off = b * stride_lb + h * stride_lh
        for start in range(lo, S, seg):
            ll, pos, o, ok = _rows(0, pid_l, seg, S, n_other, BLOCK)
            pos += start
            ok = ok & (pos < S)
            q = _tile(Qh, o, pos, stride_qo, stride_qa, d, ok, d_ok, stride_qd)
            do = _tile(DOh, o, pos, stride_go, stride_ga, d, ok, d_ok, stride_gd)
            l_rows = o * stride_lo + pos * stride_la
            lse2 = tl.load(Lse + l_off + l_rows, mask=ok, other=0.0) * _LOG2E
            delta = tl.load(Delta + l_off + l_rows, mask=ok, other=0.0)
            # Transposed tiles (keys x queries), so dv and dk accumulate without transposing the results.
            st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
            keep = (kll[:, None] == ll[None, :]) & k_ok[:, None] & ok[None, :]
            if CAUSAL:
                keep = keep & (kpos[:, None] <= pos[None, :])
            pt = tl.where(keep, tl.math.exp2(st - lse2[None, :]), 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
    DK += b * stride_dkb + hk * stride_dkh
    tl.store(DK + (ko * stride_dko + kpos * stride_dka)[:, None] + d[None, :] * stride_dkd,
             (dk * scale).to(DK.dtype.element_ty), mask=k_ok[:, None] & d_ok[None, :])
    DV += b * stride_dvb + hk * stride_dvh
    tl.store(DV + (ko * stride_dvo + kpos * stride_dva)[:, None] + d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=k_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Config:
    block: int
    num_warps: int
    num_stages: int


# GPU tiles by BLOCK_D (sm_80 and sm_90 alike; tests/static_gpu_check.py compiles each). 64 rows is the
# wgmma minimum and covers a 64-pixel line in one tile; longer lines loop over 64-key tiles.
# One pipeline stage: a line of S positions is only S / 64 key tiles (one or two at the benchmark sizes),
# too short for a software pipeline to pay, and the second stage's registers made ptxas spill on sm_80
# (4 warps at D=64: 72 B, 8 warps: 24 B in the forward, 136 B in dkdv).
_GPU = {"fwd": {16: _Config(64, 4, 1), 32: _Config(64, 4, 1), 64: _Config(64, 8, 1), 128: _Config(64, 8, 1)},
        "dq": {16: _Config(64, 4, 1), 32: _Config(64, 8, 1), 64: _Config(64, 8, 1), 128: _Config(64, 8, 1)},
        # dkdv keeps dk, dv, k, v and four score-shaped tiles live: at 64 rows it spilled from D=64 on
        # sm_80 (40 B) and at D=128 on sm_90 (128 B), so those use 32-row tiles (mma, not wgmma: see
        # _WGMMA_EXEMPT).
        "dkdv": {16: _Config(64, 8, 1), 32: _Config(64, 8, 1), 64: _Config(32, 4, 1), 128: _Config(32, 4, 1)}}
_WGMMA_EXEMPT = "32-row dkdv tile: a 64-row one spills (wgmma needs 64 rows); mma.sync on sm_90 instead"
# float32 runs exact ieee FMA dots (no tensor cores), whose operands all sit in registers: 64-row tiles
# spilled in every kernel from D=32, 32-row ones from D=64 (up to 6 KiB at D=128), 16 rows x 4 warps in dq
# at D=128 (272 B): so smaller tiles, 8 warps at D=128.
_GPU_FP32 = {16: _Config(32, 4, 1), 32: _Config(32, 4, 1), 64: _Config(16, 4, 1), 128: _Config(16, 8, 1)}
# The interpreter runs one program at a time on CPU tensors: 16-row tiles keep the tests fast and make
# their short lines pack several per program and their longer lines span several tiles.
_INTERP = _Config(16, 1, 1)


def _interpreted(device):
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _config(kind, block_d, dtype, device):
    if _interpreted(device):
        return _INTERP
    return _GPU_FP32[block_d] if dtype == torch.float32 else _GPU[kind][block_d]


def _dot_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for 16-bit inputs


def _strides5(t, axis):
    """(batch, axis, other, head, dim) strides of a (B, H, W, heads, D) tensor."""
    return t.stride(0), t.stride(axis), t.stride(3 - axis), t.stride(3), t.stride(4)


def _strides4(t, axis):
    return t.stride(0), t.stride(axis), t.stride(3 - axis), t.stride(3)


def _check_span(t, name):
    """The kernels index inside one batch element with 32-bit offsets."""
    span = sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:])) + 1
    if span >= 2 ** 31:
        raise ValueError(f"axial_attention (triton): one batch element of {name} spans {span} elements; the "
                         f"Triton kernels index it with 32-bit offsets (< 2**31); split the image or use impl='cpu'")


def _geometry(q, axis, block):
    """(S, seg, n_other, grid of (position blocks, line packs))."""
    S, n_other = q.shape[axis], q.shape[3 - axis]
    seg = min(S, block)
    return S, seg, n_other, (triton.cdiv(S, seg), triton.cdiv(n_other, block // seg))


def axial_attn_fwd(q, k, v, axis, causal, scale):
    B, D = q.shape[0], q.shape[4]
    block_d = max(16, triton.next_power_of_2(D))
    cfg = _config("fwd", block_d, q.dtype, q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous = channel-last
    lse = torch.empty(q.shape[:4], dtype=torch.float32, device=q.device)
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _check_span(t, name)
    S, seg, n_other, grid = _geometry(q, axis, cfg.block)
    heads, group = q.shape[3], q.shape[3] // k.shape[3]
    _fwd_kernel[grid + (B * heads,)](
        q, k, v, out, lse, scale, S, seg, n_other, heads, group,
        *_strides5(q, axis), *_strides5(k, axis), *_strides5(v, axis), *_strides5(out, axis), *_strides4(lse, axis),
        CAUSAL=causal, HEAD_DIM=D, BLOCK_D=block_d, BLOCK=cfg.block, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def axial_attn_bwd(grad_out, q, k, v, out, lse, axis, causal, scale):
    B, D = q.shape[0], q.shape[4]
    block_d = max(16, triton.next_power_of_2(D))
    for t, name in ((q, "q"), (k, "k"), (v, "v"), (grad_out, "grad_out"), (out, "out")):
        _check_span(t, name)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    delta = torch.empty(q.shape[:4], dtype=torch.float32, device=q.device)  # lse's layout; dq kernel fills it
    if lse.stride() != delta.stride():
        raise ValueError("axial_attention (triton): lse must be contiguous (B, H, W, heads), as the forward returns it")
    lse_strides = _strides4(lse, axis)
    heads, kv_heads = q.shape[3], k.shape[3]
    group = heads // kv_heads
    cfg = _config("dq", block_d, q.dtype, q.device)
    S, seg, n_other, grid = _geometry(q, axis, cfg.block)
    _bwd_dq_kernel[grid + (B * heads,)](
        q, k, v, out, grad_out, lse, delta, dq, scale, S, seg, n_other, heads, group,
        *_strides5(q, axis), *_strides5(k, axis), *_strides5(v, axis), *_strides5(out, axis),
        *_strides5(grad_out, axis), *lse_strides, *_strides5(dq, axis),
        CAUSAL=causal, HEAD_DIM=D, BLOCK_D=block_d, BLOCK=cfg.block, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    cfg = _config("dkdv", block_d, q.dtype, q.device)
    S, seg, n_other, grid = _geometry(q, axis, cfg.block)
    _bwd_dkdv_kernel[grid + (B * kv_heads,)](
        q, k, v, grad_out, lse, delta, dk, dv, scale, S, seg, n_other, kv_heads, group,
        *_strides5(q, axis), *_strides5(k, axis), *_strides5(v, axis), *_strides5(grad_out, axis), *lse_strides,
        *_strides5(dk, axis), *_strides5(dv, axis),
        CAUSAL=causal, HEAD_DIM=D, BLOCK_D=block_d, BLOCK=cfg.block, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time configurations (tests/static_gpu_check.py compiles each for sm_80 and sm_90)
# ----------------------------------------------------------------------------------------------------
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_F32_POINTERS = {"Lse", "Delta"}
_INTS = {"S", "seg", "n_other", "n_heads", "group"}


def _aot_entry(name, kernel, dtype, constexprs, cfg, uses_dot, wgmma_exempt=None):
    def classify(arg):
        if arg[0].isupper() and arg not in _INTS:  # torch allocations
            return ("*fp32" if arg in _F32_POINTERS else "*" + _TRITON_DTYPE[dtype]), True
        if arg == "scale":
            return "fp32", False
        if arg.startswith("stride_") and arg[-1] == "d":
            return UNIT  # head_dim is the unit stride of channel-last tensors
        # Sizes: nothing assumed (any H, W, heads). Strides of channel-last tensors are multiples of
        # head_dim (16 | head_dim on these entries): triton specialises them so on a real call, and
        # vectorises the row loads.
        return "i32", arg.startswith("stride_")
    return aot_entry(name, kernel, dict(constexprs, BLOCK=cfg.block), classify, num_warps=cfg.num_warps,
                     num_stages=cfg.num_stages, uses_dot=uses_dot, wgmma_exempt=wgmma_exempt)


def aot_configs() -> list[dict]:
    """Every (dtype, head_dim bucket, kernel) configuration the GPU launchers pick, causal (the masked
    path, a superset of the unmasked one), in the format of hierkern.ops.attention.triton.aot_configs.
    uses_dot is False for fp32 only (exact ieee dots by design)."""
    entries = []
    kernels = (("fwd", _fwd_kernel), ("dq", _bwd_dq_kernel), ("dkdv", _bwd_dkdv_kernel))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for head_dim in (16, 32, 64, 128):  # one per BLOCK_D bucket the launchers use
            block_d = max(16, triton.next_power_of_2(head_dim))
            for kind, kernel in kernels:
                flags = {"CAUSAL": True, "HEAD_DIM": head_dim, "BLOCK_D": block_d,
                         "DOT_PRECISION": _dot_precision(dtype)}
                cfg = _GPU_FP32[block_d] if dtype == torch.float32 else _GPU[kind][block_d]
                exempt = _WGMMA_EXEMPT if dtype != torch.float32 and cfg.block < 64 else None
                entries.append(_aot_entry(f"axial_{kind}_{_TRITON_DTYPE[dtype]}_d{head_dim}", kernel, dtype,
                                          flags, cfg, uses_dot=dtype != torch.float32, wgmma_exempt=exempt))
    return entries
