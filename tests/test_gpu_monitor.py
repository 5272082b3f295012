"""The sweep's GPU busy-fraction sampler, driven by a fake sampler (no GPU needed)."""
import csv
import time

import pytest

from hqlt.orchestration import gpu_monitor
from hqlt.orchestration.gpu_monitor import GpuMonitor
from hqlt.orchestration.sweep import gpu_metrics


def _run(folder, sampler, seconds=0.3, interval=0.02):
    with GpuMonitor(folder, interval_s=interval, sampler=sampler) as mon:
        time.sleep(seconds)
    return mon


def test_samples_every_gpu_and_summarizes_busy_fraction(tmp_path):
    mon = _run(tmp_path, lambda: [(0, 100.0, 10.0), (1, 50.0, 20.0)])
    assert mon.enabled and mon.segment == 0
    rows = list(csv.DictReader((tmp_path / gpu_monitor.FILE).open()))
    assert len(rows) >= 4 and {r["gpu"] for r in rows} == {"0", "1"}
    s = gpu_monitor.summarize(tmp_path, interval_s=0.02)
    assert s["busy_frac"] == pytest.approx(0.75)
    assert s["per_gpu"] == {0: pytest.approx(1.0), 1: pytest.approx(0.5)}
    assert s["n_gpus"] == 2 and s["segments"] == 1
    # GPU-hours = sampled span (+ one interval) x GPUs; the span is a bit under the 0.3 s slept
    assert 2 * 0.2 / 3600 < s["gpu_hours"] < 2 * 0.5 / 3600


def test_resumed_sweep_appends_a_segment_without_bridging_the_pause(tmp_path):
    _run(tmp_path, lambda: [(0, 100.0, 1.0)], seconds=0.2)
    first = gpu_monitor.summarize(tmp_path, interval_s=0.02)["gpu_hours"]
    time.sleep(0.5)  # the pause between runs must not count
    mon = _run(tmp_path, lambda: [(0, 0.0, 1.0)], seconds=0.2)
    assert mon.segment == 1
    s = gpu_monitor.summarize(tmp_path, interval_s=0.02)
    assert s["segments"] == 2
    assert s["gpu_hours"] < first * 2 + 0.2 / 3600  # ~two 0.2 s spans, not 0.9 s
    assert 0.2 < s["busy_frac"] < 0.8


def test_failed_sample_is_a_gap_not_a_crash(tmp_path):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) % 2:
            raise RuntimeError("NVML hiccup")
        return [(0, 80.0, 1.0)]
    _run(tmp_path, flaky)
    assert len(calls) > 2
    assert gpu_monitor.summarize(tmp_path)["busy_frac"] == pytest.approx(0.8)


def test_no_gpu_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_monitor, "default_sampler", lambda: None)
    mon = _run(tmp_path, None, seconds=0.05)
    assert not mon.enabled
    assert not (tmp_path / gpu_monitor.FILE).exists()
    assert gpu_monitor.summarize(tmp_path) is None


def test_visible_devices_restrict_sampled_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    assert gpu_monitor._visible([0, 1, 2, 3]) == [1, 3]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-uuid-a")
    assert gpu_monitor._visible([0, 1]) == [0, 1]


def test_sweep_gpu_metrics():
    summary = {"counts": {"completed": 6, "failed": 1},
               "gpu": {"busy_frac": 0.9, "gpu_hours": 0.5, "n_gpus": 2, "per_gpu": {0: 0.8, 1: 1.0}}}
    m = gpu_metrics(summary)
    assert m["sweep/trials_per_gpu_hour"] == pytest.approx(12.0)
    assert m["sweep/gpu_busy_frac_gpu1"] == 1.0 and m["sweep/n_gpus"] == 2
    assert gpu_metrics({"counts": {}, "gpu": None}) == {}
