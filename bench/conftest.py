"""pytest-benchmark harness for bench/ (see bench/README.md).

    pytest bench/ --benchmark-only                       # quick CPU/GPU cases (default)
    pytest bench/ --benchmark-only --hk-full             # the issue's full configs (slow on CPU)
    pytest bench/ --benchmark-only --hk-device cuda

Environment equivalents: HIERKERN_BENCH_FULL=1, HIERKERN_BENCH_DEVICE=cpu|cuda.
"""
import os
import sys

import pytest

# `bench` is imported as a package from the repository root, whichever directory pytest runs in.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench import common  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("hierkern-bench")
    group.addoption("--hk-full", action="store_true", default=os.environ.get("HIERKERN_BENCH_FULL") == "1",
                    help="benchmark the full configs of bench/common.py (default: the quick ones)")
    group.addoption("--hk-device", default=os.environ.get("HIERKERN_BENCH_DEVICE"), choices=("cpu", "cuda"),
                    help="device to benchmark on (default: cuda if available else cpu)")


def bench_device(config):
    return config.getoption("--hk-device") or common.default_device()


def pytest_generate_tests(metafunc):
    if "cfg" in metafunc.fixturenames:
        dev = bench_device(metafunc.config)
        cfgs = common.configs_for(dev, quick=not metafunc.config.getoption("--hk-full"))
        metafunc.parametrize("cfg", cfgs, ids=[c.id for c in cfgs])


@pytest.fixture(scope="session")
def device(request):
    dev = bench_device(request.config)
    if dev == "cuda":
        import torch
        if not torch.cuda.is_available():
            pytest.skip("--hk-device cuda but no CUDA device")
    return dev


@pytest.fixture(scope="session")
def case_cache():
    """One Case (inputs, masks, compiled flex) per config for the whole session; the most recent
    one only, so large inputs do not pile up (tests are ordered config-major)."""
    cache = {}

    def get(cfg, device):
        key = (cfg, device)
        if key not in cache:
            cache.clear()
            cache[key] = common.Case(cfg, device)
        return cache[key]
    return get
