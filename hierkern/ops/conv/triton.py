"""Triton kernels for the causal depthwise conv1d (hierkern.causal_conv1d).

Time is indexed in x's coordinates throughout: position p < 0 is initial_state column p + W - 1 (zero
without a state), 0 <= p < L is x column p. xpad = cat(initial_state, x) is never materialised.

Kernels (grid (time tiles, channel tiles, batch), one BLOCK_C x BLOCK_T tile per program)
  _fwd_kernel  out[t] = act(bias + sum_k w[k] xpad[t + k - (W - 1)]), W shifted loads of the x tile.
               The programs of time tile 0 also write final_state (positions L - W + 1 .. L - 1).
  _bwd_kernel  owns the dpre times t of its tile (dpre = grad_out * act'(pre), pre recomputed from x)
               and the xpad positions p = t - (W - 1): dxpad[p] = sum_e w[W - 1 - e] dpre[p + e] (a
               gather over W shifted recomputations of dpre, so no program writes another's outputs),
               plus the final state's gradient at p >= L - W + 1. dweight / dbias partial sums of its
               own dpre go to a float32 (batch * time tiles, D, W) buffer that the launcher sums.

Depthwise taps are elementwise multiply-adds (no tl.dot): the kernels are memory-bound and there is no
matrix product for tensor cores, so their AOT entries have uses_dot=False (the static check then
verifies compile, spills and shared memory only).

L is never specialised (a decode loop calls with L = 1 and prefill with anything). Unit strides are
specialised, as on a real call, so contiguous (B, D, L) and channel-last (B, L, D).transpose(1, 2)
inputs each get loads that are vectorised along their contiguous axis.
"""
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._aot import UNIT, aot_entry

_VARYING = ["L"]


@triton.jit
def _load_xpad(X, Init, c, c_ok, pos, L, stride_xc, stride_xt, stride_ic, stride_it,
               W: tl.constexpr, HAS_INIT: tl.constexpr):
    """[BLOCK_C, BLOCK_T] float32 tile of xpad at positions pos (x coordinates)."""
    in_x = (pos >= 0) & (pos < L)
    v = tl.load(X + c[:, None] * stride_xc + pos[None, :] * stride_xt, mask=c_ok[:, None] & in_x[None, :],
                other=0.0).to(tl.float32)
    if HAS_INIT:
        in_s = (pos < 0) & (pos >= 1 - W)
        v += tl.load(Init + c[:, None] * stride_ic + (pos + W - 1)[None, :] * stride_it,
                     mask=c_ok[:, None] & in_s[None, :], other=0.0).to(tl.float32)
    return v


@triton.jit
def _weight(Wt, c, c_ok, k, stride_wc, stride_wk):
    return tl.load(Wt + c * stride_wc + k * stride_wk, mask=c_ok, other=0.0).to(tl.float32)


@triton.jit
def _pre(X, Init, Wt, bias, c, c_ok, t, L, stride_xc, stride_xt, stride_ic, stride_it, stride_wc, stride_wk,
         W: tl.constexpr, HAS_INIT: tl.constexpr):
    """Pre-activation at output times t: bias + sum_k w[k] xpad[t + k - (W - 1)], float32."""
    acc = tl.zeros((c.shape[0], t.shape[0]), tl.float32) + bias[:, None]
    for k in tl.static_range(W):
        xk = _load_xpad(X, Init, c, c_ok, t + (k - (W - 1)), L, stride_xc, stride_xt, stride_ic, stride_it,
                        W, HAS_INIT)
        acc += _weight(Wt, c, c_ok, k, stride_wc, stride_wk)[:, None] * xk
    return acc


