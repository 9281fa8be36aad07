"""bench/common.py's timing protocol: every timed call starts after flush_caches (so a peer's time
does not depend on what ran before it), configured by HIERKERN_BENCH_FLUSH_MB."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402


@pytest.mark.parametrize("timer", ["time_call", "median_seconds", "interleaved_medians"])
def test_every_timed_call_follows_a_flush(monkeypatch, timer):
    events = []
    monkeypatch.setattr(common, "flush_caches", lambda device: events.append("flush"))

    def fn():
        events.append("call")

    if timer == "time_call":
        common.time_call(fn, "cpu")
        assert events == ["flush", "call"]
        return
    if timer == "median_seconds":
        common.median_seconds(fn, "cpu", reps=3)
    else:
        common.interleaved_medians({"a": fn}, "cpu", reps=3, warmup=False)
    # median_seconds' warm-up call is untimed and need not follow a flush; every timed one does
    timed = events[1:] if timer == "median_seconds" else events
    assert timed == ["flush", "call"] * 3


def test_flush_size_from_environment(monkeypatch):
    monkeypatch.setattr(common, "_flush_buffers", {})
    monkeypatch.setenv("HIERKERN_BENCH_FLUSH_MB", "2")
    common.flush_caches("cpu")
    assert common._flush_buffers["cpu"].numel() * 4 == 2 << 20
    monkeypatch.setenv("HIERKERN_BENCH_FLUSH_MB", "1")  # a new size replaces the buffer
    common.flush_caches("cpu")
    assert common._flush_buffers["cpu"].numel() * 4 == 1 << 20
    monkeypatch.setattr(common, "_flush_buffers", {})
    monkeypatch.setenv("HIERKERN_BENCH_FLUSH_MB", "0")  # off: no buffer at all
    common.flush_caches("cpu")
    assert common._flush_buffers == {}


@pytest.mark.parametrize("bad", ["-1", "lots", "1.5"])
def test_bad_flush_size_is_named(monkeypatch, bad):
    monkeypatch.setenv("HIERKERN_BENCH_FLUSH_MB", bad)
    with pytest.raises(ValueError, match=f"HIERKERN_BENCH_FLUSH_MB .*got '{bad}'"):
        common.time_call(lambda: None, "cpu")
