"""GPU busy fraction of a sweep, sampled by the driver while Tune runs.

"Busy" is NVML's utilization.gpu: the share of the last sample period in which at least one kernel ran on
the card (the same number `nvidia-smi` prints). It says nothing about how full the SMs were, only whether
the GPU was left idle — which is what a sweep wastes on start-up, scheduling gaps and stragglers.

Samples go to ``gpu_util.csv`` in the sweep folder, one row per (sample, GPU), tagged with a segment
number so that a resumed sweep appends its own segment instead of bridging the pause between runs.
Only the driver's host is sampled: on a multi-host Ray cluster the other hosts' GPUs are not in it.
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from hqlt.search_space.vocabulary import GPU_UTIL_CSV

FILE = GPU_UTIL_CSV
FIELDS = ("time", "segment", "gpu", "util", "mem_mib")
Sample = tuple[int, float, float]  # (gpu index, utilization %, memory used MiB)


def _visible(indices: Sequence[int]) -> list[int]:
    """The physical GPU indices this process (and so the local Ray node) may use."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None or not all(p.strip().isdigit() for p in env.split(",") if p.strip()):
        return list(indices)
    allowed = {int(p) for p in env.split(",") if p.strip()}
    return [i for i in indices if i in allowed]


def _nvml_sampler() -> Optional[Callable[[], list[Sample]]]:
    try:
        import pynvml
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception:  # noqa: BLE001 - no library, no driver, or no GPU: try nvidia-smi next
        return None
    handles = {i: pynvml.nvmlDeviceGetHandleByIndex(i) for i in _visible(range(count))}
    if not handles:
        return None

    def sample() -> list[Sample]:
        out = []
        for i, h in handles.items():
            util = pynvml.nvmlDeviceGetUtilizationRates(h)
            out.append((i, float(util.gpu), pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20))
        return out
    return sample


def _smi_sampler() -> Optional[Callable[[], list[Sample]]]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    cmd = [exe, "--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits"]

    def sample() -> list[Sample]:
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout
        rows = [[c.strip() for c in line.split(",")] for line in text.strip().splitlines()]
        keep = set(_visible([int(r[0]) for r in rows]))
        return [(int(r[0]), float(r[1]), float(r[2])) for r in rows if int(r[0]) in keep]
    try:
        return sample if sample() else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def default_sampler() -> Optional[Callable[[], list[Sample]]]:
    """NVML if importable, else nvidia-smi, else None (no GPU: nothing to monitor)."""
    return _nvml_sampler() or _smi_sampler()


class GpuMonitor:
    """Background sampler: ``with GpuMonitor(folder): tuner.fit()``; no-op when there is no GPU."""

    def __init__(self, folder: Path, interval_s: float = 1.0,
                 sampler: Optional[Callable[[], list[Sample]]] = None):
        self.path = Path(folder) / FILE
        self.interval_s = interval_s
        self.sampler = sampler if sampler is not None else default_sampler()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.segment = _last_segment(self.path) + 1

    @property
    def enabled(self) -> bool:
        return self.sampler is not None

    def __enter__(self) -> "GpuMonitor":
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, name="hqlt-gpu-monitor", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10 * self.interval_s + 10)

    def _loop(self) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(FIELDS)
            while True:
                now = time.time()
                try:
                    rows = self.sampler()
                except Exception:  # noqa: BLE001 - a failed sample is a gap, not a failed sweep
                    rows = []
                for gpu, util, mem in rows:
                    w.writerow((f"{now:.3f}", self.segment, gpu, f"{util:.1f}", f"{mem:.0f}"))
                f.flush()
                if self._stop.wait(self.interval_s):
                    return


def _last_segment(path: Path) -> int:
    if not path.exists():
        return -1
    with path.open(newline="") as f:
        segments = [int(r["segment"]) for r in csv.DictReader(f)]
    return max(segments, default=-1)


def summarize(folder: Path, interval_s: float = 1.0) -> Optional[dict]:
    """Busy fraction (mean utilization / 100 over samples and GPUs), per GPU, and GPU-hours (sampled span
    of each segment × its GPU count, summed over segments); None when nothing was sampled."""
    path = Path(folder) / FILE
    if not path.exists():
        return None
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    per_gpu: dict[int, list[float]] = {}
    spans: dict[int, list[float]] = {}
    gpus_in: dict[int, set] = {}
    for r in rows:
        seg, gpu, t = int(r["segment"]), int(r["gpu"]), float(r["time"])
        per_gpu.setdefault(gpu, []).append(float(r["util"]))
        lo_hi = spans.setdefault(seg, [t, t])
        lo_hi[0], lo_hi[1] = min(lo_hi[0], t), max(lo_hi[1], t)
        gpus_in.setdefault(seg, set()).add(gpu)
    all_utils = [u for us in per_gpu.values() for u in us]
    gpu_hours = sum((hi - lo + interval_s) * len(gpus_in[s]) for s, (lo, hi) in spans.items()) / 3600
    return {"busy_frac": sum(all_utils) / len(all_utils) / 100,
            "per_gpu": {g: sum(us) / len(us) / 100 for g, us in sorted(per_gpu.items())},
            "n_gpus": len(per_gpu), "segments": len(spans), "samples": len(all_utils), "gpu_hours": gpu_hours}