@triton.jit(do_not_specialize=_VARYING)
def _fwd_kernel(X, Wt, Bias, Init, Out, Final, L, D,
                stride_xb, stride_xc, stride_xt, stride_wc, stride_wk, stride_bc,
                stride_ib, stride_ic, stride_it, stride_ob, stride_oc, stride_ot,
                stride_fb, stride_fc, stride_ft,
                W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < D
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    X += b.to(tl.int64) * stride_xb
    Init += b.to(tl.int64) * stride_ib
    if HAS_BIAS:
        bias = tl.load(Bias + c * stride_bc, mask=c_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_C,), tl.float32)
    acc = _pre(X, Init, Wt, bias, c, c_ok, t, L, stride_xc, stride_xt, stride_ic, stride_it, stride_wc, stride_wk,
               W, HAS_INIT)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    out_ptr = Out + b.to(tl.int64) * stride_ob + c[:, None] * stride_oc + t[None, :] * stride_ot
    tl.store(out_ptr, acc.to(Out.dtype.element_ty), mask=c_ok[:, None] & (t < L)[None, :])
    if pid_t == 0:
        # final_state column i is xpad position L - (W - 1) + i (inside initial_state when L < W - 1).
        i = tl.arange(0, 4)
        fin = _load_xpad(X, Init, c, c_ok, L - (W - 1) + i, L, stride_xc, stride_xt, stride_ic, stride_it,
                         W, HAS_INIT)
        f_ptr = Final + b.to(tl.int64) * stride_fb + c[:, None] * stride_fc + i[None, :] * stride_ft
        tl.store(f_ptr, fin.to(Final.dtype.element_ty), mask=c_ok[:, None] & (i < W - 1)[None, :])


@triton.jit
def _dpre(DOut, X, Init, Wt, bias, c, c_ok, t, L, stride_gc, stride_gt, stride_xc, stride_xt,
          stride_ic, stride_it, stride_wc, stride_wk, W: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr):
    """grad_out * act'(pre) at times t, zero outside [0, L)."""
    t_ok = (t >= 0) & (t < L)
    g = tl.load(DOut + c[:, None] * stride_gc + t[None, :] * stride_gt, mask=c_ok[:, None] & t_ok[None, :],
                other=0.0).to(tl.float32)
    if SILU:
        pre = _pre(X, Init, Wt, bias, c, c_ok, t, L, stride_xc, stride_xt, stride_ic, stride_it, stride_wc,
                   stride_wk, W, HAS_INIT)
        s = tl.sigmoid(pre)
        g = g * (s * (1.0 + pre * (1.0 - s)))
    return g


