"""Shared benchmark cases for next_scale_attention: configurations, peers, timing, peak memory and
useful-FLOP accounting. Used by both bench/test_bench_next_scale.py (pytest-benchmark) and bench/report.py,
so the two always measure the same things.

Definitions (see bench/README.md):
- useful FLOPs: 4 * B * H * D * visible_pairs for the forward (QK^T and PV over unmasked pairs only);
  the backward counts 2.5x the forward, so forward+backward = 3.5x.
- time: median wall time of single calls after a warm-up call (CUDA: CUDA events around each call).
- peak memory: the peak *extra* memory allocated by one call (inputs excluded, outputs and everything
  the call allocates included). CUDA: torch.cuda.max_memory_allocated() after reset, minus the
  allocation before the call. CPU: the call runs once under torch.profiler with profile_memory=True;
  every allocation/free made through torch's CPU allocator is replayed in time order and the maximum
  running sum is taken. Memory a kernel takes outside torch's allocator (e.g. std::vector scratch in
  C++ kernels) is not seen on CPU.
- ratio: peer_time / hierkern_time for the same config and op (> 1 means hierkern is faster).
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

import hierkern
from hierkern import _backend
from hierkern.layouts import VAR_256, VAR_512
from hierkern.ops.attention.patterns import visible_pairs
from hierkern.ops.attention.reference import interval_mask
from hierkern.ops.attention.next_scale import PATTERNS

OPS = ("fwd", "fwd+bwd")
PEERS = ("hierkern", "sdpa_dense", "flex", "per_scale_sdpa", "reference")
PEER_LABELS = {
    "hierkern": "hierkern",
    "sdpa_dense": "SDPA + dense bool mask",
    "flex": "compiled flex_attention + BlockMask",
    "per_scale_sdpa": "per-scale SDPA loop",
    "reference": "eager reference",
    "flex_block_mask": "flex create_block_mask",
}
BWD_FACTOR = 2.5  # backward FLOPs relative to forward
SCHEDULES = {256: VAR_256, 512: VAR_512}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    res: int             # 256 or 512: which VAR schedule
    pattern: str         # "causal" | "diagonal"
    B: int
    H: int
    D: int
    dtype: torch.dtype

    @property
    def patch_nums(self):
        return SCHEDULES[self.res]

    @property
    def layout(self) -> hierkern.ScaleLayout:
        return hierkern.ScaleLayout(self.patch_nums)

    @property
    def L(self) -> int:
        return self.layout.L

    @property
    def pattern_id(self) -> int:
        return PATTERNS[self.pattern]

    @property
    def pairs(self) -> int:
        return visible_pairs(self.layout.offsets, self.pattern_id)

    @property
    def density(self) -> float:
        return self.pairs / self.L ** 2

    @property
    def name(self) -> str:
        return (f"VAR{self.res} {self.pattern} L={self.L} B{self.B} H{self.H} D{self.D} "
                f"{DTYPE_NAMES[self.dtype]}")

    @property
    def id(self) -> str:  # short pytest id
        return f"{self.res}-{self.pattern}-B{self.B}H{self.H}D{self.D}-{DTYPE_NAMES[self.dtype]}"

    def flops(self, op: str) -> float:
        fwd = 4.0 * self.B * self.H * self.D * self.pairs
        return fwd if op == "fwd" else fwd * (1.0 + BWD_FACTOR)

    def as_dict(self):
        return {"res": self.res, "pattern": self.pattern, "L": self.L, "B": self.B, "H": self.H,
                "D": self.D, "dtype": DTYPE_NAMES[self.dtype], "visible_pairs": self.pairs,
                "density": round(self.density, 4), "patch_nums": list(self.patch_nums)}


def cpu_configs(quick: bool = False):
    """The issue's CPU config: float32, B=2, H=16, D=64 at L=680 and 2240. Quick: B=1, H=4, L=680."""
    if quick:
        return [Config(256, p, 1, 4, 64, torch.float32) for p in ("causal", "diagonal")]
    return [Config(res, p, 2, 16, 64, torch.float32) for res in (256, 512) for p in ("causal", "diagonal")]


