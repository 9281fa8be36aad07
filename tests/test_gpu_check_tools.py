"""The tools bench/gpu_check.sh runs on a lent GPU: bench/tune_triton.py (its selection logic under
the Triton interpreter; on a GPU its CUDA-graph timing too) and bench/profile_cuda.py's split of
device time by kernel name."""
import json
import os
import subprocess
import sys

import pytest
import torch

from hierkern import _backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


INTERPRETED = pytest.mark.skipif(not (_backend.has_triton() and _backend.triton_interpreted()),
                                 reason="needs triton under TRITON_INTERPRET=1")


@INTERPRETED
def test_tune_script_quick(tmp_path):
    """bench/tune_triton.py's selection logic on one tiny case: every timed config is reported, the
    chosen file parses as HIERKERN_TRITON_CONFIGS, one entry per kernel."""
    from hierkern.ops.attention import triton as tk
    out, configs = tmp_path / "tune.json", tmp_path / "tuned.json"
    code = (f"import sys; from bench.tune_triton import main; sys.exit(main(['--device', 'cpu', '--quick', "
            f"'--reps', '1', '--out', '{out}', '--configs-out', '{configs}']))")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": REPO}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert {row["kernel"] for row in result["results"]} == {"fwd", "dkdv", "dq"}
    assert all(row["error"] is None and row["total_ms"] > 0 for row in result["results"])
    assert sum(row["default"] for row in result["results"]) == 3
    parsed = tk.parse_config_overrides(str(configs))
    assert sorted(k for k, _, _ in parsed) == ["dkdv", "dq", "fwd"]


def test_profile_categories():
    """bench/profile_cuda.py's split of a training step's device time (run on a lent GPU)."""
    from bench.profile_cuda import by_category, category
    assert category("_bwd_dkdv_kernel") == "attention"
    assert category("fmha_cutlassB_bf16_aligned_64x64") == "attention"  # SDPA's, before the GEMM match
    assert category("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert category("vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>") == "other"
    split = by_category([(10.0, 1, "_fwd_kernel"), (5.0, 2, "nvjet_hsh_128x256"), (3.0, 1, "reduce_kernel")])
    assert split == {"attention": 10.0, "gemm": 5.0, "other": 3.0}


@INTERPRETED
def test_tune_selects_the_fastest_valid_config(monkeypatch):
    """The choice is the lowest total time over the cases; a config with mismatched or non-finite
    outputs is reported with its error and never chosen, however fast."""
    from bench import tune_triton
    from hierkern.ops.attention import triton as tk
    bad_fwd, fast_dq = tk.TUNE_CANDIDATES["fwd"][(64, 16)][0], tk.TUNE_CANDIDATES["dq"][(64, 16)][0]
    fake_ms = {("fwd", bad_fwd.block_m): 0.1, ("dq", fast_dq.block_m): 1.0}

    def fake_time(fn, device, reps):
        cfg = {"fwd": tk._fwd_config, "dkdv": tk._dkdv_config, "dq": tk._dq_config}[kernel_of(fn)](
            64, torch.float16, torch.device("cpu"))
        return fake_ms.get((kernel_of(fn), cfg.block_m), 5.0) / 1e3

    def kernel_of(fn):  # Case.fwd / Case.bwd: the kernel being tuned, from the override in force
        return next(k for k, *_ in tk._OVERRIDES) if tk._OVERRIDES else "fwd"

    real_checked = tune_triton._checked_call

    def checked(fn):
        out = real_checked(fn)
        if tk._OVERRIDES.get(("fwd", 64, 16)) == bad_fwd:  # this candidate's outputs are wrong
            return tuple(t + 1.0 for t in out)
        return out

    monkeypatch.setattr(tune_triton, "time_call", fake_time)
    monkeypatch.setattr(tune_triton, "_checked_call", checked)
    results, choices = tune_triton.tune("cpu", reps=1, quick=True, log=lambda m: None)
    bad = next(r for r in results if r["kernel"] == "fwd" and not r["default"])
    assert bad["error"] and "differ" in bad["error"] and bad["total_ms"] is None
    chosen = {c["kernel"]: (c["block_m"], c["block_n"]) for c in choices}
    table_fwd = tk._fwd_config(64, torch.float16, torch.device("cpu"))
    assert chosen["fwd"] == (table_fwd.block_m, table_fwd.block_n)  # the fast one was wrong
    assert chosen["dq"] == (fast_dq.block_m, fast_dq.block_n)      # 1 ms beats the table's 5 ms


def test_checked_call_sees_unwritten_outputs():
    from bench.tune_triton import _checked_call
    with pytest.raises(ValueError, match="non-finite"):
        _checked_call(lambda: (torch.zeros(3), torch.empty(4)))  # torch.empty: NaN-filled here
    assert _checked_call(lambda: (torch.ones(2),))[0].sum() == 2


@pytest.mark.skipif(not torch.cuda.is_available() or _backend.triton_interpreted(),
                    reason="needs a CUDA GPU with compiled Triton")
def test_tune_script_quick_cuda(tmp_path):
    """On a GPU (bench/gpu_check.sh's tests step): the CUDA-graph timing and bf16 overrides of the
    tune step, on one tiny case, before the tune step itself runs."""
    from bench.tune_triton import main
    from hierkern.ops.attention import triton as tk
    out, configs = tmp_path / "tune.json", tmp_path / "tuned.json"
    assert main(["--device", "cuda", "--quick", "--reps", "2", "--out", str(out), "--configs-out", str(configs)]) == 0
    result = json.loads(out.read_text())
    assert all(row["error"] is None and row["total_ms"] > 0 for row in result["results"]), result["table"]
    assert sorted(k for k, _, _ in tk.parse_config_overrides(str(configs))) == ["dkdv", "dq", "fwd"]
