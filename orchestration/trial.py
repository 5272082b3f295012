"""One trial: build the model from a config, probe its throughput, train it, evaluate it, report.

`run_trial` is what `hqlt train` calls directly and what the Ray sweep calls in a worker. It never
raises for problems that belong to the config (NaN loss, GPU OOM, a failing step): it returns a
`TrialResult` with status and reason, and every report carries every objective key.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from hqlt.blocks import HybridLM, estimate
from hqlt.search_space.vocabulary import (COMPLETED, FAILED, OOM, PHASE_PROBE, PHASE_TEST, PHASE_TRAIN,
                                          RUNNING, TIME_GATE_WAIT, TIME_PROBE, TIME_SETUP)

from . import trainer
from .cost import run_probe, trainer_gate
from .seed_snapshot import SeedSnapshot
from .selection import Checkpoints
from .space_hooks import model_metrics
from .tasks import make_task
from .trial_config import TrialConfig, config_hash, plain, trial_config


@dataclass
class TrialResult:
    status: str
    reason: str = ""
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    arch: str = ""
    config_hash: str = ""

    def as_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "metrics": self.metrics, "arch": self.arch,
                "config_hash": self.config_hash, "config": self.config}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def faulty_step(cfg: TrialConfig) -> Callable:
    """The train step with the configured fault at step `fault_step` (testing aid)."""
    original = trainer.train_step

    def faulty(model, optimizer, batch, tcfg, step, device):
        if step + 1 == cfg.fault_step:
            if cfg.fault == "raise":
                raise RuntimeError(f"injected failure at step {step + 1}")
            if cfg.fault == "oom":
                raise torch.OutOfMemoryError(f"CUDA out of memory (injected at step {step + 1})")
            loss, norm = original(model, optimizer, batch, tcfg, step, device)
            return float("nan"), norm
        return original(model, optimizer, batch, tcfg, step, device)

    return faulty


def _phase(phase: Optional[Callable[[str], None]], name: str) -> None:
    """Tell a progress display which phase starts (the probe and the test evaluation report no steps)."""
    if phase is not None:
        phase(name)


def run_trial(config: dict | TrialConfig, report: Optional[Callable[[dict], None]] = None,
              progress: Optional[Callable[[int, dict], None]] = None, probe_dir=None,
              phase: Optional[Callable[[str], None]] = None, snapshot: Optional[SeedSnapshot] = None) -> TrialResult:
    """`probe_dir`: the sweep folder's `probes/` (cost.py: the probe's cache and card locks); None outside a sweep.
    `phase(name)`: called as each phase starts (vocabulary PHASE_PROBE, PHASE_TRAIN, PHASE_TEST), for a progress bar.
    `snapshot`: the seed's snapshot file (seed_snapshot.py), resumed from and written during training; None: none."""
    t_start = time.perf_counter()
    cfg = config if isinstance(config, TrialConfig) else trial_config(config)
    seeds = cfg.seeds()
    task = make_task(cfg.task["name"], cfg.task_config, "task")
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = task.vocab_size
    flat_cfg = plain(cfg)
    result = TrialResult(RUNNING, config=flat_cfg, arch=cfg.model.short_id(), config_hash=config_hash(flat_cfg))
    device = pick_device(cfg.device)
    est = estimate(cfg.model, task.seq_len)
    # The identity keys ride along in every report, so even a trial stopped early is labelled.
    constant = {**model_metrics(est), "trial/arch": result.arch, "trial/config_hash": result.config_hash,
                "trial/seeds": str(cfg.seed)}
    metrics: dict = dict(constant)
    model = gate = None
    try:
        torch.manual_seed(seeds["model"])
        np.random.seed(seeds["data"])
        model = HybridLM(cfg.model).to(device)
        constant[TIME_SETUP] = time.perf_counter() - t_start  # config, task, model: before any step
        if cfg.probe.enabled:
            _phase(phase, PHASE_PROBE)
            t0 = time.perf_counter()
            constant.update(run_probe(cfg, model, task.seq_len, device, probe_dir))
            constant[TIME_PROBE] = time.perf_counter() - t0
        gate = trainer_gate(cfg, device, probe_dir)
        checkpoints = Checkpoints(model, cfg.train, task, report)
        _phase(phase, PHASE_TRAIN)
        metrics = trainer.train(model, task, cfg.train, device=device, data_seed=seeds["data"],
                                order_seed=seeds["order"], report=checkpoints.report, constant_metrics=constant,
                                progress=progress, step_fn=faulty_step(cfg) if cfg.fault else None,
                                fault=(cfg.fault, cfg.fault_step) if cfg.fault else None,
                                boundary=gate.open().boundary if gate is not None else None,
                                snapshot=snapshot, snapshot_parts={"checkpoints": checkpoints})
        _phase(phase, PHASE_TEST)
        metrics = checkpoints.finish(metrics, device)
        result.status = COMPLETED
    except trainer.TrialFailure as exc:
        result.status, result.reason, metrics = exc.status, exc.reason, {**constant, **exc.metrics}
    except Exception as exc:  # noqa: BLE001 — a trial's own error is recorded, not propagated
        if is_oom(exc):
            result.status, result.reason = OOM, f"out of memory: {str(exc).splitlines()[0][:300]}"
        else:
            result.status = FAILED
            result.reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            result.metrics["traceback"] = traceback.format_exc(limit=8)
        metrics = {**constant, **metrics}
    finally:
        if gate is not None:
            metrics = {**metrics, TIME_GATE_WAIT: gate.waited_s}
            gate.close()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result.metrics = {**result.metrics, **metrics, "trial/status": result.status}
    return result