@triton.jit(do_not_specialize=_VARYING)
def _bwd_kernel(DOut, DFinal, X, Wt, Bias, Init, DX, DInit, DWPart, DBPart, L, D,
                stride_gb, stride_gc, stride_gt, stride_dfb, stride_dfc, stride_dft,
                stride_xb, stride_xc, stride_xt, stride_wc, stride_wk, stride_bc,
                stride_ib, stride_ic, stride_it, stride_dxb, stride_dxc, stride_dxt,
                stride_dib, stride_dic, stride_dit,
                W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr,
                SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < D
    t_own = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    p = t_own - (W - 1)
    DOut += b.to(tl.int64) * stride_gb
    X += b.to(tl.int64) * stride_xb
    Init += b.to(tl.int64) * stride_ib
    if HAS_BIAS:
        bias = tl.load(Bias + c * stride_bc, mask=c_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_C,), tl.float32)

    dxp = tl.zeros((BLOCK_C, BLOCK_T), tl.float32)
    for e in tl.static_range(W - 1):
        g = _dpre(DOut, X, Init, Wt, bias, c, c_ok, p + e, L, stride_gc, stride_gt, stride_xc, stride_xt,
                  stride_ic, stride_it, stride_wc, stride_wk, W, HAS_INIT, SILU)
        dxp += _weight(Wt, c, c_ok, W - 1 - e, stride_wc, stride_wk)[:, None] * g
    own = _dpre(DOut, X, Init, Wt, bias, c, c_ok, t_own, L, stride_gc, stride_gt, stride_xc, stride_xt,
                stride_ic, stride_it, stride_wc, stride_wk, W, HAS_INIT, SILU)
    dxp += _weight(Wt, c, c_ok, 0, stride_wc, stride_wk)[:, None] * own

    # dweight[k] = sum_t dpre[t] xpad[t + k - (W - 1)] and dbias = sum_t dpre[t] over the owned times.
    part = (b * tl.num_programs(0) + pid_t).to(tl.int64) * D * W
    for k in tl.static_range(W):
        xk = _load_xpad(X, Init, c, c_ok, p + k, L, stride_xc, stride_xt, stride_ic, stride_it, W, HAS_INIT)
        tl.store(DWPart + part + c * W + k, tl.sum(own * xk, 1), mask=c_ok)
    tl.store(DBPart + part // W + c, tl.sum(own, 1), mask=c_ok)

    if HAS_DFINAL:
        # final_state column j is xpad position L - (W - 1) + j.
        j = p - (L - (W - 1))
        j_ok = (j >= 0) & (j < W - 1)
        dxp += tl.load(DFinal + b.to(tl.int64) * stride_dfb + c[:, None] * stride_dfc + j[None, :] * stride_dft,
                       mask=c_ok[:, None] & j_ok[None, :], other=0.0).to(tl.float32)
    in_x = (p >= 0) & (p < L)
    tl.store(DX + b.to(tl.int64) * stride_dxb + c[:, None] * stride_dxc + p[None, :] * stride_dxt,
             dxp.to(DX.dtype.element_ty), mask=c_ok[:, None] & in_x[None, :])
    in_s = (p < 0) & (p >= 1 - W)
    tl.store(DInit + b.to(tl.int64) * stride_dib + c[:, None] * stride_dic + (p + W - 1)[None, :] * stride_dit,
             dxp.to(DInit.dtype.element_ty), mask=c_ok[:, None] & in_s[None, :])


# ----------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Config:
    block_c: int
    block_t: int
    num_warps: int


# GPU tiles (sm_80 and sm_90 alike; tests/static_gpu_check.py compiles each without spills). The
# compilers hoist every shifted load of a tile (W of x and W of initial_state in the forward; about
# 2 W^2 + W in the backward, which recomputes the pre-activation at W shifts) ahead of the arithmetic for
# memory-level parallelism, each element with its own 64-bit address: registers grow with elements per
# thread times loads, not with the tile. So the tiles stay at 4 (forward) and 2 (backward) elements per
# thread: at 8 and 16 (64 x 64 tiles, 4 warps) ptxas spilled up to 6 KiB; these use 86 / 127 registers
# (sm_90, float32, channel-last, width 4).
# No tensor cores: the taps are elementwise (see the module docstring), these entries have uses_dot=False.
_FWD_GPU = _Config(32, 32, 8)
_BWD_GPU = _Config(16, 32, 8)
# The interpreter runs one program at a time on CPU tensors: small tiles keep the tests fast and make the
# tests' short sequences span several time and channel tiles.
_FWD_INTERP = _Config(8, 32, 1)
_BWD_INTERP = _Config(8, 32, 1)


def _interpreted(device):
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _strides(t):
    return (t.stride(0), t.stride(1), t.stride(2)) if t is not None else (0, 0, 0)


def causal_conv1d_fwd(x, weight, bias, initial_state, silu):
    B, D, L = x.shape
    W = weight.shape[1]
    cfg = _FWD_INTERP if _interpreted(x.device) else _FWD_GPU
    out = torch.empty_like(x)  # x's layout when x is dense (channel-last stays channel-last)
    final_state = x.new_empty((B, D, W - 1))
    grid = (triton.cdiv(L, cfg.block_t), triton.cdiv(D, cfg.block_c), B)
    # Absent optional tensors are passed as x (never read: HAS_BIAS / HAS_INIT are false).
    _fwd_kernel[grid](
        x, weight, x if bias is None else bias, x if initial_state is None else initial_state, out, final_state,
        L, D, *_strides(x), weight.stride(0), weight.stride(1), 0 if bias is None else bias.stride(0),
        *_strides(initial_state), *_strides(out), *_strides(final_state),
        W=W, HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None, SILU=silu,
        BLOCK_C=cfg.block_c, BLOCK_T=cfg.block_t, num_warps=cfg.num_warps)
    return out, final_state


def causal_conv1d_bwd(grad_out, grad_final_state, x, weight, bias, initial_state, silu):
    B, D, L = x.shape
    W = weight.shape[1]
    cfg = _BWD_INTERP if _interpreted(x.device) else _BWD_GPU
    n_t = triton.cdiv(L + W - 1, cfg.block_t)  # the tiles own dpre times and xpad positions -(W-1) .. L-1
    dx = torch.empty_like(x)
    dinit = x.new_empty((B, D, W - 1))
    dw_part = x.new_empty((B * n_t, D, W), dtype=torch.float32)
    db_part = x.new_empty((B * n_t, D), dtype=torch.float32)
    _bwd_kernel[(n_t, triton.cdiv(D, cfg.block_c), B)](
        grad_out, x if grad_final_state is None else grad_final_state, x, weight,
        x if bias is None else bias, x if initial_state is None else initial_state, dx, dinit, dw_part, db_part,
        L, D, *_strides(grad_out), *_strides(grad_final_state), *_strides(x), weight.stride(0),
        weight.stride(1), 0 if bias is None else bias.stride(0), *_strides(initial_state), *_strides(dx),
        *_strides(dinit),
        W=W, HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None,
        HAS_DFINAL=grad_final_state is not None, SILU=silu,
        BLOCK_C=cfg.block_c, BLOCK_T=cfg.block_t, num_warps=cfg.num_warps)
    # Partial sums over (batch, time tile), reduced in float32 and rounded once.
    return dx, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(x.dtype), dinit


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time configurations (tests/static_gpu_check.py compiles each for sm_80 and sm_90)
# ----------------------------------------------------------------------------------------------------
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_F32_POINTERS = {"DWPart", "DBPart"}
_SIZES = {"L", "D"}  # integer arguments among the (capitalised) pointer names
# The unit stride of each layout, as triton specialises it on a real call: contiguous (B, D, L) tensors
# have unit time strides; channel-last views ((B, L, D).transpose(1, 2)) unit channel strides for x,
# grad_out, out and dx. weight (D, W) and the states (B, D, W - 1) are contiguous in both.
_UNIT = {"contiguous": {"stride_xt", "stride_gt", "stride_ot", "stride_dxt"},
         "channel_last": {"stride_xc", "stride_gc", "stride_oc", "stride_dxc"}}
_ALWAYS_UNIT = {"stride_wk", "stride_bc", "stride_it", "stride_ft", "stride_dft", "stride_dit"}


def _aot_entry(name, kernel, dtype, layout, constexprs, cfg):
    def classify(arg):
        if arg[0].isupper() and arg not in _SIZES:  # torch allocations
            return ("*fp32" if arg in _F32_POINTERS else "*" + _TRITON_DTYPE[dtype]), True
        if arg in _UNIT[layout] or arg in _ALWAYS_UNIT:
            return UNIT
        return "i32", False  # L, D and the other strides: no divisibility assumed (any dim, width)
    return aot_entry(name, kernel, dict(constexprs, BLOCK_C=cfg.block_c, BLOCK_T=cfg.block_t), classify,
                     num_warps=cfg.num_warps, uses_dot=False)


def aot_configs() -> list[dict]:
    """Every (dtype, layout, width) the GPU launchers compile, with every optional input present (the
    most live registers): the format of hierkern.ops.attention.triton.aot_configs. uses_dot is False
    for all of them: depthwise taps are elementwise, there is no matrix product for tensor cores."""
    entries = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for layout in ("contiguous", "channel_last"):
            for width in (2, 4):
                tag = f"{_TRITON_DTYPE[dtype]}_{layout}_w{width}"
                flags = {"W": width, "HAS_BIAS": True, "HAS_INIT": True, "SILU": True}
                entries.append(_aot_entry(f"conv1d_fwd_{tag}", _fwd_kernel, dtype, layout, flags, _FWD_GPU))
                entries.append(_aot_entry(f"conv1d_bwd_{tag}", _bwd_kernel, dtype, layout,
                                          {**flags, "HAS_DFINAL": True}, _BWD_GPU))
    return entries