def gpu_configs(quick: bool = False):
    """The issue's GPU config: bf16, B=8, H=16; D=64 at L=680 and 2240, D=128 at L=2240."""
    if quick:
        return [Config(256, p, 2, 16, 64, torch.bfloat16) for p in ("causal", "diagonal")]
    shapes = [(256, 64), (512, 64), (512, 128)]
    return [Config(res, p, 8, 16, d, torch.bfloat16) for res, d in shapes for p in ("causal", "diagonal")]


def configs_for(device: str, quick: bool = False):
    return gpu_configs(quick) if device == "cuda" else cpu_configs(quick)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def fwd_and_fwd_bwd(call, inputs, grad_names, grad_out):
    """Timing factories over a dict of inputs: fwd(name) runs call(name, inputs) without autograd;
    fwd_bwd(name) runs it on fresh leaves and differentiates <out, grad_out> w.r.t. grad_names."""
    def fwd(name):
        def f():
            with torch.no_grad():
                return call(name, inputs)
        return f

    def fwd_bwd(name):
        leaves = {k: (v.detach().requires_grad_() if k in grad_names else v) for k, v in inputs.items()}
        return lambda: torch.autograd.grad((call(name, leaves) * grad_out).sum(), [leaves[k] for k in grad_names])
    return fwd, fwd_bwd


# ----------------------------------------------------------------------------------------------
# targets (from the issue); evaluated by report.py
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Target:
    """kind 'ratio': min over `peers` (those measured) of peer_time / hierkern_time >= threshold.
    kind 'tflops': hierkern useful TFLOP/s >= threshold."""
    res: int
    pattern: str
    op: str
    kind: str
    threshold: float
    peers: tuple = ()
    D: int | None = None

    def matches(self, cfg: Config) -> bool:
        return (cfg.res == self.res and cfg.pattern == self.pattern
                and (self.D is None or cfg.D == self.D))

    def describe(self) -> str:
        d = f" D={self.D}" if self.D is not None else ""
        where = f"VAR{self.res} {self.pattern}{d} {self.op}"
        if self.kind == "tflops":
            return f"{where}: hierkern >= {self.threshold:g} useful TFLOP/s"
        vs = " / ".join(self.peers)
        faster = "the faster of " if len(self.peers) > 1 else ""
        return f"{where}: hierkern >= {self.threshold:g}x {faster}{vs}"


def targets_for(device: str):
    out = []
    if device == "cuda":
        for res, d in ((256, 64), (512, 64), (512, 128)):
            for p in ("causal", "diagonal"):
                out.append(Target(res, p, "fwd", "ratio", 1.5 if res == 256 else 1.2, ("flex",), D=d))
        for p in ("causal", "diagonal"):
            out.append(Target(512, p, "fwd", "tflops", 300.0, D=64))
        return out
    dense = ("sdpa_dense", "flex")
    for res in (256, 512):
        out.append(Target(res, "causal", "fwd", "ratio", 1.5, dense))
        out.append(Target(res, "diagonal", "fwd", "ratio", 3.0, dense))
        out.append(Target(res, "causal", "fwd", "ratio", 1.1, ("per_scale_sdpa",)))
        out.append(Target(res, "diagonal", "fwd", "ratio", 1.1, ("per_scale_sdpa",)))
        out.append(Target(res, "causal", "fwd+bwd", "ratio", 1.3, dense))
        out.append(Target(res, "diagonal", "fwd+bwd", "ratio", 2.5, dense))
    return out


# ----------------------------------------------------------------------------------------------
# the cases: inputs and one callable per (peer, op)
# ----------------------------------------------------------------------------------------------

class Unsupported(Exception):
    """This peer cannot run this op on this device (reported as n/a, never a crash)."""


_FLEX_COMPILED = None


def compiled_flex():
    """torch.compile(flex_attention), created once. dynamic=False: every shape/mask gets its own
    static-shape compile (what a user of a fixed schedule gets); the recompile limit is raised so the
    benchmark's many shape/mask combinations never fall back to eager."""
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention
        for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 256))
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def flex_mask_mod(cfg: Config, device):
    """The mask_mod a FlexAttention user writes for next-scale attention: a scale-id lookup."""
    seg = cfg.layout.scale_ids(device=device).to(torch.int32)
    if cfg.pattern == "causal":
        def mask_mod(b, h, q_idx, kv_idx):
            return seg[kv_idx] <= seg[q_idx]
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return seg[kv_idx] == seg[q_idx]
    return mask_mod


