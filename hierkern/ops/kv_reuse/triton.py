"""Triton kernels for the approximate-KV-reuse primitives (conventions in reference.py).

refresh_select runs in two kernels plus a compaction, because a global k-selection cannot decide any
token before every similarity of its row is known:
  _sim_kernel      grid (token tiles, B): float32 cosine per token over heads x head_dim, NaN -> -inf,
                   written to a (B, S) float32 scratch (4 bytes a token: the K/V slabs are read once).
  _rank_kernel     grid (token tiles, B): rank of token i = #{j : s_j < s_i or (s_j == s_i and j < i)}
                   (the tie order), counted against every tile of the row; token i is selected iff
                   rank < k. O(S^2) comparisons, but S is a sequence (<= a few thousand) and they are
                   register-only compares, far below the cost of reading the K/V slabs.
  _compact_kernel  grid (B,): a running cumsum over the selection flags writes the selected indices in
                   ascending order (no sort, no host sync).
scatter_kv: _scatter_kernel grid (rows, B), one (kv_heads, head_dim) row per program, rotate-half RoPE
in float32 on the k half-pairs.

None of these kernels has a tl.dot (they are reductions, compares and copies): tensor cores do not
apply, the static check's mma/wgmma requirement is waived (uses_dot False in aot_configs).
S, k, n and every stride are never specialised: a new sequence length or selection size never
recompiles.
"""
import torch
import triton
import triton.language as tl

from .._aot import aot_entry
from ..attention.triton import _TRITON_DTYPE

_EPS: tl.constexpr = tl.constexpr(1e-8)
_VARYING = ["S", "k", "n", "max_len", "HD"]
_SIM_BLOCK_S, _SIM_BLOCK_D, _SIM_WARPS = 16, 64, 4
_RANK_BLOCK, _RANK_WARPS = 64, 4
_COMPACT_BLOCK, _COMPACT_WARPS = 256, 4


