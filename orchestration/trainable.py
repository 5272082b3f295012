"""The Ray Tune trainable: one sampled architecture, trained for each of its seeds in turn.

Running the seeds inside one trial process pays process start-up and kernel compilation once per
architecture rather than once per seed. Every report carries every objective key (Ray's strict metric
check); the last report has `trial/done` = 1, which is how the searcher tells a finished trial from one
a scheduler stopped early (PRUNED).
"""
from __future__ import annotations

import math
import os
from typing import Optional

INFEASIBLE_KEY = "hqlt.infeasible"
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


def run_sampled(config: dict, *, spec, objectives: list, seeds: int, seed_aggregate: str,
                report) -> dict:
    """Train the sampled config for each seed; `report(metrics)` is tune.report or a test double."""
    from hqlt.search_space import materialize

    from .trial import run_trial

    sampled = {k: v for k, v in config.items() if not k.startswith("hqlt.")}  # hqlt.* are sweep bookkeeping
    if config.get(INFEASIBLE_KEY):
        final = _filled({"trial/status": "infeasible", "trial/reason": config[INFEASIBLE_KEY], DONE_KEY: 1.0},
                        objectives)
        report(final)
        return final
    plain = materialize(spec, sampled)
    base_seed = int(plain.get("seed", 0))
    results, step_offset = [], 0
    for i in range(seeds):
        trial_plain = {**plain, "seed": base_seed + i}

        def seed_report(metrics, i=i, offset=step_offset):
            report(_filled({**metrics, "seed_index": i, "step": offset + metrics.get("step", 0),
                            "trial/status": "running", DONE_KEY: 0.0}, objectives))

        result = run_trial(trial_plain, report=seed_report)
        results.append(result)
        step_offset += int(result.metrics.get("step", 0))
    completed = [r for r in results if r.status == "completed"]
    status = "completed" if completed else results[0].status
    reason = "" if completed else results[0].reason
    pool = completed or results
    final = dict(pool[-1].metrics)
    for metric, mode in objectives:
        final[metric] = aggregate([r.metrics.get(metric) for r in pool], seed_aggregate, mode)
        for i, r in enumerate(results):
            final[f"seed{i}/{metric}"] = r.metrics.get(metric, float("nan"))
    final.update({"trial/status": status, "trial/reason": reason, "trial/arch": results[0].arch,
                  "trial/config_hash": results[0].config_hash, "trial/seeds": ",".join(str(base_seed + i) for i in range(seeds)),
                  "trial/n_failed_seeds": float(len(results) - len(completed)), DONE_KEY: 1.0,
                  "step": step_offset})
    final.pop("traceback", None)
    baseline = BASELINES.get(results[0].arch.rstrip("0123456789") if results[0].arch.startswith("dn") else results[0].arch)
    if baseline:
        final["baseline"] = baseline
    report(_filled(final, objectives))
    return final


def tune_trainable(config: dict, spec=None, objectives: list = None, seeds: int = 1,
                   seed_aggregate: str = "max") -> None:
    """Entry point for `tune.with_parameters`; runs in a Ray worker process."""
    from ray import tune

    threads = os.environ.get("HQLT_TRIAL_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    run_sampled(config, spec=spec, objectives=objectives, seeds=seeds, seed_aggregate=seed_aggregate,
                report=tune.report)