_FLEX_BWD_PROBE = {}


def flex_backward_error(device) -> str | None:
    """Why flex_attention cannot differentiate on `device` (None if it can). Probed once with a tiny
    eager call: a failing call inside the compiled wrapper can leave dynamo running that code
    eagerly for later (unrelated) calls, so the compiled function never sees an unsupported call."""
    key = str(device)
    if key not in _FLEX_BWD_PROBE:
        from torch.nn.attention.flex_attention import flex_attention
        try:
            t = torch.randn(1, 1, 128, 16, device=device, requires_grad=True)
            flex_attention(t, t, t).sum().backward()
            _FLEX_BWD_PROBE[key] = None
        except Exception as e:  # noqa: BLE001
            _FLEX_BWD_PROBE[key] = _short_error(e)
    return _FLEX_BWD_PROBE[key]


def make_block_mask(cfg: Config, device):
    from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(flex_mask_mod(cfg, device), None, None, cfg.L, cfg.L, device=device)


class Case:
    """Fresh random inputs for one config on one device, plus the per-peer callables.

    Forward-only calls use inputs without requires_grad; forward+backward calls use leaf inputs
    with requires_grad and torch.autograd.grad (no .grad accumulation), all three grads computed."""

    def __init__(self, cfg: Config, device: str, hierkern_impl=None, seed: int = 0):
        self.cfg, self.device = cfg, device
        self.layout = cfg.layout
        g = torch.Generator(device="cpu").manual_seed(seed)
        shape = (cfg.B, cfg.L, cfg.H, cfg.D)

        def rnd():
            return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=cfg.dtype)

        self.q, self.k, self.v = rnd(), rnd(), rnd()
        self.grad_out = rnd()
        self.qg, self.kg, self.vg = (t.detach().clone().requires_grad_(True) for t in (self.q, self.k, self.v))
        self.hierkern_impl = hierkern_impl
        self.hierkern_backend = _backend.select("next_scale_attention", hierkern_impl, torch.device(device),
                                                cuda_op="interval_attn_fwd")
        self._mask = None
        self._block_mask = None
        # per-scale ranges: query rows [s, e) see keys [lo, e)
        offs = self.layout.offsets
        self.scale_ranges = [(offs[i], offs[i + 1], 0 if cfg.pattern == "causal" else offs[i])
                             for i in range(len(offs) - 1)]

    # lazily built, outside any timing ---------------------------------------------------------
    @property
    def mask(self):
        if self._mask is None:
            self._mask = self.build_mask()
        return self._mask

    @property
    def block_mask(self):
        if self._block_mask is None:
            self._block_mask = self.build_block_mask()
        return self._block_mask

    def build_mask(self):
        return interval_mask(self.layout.offsets, self.cfg.pattern_id, device=self.device)

    def build_block_mask(self):
        return make_block_mask(self.cfg, self.device)

    # forward functions: BSHD in, BSHD out ----------------------------------------------------
    def forward_fn(self, peer: str) -> Callable:
        cfg, lay = self.cfg, self.layout
        if peer == "hierkern":
            impl = self.hierkern_impl
            return lambda q, k, v: hierkern.next_scale_attention(q, k, v, lay, cfg.pattern, impl=impl)
        if peer == "reference":
            return lambda q, k, v: hierkern.next_scale_attention(q, k, v, lay, cfg.pattern, impl="reference")
        if peer == "sdpa_dense":
            mask = self.mask

            def sdpa_dense(q, k, v):
                o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   attn_mask=mask)
                return o.transpose(1, 2)
            return sdpa_dense
        if peer == "per_scale_sdpa":
            ranges = self.scale_ranges

            def per_scale_sdpa(q, k, v):
                # one unmasked SDPA per scale over its visible keys (the varlen trick); BHSD views of
                # the BSHD inputs, outputs concatenated back along the sequence (one copy, like
                # writing into a preallocated buffer; autograd-friendly).
                outs = []
                for s, e, lo in ranges:
                    o = F.scaled_dot_product_attention(q[:, s:e].transpose(1, 2), k[:, lo:e].transpose(1, 2),
                                                       v[:, lo:e].transpose(1, 2))
                    outs.append(o.transpose(1, 2))
                return torch.cat(outs, dim=1)
            return per_scale_sdpa
        if peer == "flex":
            fa = compiled_flex()
            bm = self.block_mask

            def flex(q, k, v):
                return fa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm).transpose(1, 2)
            return flex
        raise ValueError(f"unknown peer {peer!r}")

    def step(self, peer: str, op: str) -> Callable[[], object]:
        """A zero-argument callable doing one forward (op='fwd') or forward+backward."""
        if peer == "flex" and op == "fwd+bwd":
            err = flex_backward_error(self.device)
            if err is not None:
                raise Unsupported(err)
        f = self.forward_fn(peer)
        if op == "fwd":
            q, k, v = self.q, self.k, self.v
            return lambda: f(q, k, v)
        if op == "fwd+bwd":
            q, k, v, go = self.qg, self.kg, self.vg, self.grad_out

            def fwd_bwd():
                out = f(q, k, v)
                return torch.autograd.grad(out, (q, k, v), go)
            return fwd_bwd
        raise ValueError(f"unknown op {op!r}")

    def hierkern_label(self) -> str:
        return f"hierkern[{self.hierkern_backend}]"


