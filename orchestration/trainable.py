"""The Ray Tune trainable: one sampled architecture, trained for each of its seeds in turn.

Running the seeds inside one trial process pays process start-up and kernel compilation once per
architecture rather than once per seed. Every report carries every objective key (Ray's strict metric
check); the last report has `trial/done` = 1, which is how the searcher tells a finished trial from one
a scheduler stopped early (PRUNED).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from hqlt.search_space import INFEASIBLE_KEY

DONE_KEY = "trial/done"
# Pure-KV full attention and pure DeltaNet arms are drawn as baselines in the Pareto plots.
BASELINES = {"T": "transformer", "dn": "deltanet"}


def aggregate(values: list[float], how: str, mode: str) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan")
    if how == "mean":
        return sum(finite) / len(finite)
    return max(finite) if mode == "max" else min(finite)


def _filled(metrics: dict, objectives: list) -> dict:
    out = dict(metrics)
    for metric, _mode in objectives:
        out.setdefault(metric, float("nan"))
    return out


def write_json_atomic(path: Path, data) -> None:
    """A kill leaves either no file or a whole one (write aside, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, default=str))
    tmp.replace(path)


class SeedRecords:
    """The completed seeds of one trial, on disk (``<folder>/<trial_id>.seed<i>.json``).

    A trial that restarts — a resumed sweep, on this host or another — takes a recorded seed instead of
    training it again, if the record was made for exactly the same trial config. Only completed seeds are
    recorded: a seed that failed (a bug fixed since, an OOM on a smaller card) is trained again."""

    def __init__(self, folder: Path, trial_id: str):
        self.folder, self.trial_id = Path(folder), trial_id

    def _path(self, i: int) -> Path:
        return self.folder / f"{self.trial_id}.seed{i}.json"

    def load(self, i: int, config: dict):
        from .trial import TrialResult

        try:
            data = json.loads(self._path(i).read_text())
        except (OSError, ValueError):
            return None
        if data.get("input") != json.loads(json.dumps(config, default=str)):
            return None
        return TrialResult(**data["result"])

    def save(self, i: int, config: dict, result) -> None:
        if result.status != "completed":
            return
        write_json_atomic(self._path(i), {"input": config, "result": result.as_dict()})


def run_sampled(config: dict, *, spec, objectives: list, seeds: int, seed_aggregate: str, report,
                records: Optional[SeedRecords] = None) -> dict:
    """Train the sampled config for each seed; `report(metrics)` is tune.report or a test double.

    Reports are held back by one, so that the last evaluation and the trial's final (seed-aggregated)
    result are one report: a scheduler's `max_t` then counts evaluations (seeds × evaluations per seed).
    With `records`, seeds completed by an earlier run of this trial are taken from disk, not retrained."""
    from hqlt.search_space import materialize

    from .trial import run_trial

    if config.get(INFEASIBLE_KEY):
        final = _filled({"trial/status": "infeasible", "trial/reason": config[INFEASIBLE_KEY], DONE_KEY: 1.0},
                        objectives)
        report(final)
        return final
    sampled = {k: v for k, v in config.items() if not k.startswith("hqlt.")}  # hqlt.* are sweep bookkeeping
    plain = materialize(spec, sampled)
    base_seed = int(plain.get("seed", 0))
    held: list[dict] = []
    results, step_offset = [], 0
    for i in range(seeds):
        def seed_report(metrics, i=i, offset=step_offset):
            if held:
                report(held.pop())
            held.append(_filled({**metrics, "seed_index": i, "step": offset + metrics.get("step", 0),
                                 "trial/status": "running", DONE_KEY: 0.0}, objectives))

        seed_config = {**plain, "seed": base_seed + i}
        result = records.load(i, seed_config) if records is not None else None
        if result is None:
            result = run_trial(seed_config, report=seed_report)
            if records is not None:
                records.save(i, seed_config, result)
        results.append(result)
        step_offset += int(result.metrics.get("step", 0))
    final = {**(held.pop() if held else {"step": step_offset}), **summarize_seeds(results, objectives, seed_aggregate)}
    report(final)
    return final


def summarize_seeds(results: list, objectives: list, seed_aggregate: str) -> dict:
    """The trial's final keys: objectives aggregated over its seeds, per-seed values, status, labels."""
    completed = [r for r in results if r.status == "completed"]
    pool = completed or results
    final = {k: v for k, v in pool[-1].metrics.items() if k not in ("traceback", "step")}
    for metric, mode in objectives:
        final[metric] = aggregate([r.metrics.get(metric) for r in pool], seed_aggregate, mode)
        for i, r in enumerate(results):
            final[f"seed{i}/{metric}"] = r.metrics.get(metric, float("nan"))
    arch = results[0].arch
    final.update({"trial/status": "completed" if completed else results[0].status,
                  "trial/reason": "" if completed else results[0].reason, "trial/arch": arch,
                  "trial/config_hash": results[0].config_hash,
                  "trial/seeds": ",".join(str(r.config.get("seed")) for r in results),
                  "trial/n_failed_seeds": float(len(results) - len(completed)), DONE_KEY: 1.0})
    baseline = BASELINES.get("dn" if arch.startswith("dn") else arch)
    if baseline:
        final["baseline"] = baseline
    return _filled(final, objectives)


def tune_trainable(config: dict, spec=None, objectives: list = None, seeds: int = 1,
                   seed_aggregate: str = "max", results_dir: Optional[str] = None) -> None:
    """Entry point for `tune.with_parameters`; runs in a Ray worker process.

    The final result is also written to `results_dir/<trial_id>.json`: after a hard kill, Ray may restart
    a trial that had already finished (its last snapshot predates the finish); that trial then reports
    its recorded result instead of training again."""
    import time

    from ray import tune

    t_enter = time.time()
    trial_id = tune.get_context().get_trial_id()
    record = Path(results_dir) / f"{trial_id}.json" if results_dir else None
    if record is not None and record.exists():
        tune.report(json.loads(record.read_text()))
        return

    threads = os.environ.get("HQLT_TRIAL_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    def report(metrics: dict) -> None:
        metrics["time/trainable_s"] = time.time() - t_enter  # the driver subtracts it from the trial's wall time
        if record is not None and metrics.get(DONE_KEY):  # recorded before Ray (and Optuna) hear of it
            write_json_atomic(record, metrics)
        tune.report(metrics)

    run_sampled(config, spec=spec, objectives=objectives, seeds=seeds, seed_aggregate=seed_aggregate, report=report,
                records=SeedRecords(Path(results_dir), trial_id) if results_dir else None)
