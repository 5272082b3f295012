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
import statistics
from pathlib import Path
from typing import Optional

from hqlt.search_space import INFEASIBLE_KEY
from hqlt.search_space.vocabulary import (BOOKKEEPING_PREFIX, COMPLETED, INFEASIBLE, PREDICTED_FLOPS, PROBES_DIR,
                                          REPLAYED_KEY, RUNNING, SEED_OF_PREFIX, SEED_STATS, SELECTED_SEED, TIME_TRAINABLE,
                                          TRIAL_NODE, seed_metric, seed_stat_metric)

from .seed_snapshot import SeedSnapshot
from .trial_config import config_hash, seed_config

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
        """Record a completed seed (and drop its snapshot: the record supersedes it)."""
        if result.status != COMPLETED:
            return
        write_json_atomic(self._path(i), {"input": config, "result": result.as_dict()})
        self.snapshot(i, config, 0).remove()

    def snapshot(self, i: int, config: dict, minutes: float) -> SeedSnapshot:
        """Seed i's snapshot file (``<folder>/<trial_id>.seed<i>.snapshot.pt``), for exactly this seed config."""
        return SeedSnapshot(self.folder / f"{self.trial_id}.seed{i}.snapshot.pt", minutes, config_hash(config))


def finished_configs(results: Path) -> set[str]:
    """Labels (`search_space.label`) of the seed-0 configs of the trials that finished (their final result
    `<trial_id>.json` is written) and recorded a seed 0: what a resumed sweep need not prepare again."""
    from hqlt.search_space.spec import label

    out = set()
    for final in Path(results).glob("*.json"):
        if ".seed" in final.name:
            continue
        try:
            out.add(label(json.loads((final.parent / f"{final.stem}.seed0.json").read_text())["input"]))
        except (OSError, ValueError, KeyError):
            continue
    return out


def run_sampled(config: dict, *, spec, objectives: list, seeds: int, seed_aggregate: str, report,
                records: Optional[SeedRecords] = None, probe_dir: Optional[Path] = None) -> dict:
    """Train the sampled config for each seed; `report(metrics)` is tune.report or a test double.

    Reports are held back by one, so that the last evaluation and the trial's final (seed-aggregated)
    result are one report: a scheduler's `max_t` then counts evaluations (seeds × evaluations per seed);
    that report's metrics are the seed-aggregated ones only (`summarize_seeds`), never the last seed's.
    With `records`, seeds completed by an earlier run of this trial are taken from disk, not retrained.
    `probe_dir`: the sweep folder's probe cache (orchestration/cost.py), shared by seeds and trials. With `records`
    and `spec.sweep.snapshot_minutes` set, a seed stopped part-way goes on from its snapshot (seed_snapshot.py)."""
    from hqlt.search_space import materialize

    from .trial import run_trial

    if config.get(INFEASIBLE_KEY):
        final = _filled({"trial/status": INFEASIBLE, "trial/reason": config[INFEASIBLE_KEY], DONE_KEY: 1.0},
                        objectives)
        report(final)
        return final
    sampled = {k: v for k, v in config.items() if not k.startswith(BOOKKEEPING_PREFIX)}  # sweep bookkeeping
    plain = materialize(spec, sampled)
    cost = _predicted_flops(plain, seeds)  # {trial/predicted_flops: ...} on every report ({} if it cannot say)
    held: list[dict] = []
    results, step_offset = [], 0
    for i in range(seeds):
        def seed_report(metrics, i=i, offset=step_offset):
            if held:
                report(held.pop())
            held.append(_filled({**metrics, **cost, "seed_index": i, "step": offset + metrics.get("step", 0),
                                 "trial/status": RUNNING, DONE_KEY: 0.0}, objectives))

        config_i = seed_config(plain, i)
        result = records.load(i, config_i) if records is not None else None
        if result is None:
            minutes = spec.sweep.snapshot_minutes
            snapshot = records.snapshot(i, config_i, minutes) if records is not None and minutes is not None else None
            result = run_trial(config_i, report=seed_report, probe_dir=probe_dir, snapshot=snapshot)
            if records is not None:
                records.save(i, config_i, result)
        results.append(result)
        step_offset += int(result.metrics.get("step", 0))
    last_step = held.pop().get("step", step_offset) if held else step_offset
    final = {"step": last_step, **summarize_seeds(results, objectives, seed_aggregate), **cost}
    report(final)
    return final


def _predicted_flops(plain: dict, seeds: int) -> dict:
    """{PREDICTED_FLOPS: the trial's analytic training cost} (orchestration/startup.py, what a grid is ordered by);
    {} for a config it cannot estimate (the trial itself then says why)."""
    from .startup import predicted_flops

    try:
        return {PREDICTED_FLOPS: predicted_flops(plain, seeds)}
    except Exception:  # noqa: BLE001
        return {}


# Metrics of the architecture, not of a seed's training (the probe is cached per architecture): they never pick
# the seed whose record the trial reports.
ARCH_METRIC_PREFIXES = ("perf/", "model/", "probe/")
_NOT_AGGREGATED = ("traceback", "step", "seed_index")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _best(values: list, mode: str, prefer: Optional[int] = None) -> Optional[int]:
    """Index of the best finite value (the first on ties, or `prefer` when it ties for best); None if none."""
    idx = [i for i, v in enumerate(values) if _finite(v)]
    if not idx:
        return None
    pick = max if mode == "max" else min
    best = pick(values[i] for i in idx)
    if prefer is not None and _finite(values[prefer]) and values[prefer] == best:
        return prefer
    return next(i for i in idx if values[i] == best)


