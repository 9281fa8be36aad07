"""The static GPU checks (Triton AOT for sm_80/sm_90: compile, spills, mma/wgmma; nvcc -Xptxas -v for
every .cu: spills) pass. Runs without a GPU; the Triton cache makes a second run cheaper."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_static_gpu_checks_pass():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(HERE, "static_gpu_check.py")], env=env,
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "checks passed" in r.stdout