# ----------------------------------------------------------------------------------------------
# timing and memory
# ----------------------------------------------------------------------------------------------

def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def flush_mib() -> int:
    """The cache flush size in MiB (HIERKERN_BENCH_FLUSH_MB, default 256; 0: no flush)."""
    raw = os.environ.get("HIERKERN_BENCH_FLUSH_MB", "256")
    try:
        mb = int(raw)
    except ValueError:
        mb = -1
    if mb < 0:
        raise ValueError(f"HIERKERN_BENCH_FLUSH_MB must be a whole number of MiB >= 0 (0: no flush), got {raw!r}")
    return mb


_flush_buffers: dict = {}


def flush_caches(device: str):
    """Evicts the caches before a timed call, as triton.testing.do_bench does on GPUs: every call then
    starts from the same state whatever ran before it. Without it a CPU peer's time depended on its
    place in the round (the L=680 diagonal forward: hierkern, timed right after the eager reference's
    ~170 MB of traffic, 6.4-7.3 ms; the per-scale loop, timed after compiled flex, 6.9-7.4 ms; each
    ~5.2 / ~6.1 ms when the two alternate alone). CPU: reads a HIERKERN_BENCH_FLUSH_MB (default 256)
    buffer, which leaves clean lines (no write-backs charged to the next call); CUDA: zeroes it and
    synchronises, so the call's launch overhead is still timed. 0 turns the flush off."""
    mb = flush_mib()
    if mb == 0:
        return
    buf = _flush_buffers.get(device)
    if buf is None or buf.numel() != mb << 18:
        buf = _flush_buffers[device] = torch.ones(mb << 18, dtype=torch.float32, device=device)
    if device == "cuda":
        buf.zero_()
        # idle before the timed call: a queued flush would hide the call's launch overhead behind it
        torch.cuda.synchronize()
    else:
        buf.sum()