@triton.jit(do_not_specialize=_VARYING)
def _sim_kernel(New, Cached, Sim, S, H, D,
                stride_nb, stride_ns, stride_nh, stride_nd,
                stride_cb, stride_cs, stride_ch, stride_cd,
                BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < S
    offs_d = tl.arange(0, BLOCK_D)
    dot = tl.zeros([BLOCK_S], dtype=tl.float32)
    na = tl.zeros([BLOCK_S], dtype=tl.float32)
    nb = tl.zeros([BLOCK_S], dtype=tl.float32)
    for h in range(H):
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            m = s_ok[:, None] & (d < D)[None, :]
            x = tl.load(New + b * stride_nb + s[:, None] * stride_ns + h * stride_nh + d[None, :] * stride_nd,
                        mask=m, other=0.0).to(tl.float32)
            y = tl.load(Cached + b * stride_cb + s[:, None] * stride_cs + h * stride_ch + d[None, :] * stride_cd,
                        mask=m, other=0.0).to(tl.float32)
            dot += tl.sum(x * y, 1)
            na += tl.sum(x * x, 1)
            nb += tl.sum(y * y, 1)
    c = dot / tl.maximum(tl.sqrt(na) * tl.sqrt(nb), _EPS)
    c = tl.where(c != c, float("-inf"), c)
    tl.store(Sim + b * S + s, c, mask=s_ok)


@triton.jit(do_not_specialize=_VARYING)
def _rank_kernel(Sim, Flag, S, k, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    i_ok = i < S
    si = tl.load(Sim + b * S + i, mask=i_ok, other=0.0)
    rank = tl.zeros([BLOCK], dtype=tl.int32)
    for j0 in range(0, S, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        sj = tl.load(Sim + b * S + j, mask=j < S, other=0.0)
        before = (sj[None, :] < si[:, None]) | ((sj[None, :] == si[:, None]) & (j[None, :] < i[:, None]))
        before = before & (j < S)[None, :]
        rank += tl.sum(before.to(tl.int32), 1)
    tl.store(Flag + b * S + i, (rank < k).to(tl.int32), mask=i_ok)


@triton.jit(do_not_specialize=_VARYING)
def _compact_kernel(Flag, Out, S, stride_ob, stride_ok, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = 0
    for i0 in range(0, S, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        f = tl.load(Flag + b * S + i, mask=i < S, other=0)
        pos = base + tl.cumsum(f, 0) - 1
        tl.store(Out + b * stride_ob + pos.to(tl.int64) * stride_ok, i.to(tl.int64), mask=f != 0)
        base += tl.sum(f, 0)


@triton.jit(do_not_specialize=_VARYING)
def _scatter_kernel(KC, VC, Index, K, V, Cos, Sin, n, H, D,
                    stride_kcb, stride_kcl, stride_kch, stride_kcd,
                    stride_vcb, stride_vcl, stride_vch, stride_vcd,
                    stride_ib, stride_in,
                    stride_kb, stride_kn, stride_kh, stride_kd,
                    stride_vb, stride_vn, stride_vh, stride_vd,
                    stride_cl, stride_cd, stride_sl, stride_sd,
                    ROPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    i = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    p = tl.load(Index + b * stride_ib + i * stride_in)
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    half = D // 2
    # Two half-width column sets cover D (D even with ROPE; otherwise the second set ends at D).
    for part in tl.static_range(2):
        col = part * half + j
        if part == 0:
            col_ok = j < half
        else:
            col_ok = col < D
        m = (h < H)[:, None] & col_ok[None, :]
        v = tl.load(V + b * stride_vb + i * stride_vn + h[:, None] * stride_vh + col[None, :] * stride_vd, mask=m)
        tl.store(VC + b * stride_vcb + p * stride_vcl + h[:, None] * stride_vch + col[None, :] * stride_vcd, v,
                 mask=m)
        if not ROPE:
            x = tl.load(K + b * stride_kb + i * stride_kn + h[:, None] * stride_kh + col[None, :] * stride_kd,
                        mask=m)
            tl.store(KC + b * stride_kcb + p * stride_kcl + h[:, None] * stride_kch + col[None, :] * stride_kcd, x,
                     mask=m)
    if ROPE:
        m = (h < H)[:, None] & (j < half)[None, :]
        kb = K + b * stride_kb + i * stride_kn + h[:, None] * stride_kh
        x1 = tl.load(kb + j[None, :] * stride_kd, mask=m).to(tl.float32)
        x2 = tl.load(kb + (j + half)[None, :] * stride_kd, mask=m).to(tl.float32)
        c = tl.load(Cos + p * stride_cl + j * stride_cd, mask=j < half).to(tl.float32)[None, :]
        s = tl.load(Sin + p * stride_sl + j * stride_sd, mask=j < half).to(tl.float32)[None, :]
        out = KC + b * stride_kcb + p * stride_kcl + h[:, None] * stride_kch
        tl.store(out + j[None, :] * stride_kcd, (x1 * c - x2 * s).to(KC.dtype.element_ty), mask=m)
        tl.store(out + (j + half)[None, :] * stride_kcd, (x2 * c + x1 * s).to(KC.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def refresh_select(new, cached, k: int):
    B, S, H, D = new.shape
    out = torch.empty((B, k), dtype=torch.int64, device=new.device)
    if k == 0 or B == 0:
        return out
    sim = torch.empty((B, S), dtype=torch.float32, device=new.device)
    flag = torch.empty((B, S), dtype=torch.int32, device=new.device)
    _sim_kernel[(triton.cdiv(S, _SIM_BLOCK_S), B)](
        new, cached, sim, S, H, D, *new.stride(), *cached.stride(),
        BLOCK_S=_SIM_BLOCK_S, BLOCK_D=min(_SIM_BLOCK_D, triton.next_power_of_2(D)), num_warps=_SIM_WARPS)
    _rank_kernel[(triton.cdiv(S, _RANK_BLOCK), B)](sim, flag, S, k, BLOCK=_RANK_BLOCK, num_warps=_RANK_WARPS)
    _compact_kernel[(B,)](flag, out, S, *out.stride(), BLOCK=_COMPACT_BLOCK, num_warps=_COMPACT_WARPS)
    return out


def _blocks(H, D):
    return triton.next_power_of_2(H), triton.next_power_of_2(max(1, (D + 1) // 2))


def scatter_kv(k_cache, v_cache, index, k, v, cos, sin):
    B, n, H, D = k.shape
    if B == 0 or n == 0:
        return
    rope = cos is not None
    c, s = (cos, sin) if rope else (index, index)  # never read without ROPE
    block_h, block_half = _blocks(H, D)
    _scatter_kernel[(n, B)](
        k_cache, v_cache, index, k, v, c, s, n, H, D,
        *k_cache.stride(), *v_cache.stride(), *index.stride(), *k.stride(), *v.stride(),
        c.stride(0), c.stride(1), s.stride(0), s.stride(1),
        ROPE=rope, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=1 if block_h * block_half <= 256 else 4)


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time configurations (tests/static_gpu_check.py compiles each for sm_80 and sm_90)
# ----------------------------------------------------------------------------------------------------
def _entry(name, kernel, pointer_types, divisible, constexprs, num_warps):
    """An aot_entry whose runtime arguments are the pointers named in pointer_types (the ones in
    `divisible` 16-aligned) and otherwise plain i32."""
    return aot_entry(name, kernel, constexprs, lambda arg: (pointer_types.get(arg, "i32"), arg in divisible),
                     num_warps=num_warps, uses_dot=False)


def aot_configs() -> list[dict]:
    """Every kernel configuration the launchers pick, in the format of
    hierkern.ops.attention.triton.aot_configs. uses_dot is False for all: no matrix product here
    (cosine reductions, rank compares, a cumsum and row copies), so the tensor-core check is waived."""
    entries = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        tdt = "*" + _TRITON_DTYPE[dtype]
        entries.append(_entry(f"kv_sim_{tdt[1:]}", _sim_kernel, {"New": tdt, "Cached": tdt, "Sim": "*fp32"},
                              {"New", "Cached", "Sim"}, {"BLOCK_S": _SIM_BLOCK_S, "BLOCK_D": _SIM_BLOCK_D},
                              _SIM_WARPS))
        for head_dim, kv_heads in ((64, 2), (128, 8)):
            for rope in (False, True):
                block_h, block_half = _blocks(kv_heads, head_dim)
                ptrs = {"KC": tdt, "VC": tdt, "K": tdt, "V": tdt, "Index": "*i64",
                        "Cos": "*fp32" if rope else "*i64", "Sin": "*fp32" if rope else "*i64"}
                entries.append(_entry(f"kv_scatter_{tdt[1:]}_h{kv_heads}_d{head_dim}{'_rope' if rope else ''}",
                                      _scatter_kernel, ptrs, {"KC", "VC", "K", "V", "Index"},
                                      {"ROPE": rope, "BLOCK_H": block_h, "BLOCK_HALF": block_half},
                                      1 if block_h * block_half <= 256 else 4))
    entries.append(_entry("kv_rank", _rank_kernel, {"Sim": "*fp32", "Flag": "*i32"}, {"Sim", "Flag"},
                          {"BLOCK": _RANK_BLOCK}, _RANK_WARPS))
    entries.append(_entry("kv_compact", _compact_kernel, {"Flag": "*i32", "Out": "*i64"}, {"Flag", "Out"},
                          {"BLOCK": _COMPACT_BLOCK}, _COMPACT_WARPS))
    return entries
