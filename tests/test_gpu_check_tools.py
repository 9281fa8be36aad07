"""The tools bench/gpu_check.sh runs on a lent GPU, checked on CPU: bench/tune_triton.py's selection
logic under the Triton interpreter, and bench/profile_cuda.py's split of device time by kernel name."""
import json
import os
import subprocess
import sys

import pytest

from hierkern import _backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not (_backend.has_triton() and _backend.triton_interpreted()),
                    reason="needs triton under TRITON_INTERPRET=1")
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
