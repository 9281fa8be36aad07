"""Benchmark: skip_causal_attention (block-diffusion training attention) against its peers.

    python -m bench.bench_skip_causal [--device cpu|cuda] [--quick] [--out FILE.json] [--sdar]

Shapes from the issue: BD3-LM (N=1024 so 2N=2048 tokens per sequence, block 4 and 16, 12 heads, D=64,
noisy_first) and SDAR (N=4096, 32 q / 8 kv heads, D=128, block 4). CPU: float32, batch 1, BD3 shapes
(SDAR only with --sdar: one dense-SDPA call there costs about a TFLOP). CUDA: bf16, batch 8 (BD3) and
batch 2 (SDAR).

Peers, measured in the same run with bench/common.py's harness (interleaved timed calls, medians,
peak extra memory): SDPA with the dense (2N, 2N) bool mask (the mask built once, outside the timing,
its build time on its own line), torch.compile(flex_attention) with the BD3 mask_mod as users write
it (create_block_mask on its own line, compile time excluded), and hierkern's dense-mask reference.
Metadata lines compare what each library builds before a call: hierkern's document offsets and tile
schedule (caches cleared, so this is the cold cost) against flex's create_block_mask.
ratio = peer time / hierkern time (> 1: hierkern faster). Useful FLOPs: 4*B*H*D*(N^2 + N*block) per
document forward, 3.5x that forward+backward.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
import torch.nn.functional as F

import hierkern
from hierkern import _backend
from hierkern.ops.attention import skip_causal, tiling
from hierkern.ops.attention.patterns import visible_pairs
from hierkern.ops.attention.reference import interval_mask

from . import common
from .common import BWD_FACTOR, DTYPE_NAMES


@dataclasses.dataclass(frozen=True)
class SkipConfig:
    label: str
    N: int               # tokens per half: a sequence is [x_t ; x_0] of 2N tokens
    block: int
    B: int
    H: int
    Hkv: int
    D: int
    dtype: torch.dtype
    order: str = "noisy_first"

    @property
    def L(self):
        return 2 * self.N

    @property
    def offsets(self):
        return (0, self.L)

    @property
    def pattern_id(self):
        return skip_causal.ORDERS[self.order]

    @property
    def pairs(self):
        return visible_pairs(self.offsets, self.pattern_id, self.block)

    @property
    def name(self):
        return (f"{self.label} N={self.N} block={self.block} B{self.B} H{self.H}/{self.Hkv} D{self.D} "
                f"{DTYPE_NAMES[self.dtype]}")

    @property
    def id(self):
        return f"{self.label}-N{self.N}-blk{self.block}-B{self.B}-{DTYPE_NAMES[self.dtype]}"

    def flops(self, op):
        fwd = 4.0 * self.B * self.H * self.D * self.pairs
        return fwd if op == "fwd" else fwd * (1.0 + BWD_FACTOR)

    def as_dict(self):
        return {"label": self.label, "N": self.N, "seq": self.L, "block": self.block, "B": self.B,
                "H": self.H, "Hkv": self.Hkv, "D": self.D, "dtype": DTYPE_NAMES[self.dtype],
                "order": self.order, "visible_pairs": self.pairs, "density": round(self.pairs / self.L ** 2, 4)}


def configs(device, quick=False, sdar=False):
    if device == "cuda":
        if quick:
            return [SkipConfig("BD3", 1024, 16, 4, 12, 12, 64, torch.bfloat16)]
        return [SkipConfig("BD3", 1024, 4, 8, 12, 12, 64, torch.bfloat16),
                SkipConfig("BD3", 1024, 16, 8, 12, 12, 64, torch.bfloat16),
                SkipConfig("SDAR", 4096, 4, 2, 32, 8, 128, torch.bfloat16)]
    if quick:
        return [SkipConfig("BD3", 256, 16, 1, 4, 4, 64, torch.float32)]
    out = [SkipConfig("BD3", 1024, 4, 1, 12, 12, 64, torch.float32),
           SkipConfig("BD3", 1024, 16, 1, 12, 12, 64, torch.float32)]
    if sdar:
        out.append(SkipConfig("SDAR", 4096, 4, 1, 32, 8, 128, torch.float32))
    return out


def bd3_mask_mod(cfg: SkipConfig):
    """BD3-LM's block_diff_mask, as a FlexAttention user writes it (noisy_first, one document)."""
    n, blk = cfg.N, cfg.block

    def mask_mod(b, h, q_idx, kv_idx):
        q_noisy, kv_noisy = q_idx < n, kv_idx < n
        qb = torch.where(q_noisy, q_idx, q_idx - n) // blk
        kb = torch.where(kv_noisy, kv_idx, kv_idx - n) // blk
        diagonal = q_noisy & kv_noisy & (qb == kb)
        offset = q_noisy & ~kv_noisy & (kb < qb)
        clean = ~q_noisy & ~kv_noisy & (kb <= qb)
        return diagonal | offset | clean
    return mask_mod


