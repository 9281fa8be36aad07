"""Triton config overrides (HIERKERN_TRITON_CONFIGS / override_configs) and the tuning script's logic,
under the interpreter: an override changes the tiles the launchers use, the results stay exact, and
bad specifications fail with a message naming the entry and field."""
import json
import os
import subprocess
import sys

import pytest
import torch

import hierkern
from hierkern import _backend
from hierkern.testing import make_qkv, poisoned_outputs

pytestmark = pytest.mark.skipif(not (_backend.has_triton() and _backend.triton_interpreted()),
                                reason="needs triton under TRITON_INTERPRET=1")

from test_next_scale import _check, assert_matches_reference  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _entry(kernel, block_m, block_n, warps=4, stages=1, head_dim=64, dtype="float32"):
    return {"kernel": kernel, "head_dim": head_dim, "dtype": dtype, "block_m": block_m, "block_n": block_n,
            "num_warps": warps, "num_stages": stages}


def test_override_changes_tiles_and_restores():
    from hierkern.ops.attention import triton as tk
    dev = torch.device("cpu")
    before = (tk.fwd_blocks(64, torch.float32, dev), tk.bwd_blocks(64, torch.float32, dev))
    active = tk.active_overrides()  # HIERKERN_TRITON_CONFIGS may set some
    spec = [_entry("fwd", 64, 32), _entry("dkdv", 16, 64), _entry("dq", 64, 16)]
    with tk.override_configs(spec):
        assert tk.fwd_blocks(64, torch.float32, dev) == (64, 32)
        assert tk.bwd_blocks(64, torch.float32, dev) == (64, 64)
        # the bucket: head_dim 48 uses the 64 entry; float16 has its own (16-bit) entry
        assert tk.fwd_blocks(48, torch.float32, dev) == (64, 32)
        assert tk.fwd_blocks(64, torch.float16, dev) == before[0]
        assert {(o["kernel"], o["block_m"]) for o in tk.active_overrides() if o["dtype"] == "float32"} >= {
            ("fwd", 64), ("dkdv", 16), ("dq", 64)}
    assert (tk.fwd_blocks(64, torch.float32, dev), tk.bwd_blocks(64, torch.float32, dev)) == before
    assert tk.active_overrides() == active


@pytest.mark.parametrize("pattern", ["causal", "diagonal"])
def test_overridden_tiles_stay_exact(pattern):
    """Tiles larger than the interpreter's defaults: scales packed differently into query tiles, key
    tiles spanning several scales, GQA; forward and backward against float64."""
    from hierkern.ops.attention import triton as tk
    spec = [_entry("fwd", 64, 32), _entry("dkdv", 16, 64), _entry("dq", 64, 16)]
    with tk.override_configs(spec):
        _check("triton", "cpu", (1, 3, 7, 20, 41), pattern, torch.float32, B=2, H=4, Hkv=2, D=40)


@pytest.mark.parametrize("override_in", ["forward", "backward"])
def test_backward_runs_the_forwards_configs(override_in):
    """The backward's tiles are cut in the forward for the configs then in force: a forward inside an
    override block with its backward after it (or the reverse) must still pair tiles and kernels."""
    from hierkern.ops.attention import triton as tk
    lay = hierkern.ScaleLayout.from_sizes((1, 3, 7, 20, 41))
    q, k, v = make_qkv(2, lay.L, 4, 2, 40, torch.float32, "cpu", "contiguous", requires_grad=True)
    g = torch.randn(2, lay.L, 4, 40)
    # Tiles larger than the kernel's block are what goes wrong: the forward-side override cuts larger
    # ones than the interpreter's tables (dK/dV 32 keys, dQ 32 rows), the backward-side one runs smaller.
    spec = ([_entry("dkdv", 16, 64), _entry("dq", 64, 16)] if override_in == "forward"
            else [_entry("dkdv", 16, 16), _entry("dq", 16, 16)])
    with poisoned_outputs():
        if override_in == "forward":
            with tk.override_configs(spec):
                out = hierkern.next_scale_attention(q, k, v, lay, "causal", impl="triton")
            grads = torch.autograd.grad(out, (q, k, v), g)
        else:
            out = hierkern.next_scale_attention(q, k, v, lay, "causal", impl="triton")
            with tk.override_configs(spec):
                grads = torch.autograd.grad(out, (q, k, v), g)
    assert_matches_reference("triton", (out, *grads), q, k, v, lay, "causal", g)