def _mean_record(records: list[dict]) -> dict:
    """Each numeric metric: its mean over the records that hold a finite value (NaN if none); any other value:
    the first record's."""
    out: dict = {}
    for rec in records:
        for key, value in rec.items():
            if key in _NOT_AGGREGATED or key in out:
                continue
            values = [r.get(key) for r in records]
            if any(_finite(v) for v in values) or all(isinstance(v, float) or v is None for v in values):
                finite = [v for v in values if _finite(v)]
                out[key] = sum(finite) / len(finite) if finite else float("nan")
            else:
                out[key] = value
    return out


def summarize_seeds(results: list, objectives: list, seed_aggregate: str) -> dict:
    """The trial's final keys from its seeds' records (only completed seeds count, unless none completed).

    seed_aggregate `max` (best seed): the whole record — every slice, loss, per-length accuracy, test and
    validation metric — is that of the seed with the best value of the first objective that is not an
    architecture metric (`perf/`, `model/`, `probe/`: the same for every seed); `trial/selected_seed` is its
    index. Each objective is its best value over the seeds, `seed_of/<objective>` the seed it came from (the
    selected seed whenever it ties for best), so an objective from another seed is visible as such.
    `mean`: every numeric metric is its mean over the seeds. Both: `seed<i>/<objective>` per seed, and
    `seeds_median|min|max/<objective>` over the seeds."""
    completed = [i for i, r in enumerate(results) if r.status == COMPLETED]
    pool = completed or list(range(len(results)))
    records = [results[i].metrics for i in pool]
    if seed_aggregate == "mean":
        final = _mean_record(records)
        for metric, mode in objectives:
            final[metric] = aggregate([rec.get(metric) for rec in records], "mean", mode)
    else:
        decider = next(((m, mode) for m, mode in objectives if not m.startswith(ARCH_METRIC_PREFIXES)), objectives[0])
        chosen = _best([rec.get(decider[0]) for rec in records], decider[1])
        chosen = len(pool) - 1 if chosen is None else chosen
        final = {k: v for k, v in records[chosen].items() if k not in _NOT_AGGREGATED}
        final[SELECTED_SEED] = float(pool[chosen])
        for metric, mode in objectives:
            b = _best([rec.get(metric) for rec in records], mode, prefer=chosen)
            final[metric] = records[b][metric] if b is not None else float("nan")
            final[SEED_OF_PREFIX + metric] = float(pool[b]) if b is not None else float("nan")
    for metric, _mode in objectives:
        for i, r in enumerate(results):
            final[seed_metric(i, metric)] = r.metrics.get(metric, float("nan"))
        values = sorted(v for v in (rec.get(metric) for rec in records) if _finite(v))
        stats = {"median": statistics.median(values), "min": values[0], "max": values[-1]} if values else {}
        for stat in SEED_STATS:
            final[seed_stat_metric(stat, metric)] = stats.get(stat, float("nan"))
    arch = results[0].arch
    final.update({"trial/status": COMPLETED if completed else results[0].status,
                  "trial/reason": "" if completed else results[0].reason, "trial/arch": arch,
                  "trial/config_hash": results[0].config_hash,
                  "trial/seeds": ",".join(str(r.config.get("seed")) for r in results),
                  "trial/n_failed_seeds": float(len(results) - len(completed)), DONE_KEY: 1.0})
    baseline = BASELINES.get("dn" if arch.startswith("dn") else arch)
    if baseline:
        final["baseline"] = baseline
    return _filled(final, objectives)


def _node_label() -> str:
    """`<host>:<Ray node id, 8 hex>` of this worker (two nodes of one host differ by their id)."""
    import socket

    try:
        import ray

        node = ray.get_runtime_context().get_node_id()[:8]
    except Exception:  # noqa: BLE001 — outside Ray
        node = "?"
    return f"{socket.gethostname()}:{node}"


def tune_trainable(config: dict, spec=None, objectives: list = None, seeds: int = 1,
                   seed_aggregate: str = "max", results_dir: Optional[str] = None) -> None:
    """Entry point for `tune.with_parameters`; runs in a Ray worker process.

    The final result is also written to `results_dir/<trial_id>.json`: after a hard kill, Ray may restart
    a trial that had already finished (its last snapshot predates the finish); that trial then reports
    its recorded result instead of training again."""
    import time

    from ray import tune

    from .faults import fault_point

    t_enter = time.time()
    trial_id = tune.get_context().get_trial_id()
    record = Path(results_dir) / f"{trial_id}.json" if results_dir else None
    if record is not None and record.exists():
        tune.report({**json.loads(record.read_text()), REPLAYED_KEY: 1.0})  # the driver logs no timing for it
        return
    node = _node_label()

    threads = os.environ.get("HQLT_TRIAL_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    def report(metrics: dict) -> None:
        metrics[TIME_TRAINABLE] = time.time() - t_enter  # the driver subtracts it from the trial's wall time
        metrics[TRIAL_NODE] = node
        if record is not None and metrics.get(DONE_KEY):  # recorded before Ray (and Optuna) hear of it
            write_json_atomic(record, metrics)
            fault_point("result-written", trial_id=trial_id, node=node)
        else:
            fault_point("trial-report", trial_id=trial_id, node=node)
        tune.report(metrics)

    run_sampled(config, spec=spec, objectives=objectives, seeds=seeds, seed_aggregate=seed_aggregate, report=report,
                records=SeedRecords(Path(results_dir), trial_id) if results_dir else None,
                probe_dir=Path(results_dir).parent / PROBES_DIR if results_dir else None)  # beside results/