def make_block_mask(cfg, device):
    from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(bd3_mask_mod(cfg), None, None, cfg.L, cfg.L, device=device)


def hierkern_metadata(cfg, device, backend):
    """Everything hierkern derives before a call, from cold: the document offsets (validated), their
    int32 device copy, and for Triton the q / k tile schedules."""
    skip_causal._OFFSETS_CACHE.clear()
    offsets = skip_causal._document_offsets("bench", None, cfg.L)
    t = skip_causal._offsets_tensor_fn(offsets)(device)
    if backend == "triton":
        for fn in ("_q_schedule", "_k_schedule"):
            getattr(tiling, fn).cache_clear()
        tiling._TENSOR_CACHE.clear()
        from hierkern.ops.attention import triton as tk
        fwd_m, _ = tk.fwd_blocks(cfg.D, cfg.dtype, torch.device(device))
        bwd_m, bwd_n = tk.bwd_blocks(cfg.D, cfg.dtype, torch.device(device))
        tiling.q_tiles(offsets, cfg.pattern_id, fwd_m, device)
        tiling.q_tiles(offsets, cfg.pattern_id, bwd_m, device)
        tiling.k_tiles(offsets, cfg.pattern_id, bwd_n, device)
    return t


class SkipCase(common.Case):
    """common.Case's inputs and step() for a skip-causal config (GQA k/v)."""

    def __init__(self, cfg: SkipConfig, device: str, seed: int = 0):
        self.cfg, self.device = cfg, device
        g = torch.Generator(device="cpu").manual_seed(seed)

        def rnd(h):
            return torch.randn((cfg.B, cfg.L, h, cfg.D), generator=g).to(device=device, dtype=cfg.dtype)

        self.q, self.k, self.v = rnd(cfg.H), rnd(cfg.Hkv), rnd(cfg.Hkv)
        self.grad_out = rnd(cfg.H)
        self.qg, self.kg, self.vg = (t.detach().clone().requires_grad_(True) for t in (self.q, self.k, self.v))
        self.hierkern_impl = None
        self.hierkern_backend = _backend.select("skip_causal_attention", None, torch.device(device),
                                                cuda_op="interval_attn_fwd")
        self._mask = self._block_mask = None

    def build_mask(self):
        return interval_mask(self.cfg.offsets, self.cfg.pattern_id, device=self.device, block_size=self.cfg.block)

    def build_block_mask(self):
        return make_block_mask(self.cfg, self.device)

    def forward_fn(self, peer):
        cfg = self.cfg
        gqa = cfg.H != cfg.Hkv
        if peer in ("hierkern", "reference"):
            impl = None if peer == "hierkern" else "reference"
            return lambda q, k, v: hierkern.skip_causal_attention(q, k, v, cfg.block, cfg.order, impl=impl)
        if peer == "sdpa_dense":
            mask = self.mask

            def sdpa_dense(q, k, v):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      attn_mask=mask, enable_gqa=gqa).transpose(1, 2)
            return sdpa_dense
        if peer == "flex":
            fa, bm = common.compiled_flex(), self.block_mask

            def flex(q, k, v):
                return fa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm,
                          enable_gqa=gqa).transpose(1, 2)
            return flex
        raise ValueError(f"unknown peer {peer!r}")


def metadata_rows(case, reps):
    cfg, dev = case.cfg, case.device
    rows = []
    for label, fn in (("hierkern metadata (offsets + schedule, cold)",
                       lambda: hierkern_metadata(cfg, dev, case.hierkern_backend)),
                      ("flex create_block_mask", lambda: make_block_mask(cfg, dev)),
                      ("dense bool mask build", lambda: interval_mask(cfg.offsets, cfg.pattern_id, device=dev,
                                                                      block_size=cfg.block))):
        row = {"config": cfg.name, "op": "metadata", "peer": label, "label": label, "median_ms": None,
               "error": None}
        try:
            row["median_ms"] = common.median_seconds(fn, dev, reps) * 1e3
        except Exception as e:  # noqa: BLE001 - a peer failing is a result
            row["error"] = common._short_error(e)
        rows.append(row)
    return rows