def time_call(fn: Callable, device: str) -> float:
    """Seconds for one call, after flush_caches (CUDA: events around the call, so CPU launch overhead
    that delays the GPU is included, as it is for a user)."""
    flush_caches(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_seconds(fn: Callable, device: str = "cpu", reps: int = 5) -> float:
    """Median wall seconds of `reps` calls after one warm-up call, each after flush_caches, the device
    synchronised around each (the microbenchmarks' simple policy; the report uses TimingPolicy and measure_group)."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        flush_caches(device)  # leaves the device idle
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns: dict, device: str = "cpu", reps: int = 5, warmup=True, per_round=None) -> dict:
    """{name: median seconds} of `reps` rounds in which every callable of `fns` runs once, round-robin
    (time_call), so that machine noise hits them alike. `warmup`: one warm-up call each first (True),
    none (False: callables the caller has already run), or a collection of the names to warm.
    `per_round`: {name: calls per round} for callables cheap enough to time more often than the rest
    (default one call each)."""
    warm = fns if warmup is True else (() if warmup is False else warmup)
    if warm:
        for name in warm:
            fns[name]()
        sync(device)
    per_round = per_round or {}
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            for _ in range(per_round.get(name, 1)):
                times[name].append(time_call(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


@dataclasses.dataclass
class TimingPolicy:
    """Warm-up calls, then between min_reps and max_reps timed calls, as many as fit budget_s
    (estimated from the last warm-up call). CUDA calls are short: many reps are cheap there."""
    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 5
    budget_s: float = 4.0


def cpu_policy(quick=False):
    return TimingPolicy(warmup=1, min_reps=3, max_reps=5 if quick else 11, budget_s=1.0 if quick else 4.0)


def cuda_policy(quick=False):
    return TimingPolicy(warmup=3, min_reps=10, max_reps=100 if not quick else 30, budget_s=0.5)


def policy_for(device, quick=False):
    return cuda_policy(quick) if device == "cuda" else cpu_policy(quick)


def time_fn(fn: Callable, device: str, policy: TimingPolicy, min_reps: int | None = None):
    """Median seconds over the timed reps; returns (median_s, all_times)."""
    last = None
    for _ in range(policy.warmup):
        last = time_call(fn, device)
    if last is None:
        last = time_call(fn, device)
    lo = policy.min_reps if min_reps is None else min_reps
    reps = max(lo, min(policy.max_reps, int(policy.budget_s / max(last, 1e-9))))
    times = [time_call(fn, device) for _ in range(reps)]
    return statistics.median(times), times


def peak_memory_bytes(fn: Callable, device: str) -> int:
    """Peak extra bytes allocated during one call of fn (see the module docstring)."""
    if device == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return int(peak)


# ----------------------------------------------------------------------------------------------
# one measurement
# ----------------------------------------------------------------------------------------------

def _short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    msg = msg[:160]
    if isinstance(e, Unsupported):
        return msg
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def new_row(case: Case, peer: str, op: str) -> dict:
    cfg = case.cfg
    return {"config": cfg.name, "config_id": cfg.id, "op": op, "peer": peer,
            "label": case.hierkern_label() if peer == "hierkern" else PEER_LABELS[peer],
            "flops": cfg.flops(op) if op in OPS else None, "median_ms": None, "tflops": None,
            "peak_mb": None, "reps": 0, "times_ms": [], "error": None}


def prepare(case: Case, peer: str, op: str, policy: TimingPolicy, memory: bool = True):
    """Build the step for (peer, op) and run its warm-up calls. Returns (row, fn, est_s); fn is None
    when the peer cannot run (row['error'] says why).

    CPU: the first call runs under the memory profiler (it doubles as the warm-up; its time, with
    profiler overhead, only sizes the number of reps). flex: the first call is the torch.compile
    call, timed on its own as compile_s. CUDA: memory is taken on a call after the warm-ups (so
    compile/autotune allocations are not counted)."""
    device = case.device
    row = new_row(case, peer, op)
    try:
        fn = case.step(peer, op)
        if peer == "flex":
            t0 = time.perf_counter()
            fn()
            sync(device)
            row["compile_s"] = round(time.perf_counter() - t0, 3)
        est = None
        if device == "cpu":
            t0 = time.perf_counter()
            if memory:
                row["peak_mb"] = peak_memory_bytes(fn, device) / 2**20
            else:
                fn()
            est = time.perf_counter() - t0
            for _ in range(policy.warmup - 1):
                est = time_call(fn, device)
        else:
            for _ in range(max(policy.warmup, 1)):
                est = time_call(fn, device)
            if memory:
                row["peak_mb"] = peak_memory_bytes(fn, device) / 2**20
    except Exception as e:  # noqa: BLE001 - a peer failing is a result, not a crash
        row["error"] = _short_error(e)
        if device == "cuda":
            torch.cuda.empty_cache()
        return row, None, None
    return row, fn, est


def measure_group(case: Case, peers, op: str, policy: TimingPolicy, memory: bool = True,
                  min_reps: dict | None = None) -> list:
    """Measure all `peers` for one (config, op). Timed calls are interleaved round-robin across
    the peers, in a fixed order, so background load on a shared machine hits every peer alike; each
    peer gets clamp(budget_s / its warm-up time, min_reps, max_reps) reps (min_reps may be lowered per
    peer). What runs between two calls of a peer moves its time on CPU (caches, the allocator's free
    blocks): see bench/README.md."""
    entries = []
    rows = []
    for peer in peers:
        row, fn, est = prepare(case, peer, op, policy, memory)
        rows.append(row)
        if fn is not None:
            lo = (min_reps or {}).get(peer, policy.min_reps)
            reps = max(lo, min(policy.max_reps, int(policy.budget_s / max(est, 1e-9))))
            entries.append((row, fn, reps))
    times = {id(row): [] for row, _, _ in entries}
    try:
        for r in range(max([n for _, _, n in entries], default=0)):
            for row, fn, n in entries:
                if r < n and row["error"] is None:
                    try:
                        times[id(row)].append(time_call(fn, case.device))
                    except Exception as e:  # noqa: BLE001
                        row["error"] = _short_error(e)
    finally:
        if case.device == "cuda":
            torch.cuda.empty_cache()
    for row, _, _ in entries:
        ts = times[id(row)]
        if row["error"] is None and ts:
            med = statistics.median(ts)
            row.update(median_ms=med * 1e3, min_ms=min(ts) * 1e3, tflops=row["flops"] / med / 1e12, reps=len(ts),
                       times_ms=[t * 1e3 for t in ts])
    return rows


def measure(case: Case, peer: str, op: str, policy: TimingPolicy, memory: bool = True,
            min_reps: int | None = None) -> dict:
    """One (peer, op) on its own (see measure_group)."""
    return measure_group(case, [peer], op, policy, memory,
                         None if min_reps is None else {peer: min_reps})[0]


def measure_block_mask(case: Case, reps: int = 5) -> dict:
    """create_block_mask for this config, timed on its own (median of `reps` after one warm-up)."""
    cfg, device = case.cfg, case.device
    row = new_row(case, "flex_block_mask", "mask")
    try:
        make_block_mask(cfg, device)
        sync(device)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            make_block_mask(cfg, device)
            sync(device)
            times.append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        row["error"] = _short_error(e)
        return row
    row.update(median_ms=statistics.median(times) * 1e3, reps=len(times), times_ms=[t * 1e3 for t in times])
    return row


def add_ratios(rows):
    """ratio = peer_time / hierkern_time for each (config, op); None where either is missing."""
    hk = {(r["config"], r["op"]): r["median_ms"] for r in rows if r["peer"] == "hierkern"}
    for r in rows:
        base = hk.get((r["config"], r["op"]))
        r["ratio"] = (r["median_ms"] / base) if (base and r["median_ms"]) else None
    return rows


def evaluate_targets(rows, configs, device):
    """One dict per target: description, measured value, status PASS / MISS / N/A."""
    by = {(r["config"], r["op"], r["peer"]): r for r in rows}
    results = []
    for t in targets_for(device):
        for cfg in configs:
            if not t.matches(cfg):
                continue
            hk = by.get((cfg.name, t.op, "hierkern"))
            res = {"target": t.describe(), "config": cfg.name, "threshold": t.threshold, "kind": t.kind,
                   "value": None, "status": "N/A", "note": ""}
            if hk is None or hk["median_ms"] is None:
                res["note"] = "hierkern not measured" + (f" ({hk['error']})" if hk and hk["error"] else "")
            elif t.kind == "tflops":
                res["value"] = hk["tflops"]
                res["status"] = "PASS" if hk["tflops"] >= t.threshold else "MISS"
            else:
                got = [(by[(cfg.name, t.op, p)]["median_ms"], p) for p in t.peers
                       if (cfg.name, t.op, p) in by and by[(cfg.name, t.op, p)]["median_ms"]]
                missing = [p for p in t.peers if (cfg.name, t.op, p) not in by
                           or not by[(cfg.name, t.op, p)]["median_ms"]]
                if got:
                    best_ms, best = min(got)
                    res["value"] = best_ms / hk["median_ms"]
                    res["status"] = "PASS" if res["value"] >= t.threshold else "MISS"
                    res["note"] = f"fastest peer: {best} {best_ms:.2f} ms vs hierkern {hk['median_ms']:.2f} ms"
                if missing:
                    why = []
                    for p in missing:
                        r = by.get((cfg.name, t.op, p))
                        why.append(f"{p} n/a" + (f" ({r['error']})" if r and r["error"] else ""))
                    res["note"] = "; ".join(filter(None, [res["note"], *why]))
            results.append(res)
    return results


def fmt(x, spec=".2f", none="-"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)