@pytest.mark.parametrize("bad,message", [
    ({}, "missing field"),
    ({"kernel": "bwd"}, "kernel must be one of"),
    ({"head_dim": 96}, "head_dim must be a head-dim bucket"),
    ({"dtype": "fp16"}, "dtype must be one of"),
    ({"block_m": 48}, "block_m must be a power of two"),
    ({"block_n": 8}, "block_n must be a power of two"),
    ({"num_warps": 3}, "num_warps must be"),
    ({"num_stages": 0}, "num_stages must be a positive int"),
    ({"num_stages": 2.0}, "num_stages must be a positive int"),
    ({"blockm": 64}, "unknown field"),
])
def test_bad_overrides(bad, message):
    from hierkern.ops.attention import triton as tk
    entry = {} if bad == {} else {**_entry("fwd", 64, 32), **bad}
    with pytest.raises(ValueError, match=message) as e:
        tk.parse_config_overrides([_entry("dq", 32, 32), entry])
    assert "[1]" in str(e.value)  # names the offending entry
    with pytest.raises(ValueError, match="JSON list"):
        tk.parse_config_overrides({"kernel": "fwd"})
    with pytest.raises(ValueError, match="invalid JSON"):
        tk.parse_config_overrides("[{")
    with pytest.raises(ValueError, match="path of a JSON file"):
        tk.parse_config_overrides("/nonexistent/configs.json")


def _run(code, env_extra):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": REPO, **env_extra}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_environment_variable(tmp_path):
    path = tmp_path / "configs.json"
    path.write_text(json.dumps([_entry("fwd", 64, 32, dtype="bfloat16")]))
    code = ("import torch; from hierkern.ops.attention import triton as tk; "
            "print(tk.fwd_blocks(64, torch.float16, torch.device('cpu')))")
    for value in (str(path), path.read_text()):
        r = _run(code, {"HIERKERN_TRITON_CONFIGS": value})
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "(64, 32)"
    r = _run(code, {"HIERKERN_TRITON_CONFIGS": json.dumps([_entry("fwd", 64, 32, warps=5)])})
    assert r.returncode != 0 and "HIERKERN_TRITON_CONFIGS[0]: num_warps must be" in r.stderr


_COVERAGE = """
import torch
from hierkern.ops.attention import triton as tk
compiled = set()
for e in tk.aot_configs():
    kernel, name = e["name"].split("_")[:2]
    c = e["constexprs"]
    for arch in e.get("archs", (80, 90)):
        compiled.add((arch, kernel, name, c.get("BLOCK_M"), c.get("BLOCK_N"), e["num_warps"], e["num_stages"]))
tk._interpreted = lambda device: False
missing = []
for arch in (80, 90):
    torch.cuda.get_device_capability = lambda device=None, a=arch: (a // 10, 0)
    for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for head_dim in (64, 128, 256):
            for kernel, lookup in (("fwd", tk._fwd_config), ("dkdv", tk._dkdv_config), ("dq", tk._dq_config)):
                cfg = lookup(head_dim, dtype, "cuda")
                key = (arch, kernel, name, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages)
                if key not in compiled:
                    missing.append(key)
print("MISSING", missing)
"""


def test_static_check_covers_every_gpu_config():
    """Every config the launchers can pick on an A100 (sm_80) or an H200 (sm_90), for every dtype and
    head-dim bucket, is an entry tests/static_gpu_check.py compiles for that arch, so none reaches a
    GPU unchecked for spills and tensor cores. (aot_configs() needs compiled triton.jit functions: a
    subprocess without TRITON_INTERPRET, as the static check itself.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HIERKERN_TRITON_CONFIGS")}
    env["PYTHONPATH"] = REPO
    r = subprocess.run([sys.executable, "-c", _COVERAGE], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "MISSING []" in r.stdout, r.stdout