def targets(rows, device):
    """The issue's targets: CPU fwd >= 1.5x the faster peer at BD3 shapes; GPU fwd+bwd >= 1.3x compiled
    flex; metadata >= 100x cheaper than create_block_mask."""
    out = []
    by = {(r["config"], r["op"], r["peer"]): r for r in rows}
    for cfg_name in dict.fromkeys(r["config"] for r in rows):
        hk = lambda op: (by.get((cfg_name, op, "hierkern")) or {}).get("median_ms")  # noqa: E731
        if device == "cpu" and cfg_name.startswith("BD3"):
            peers = [by[(cfg_name, "fwd", p)]["median_ms"] for p in ("sdpa_dense", "flex")
                     if (cfg_name, "fwd", p) in by and by[(cfg_name, "fwd", p)]["median_ms"]]
            if hk("fwd") and peers:
                out.append((f"{cfg_name}: CPU fwd vs faster peer", min(peers) / hk("fwd"), 1.5))
        if device == "cuda":
            fl = (by.get((cfg_name, "fwd+bwd", "flex")) or {}).get("median_ms")
            if hk("fwd+bwd") and fl:
                out.append((f"{cfg_name}: GPU fwd+bwd vs compiled flex", fl / hk("fwd+bwd"), 1.3))
        meta = by.get((cfg_name, "metadata", "hierkern metadata (offsets + schedule, cold)"), {}).get("median_ms")
        cbm = by.get((cfg_name, "metadata", "flex create_block_mask"), {}).get("median_ms")
        if meta and cbm:
            out.append((f"{cfg_name}: metadata vs create_block_mask", cbm / meta, 100.0))
    return [{"target": t, "measured": round(m, 2), "goal": g, "met": m >= g} for t, m, g in out]


def markdown(env, rows, tgts):
    lines = [f"## skip_causal_attention benchmark: {env['device']}", "",
             f"{env['date']} | {env['device_name']} | torch {env['torch']} | threads {env['threads']}", "",
             "| config | op | impl/peer | median ms | TFLOP/s | peak MB | ratio | notes |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        note = r.get("error") or ""
        if r.get("compile_s") is not None:
            note = (note + f" compile {r['compile_s']:.1f} s (excluded)").strip()
        lines.append(f"| {r['config']} | {r['op']} | {r['label']} | {common.fmt(r.get('median_ms'), '.3f')} | "
                     f"{common.fmt(r.get('tflops'), '.3f')} | {common.fmt(r.get('peak_mb'), '.1f')} | "
                     f"{common.fmt(r.get('ratio'))} | {note} |")
    lines += ["", "| target | measured | goal | met |", "|---|---:|---:|---|"]
    lines += [f"| {t['target']} | {t['measured']}x | >= {t['goal']}x | {'yes' if t['met'] else 'no'} |" for t in tgts]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=common.default_device())
    ap.add_argument("--quick", action="store_true", help="one small config (CI smoke)")
    ap.add_argument("--sdar", action="store_true", help="CPU: also the SDAR shape (slow: dense SDPA ~1 TFLOP)")
    ap.add_argument("--peers", default="hierkern,sdpa_dense,flex,reference")
    ap.add_argument("--ops", default="fwd,fwd+bwd")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--configs", default="", help="comma list of substrings: only configs whose name holds one")
    ap.add_argument("--out", help="write the rows, targets and environment as JSON (and a .md beside it)")
    args = ap.parse_args(argv)
    dev = args.device
    env = {"device": dev, "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__,
           "threads": torch.get_num_threads(),
           "device_name": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
    policy = common.policy_for(dev, args.quick)
    rows, cfgs = [], configs(dev, args.quick, args.sdar)
    only = [c for c in args.configs.split(",") if c]
    if only:
        cfgs = [c for c in cfgs if any(o in c.name for o in only)]
    for cfg in cfgs:
        case = SkipCase(cfg, dev)
        for op in args.ops.split(","):
            peers = args.peers.split(",")
            if op == "fwd+bwd" and cfg.label == "SDAR" and dev == "cpu":
                peers = [p for p in peers if p != "reference"]
            rows += common.measure_group(case, peers, op, policy, memory=not args.no_memory)
            print(f"measured {cfg.name} {op}", flush=True)
        rows += metadata_rows(case, reps=3 if dev == "cpu" else 10)
        del case
    common.add_ratios(rows)
    tgts = targets(rows, dev)
    text = markdown(env, rows, tgts)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "configs": [c.as_dict() for c in cfgs], "rows": rows, "targets": tgts}, f,
                      indent=1, default=str)
        with open(args.out.rsplit(".", 1)[0] + ".md", "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
