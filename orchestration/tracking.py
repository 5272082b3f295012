"""MLflow writing, from one process only (the CLI or the sweep driver — never from trial workers).

Layout (read by `hqlt.reports`): one experiment per sweep; a parent run tagged `hqlt.role=sweep` with
`hqlt.objectives`; one child run per trial tagged `hqlt.role=trial`, `mlflow.parentRunId`, `status`,
`reason`, `arch`, `trial_id`, `config_hash`, `seed`; params = flattened config; metrics per step.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Optional

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def numeric_metrics(metrics: dict) -> dict:
    """MLflow metrics must be finite floats; names may only hold [A-Za-z0-9_./ -@]."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[key.replace("@", "_at_").replace("%", "pct")] = float(value)
    return out


def client(tracking_uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(cl, name: str, artifact_location: Optional[str] = None) -> str:
    """Experiment id of `name`, created if needed (artifacts beside the sweep, not in the cwd's ./mlruns)."""
    exp = cl.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else cl.create_experiment(name, artifact_location=artifact_location)


def log_params(cl, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
    for i in range(0, len(items), 100):
        cl.log_batch(run_id, params=items[i:i + 100])


def log_metrics(cl, run_id: str, metrics: dict, step: int, timestamp_ms: Optional[int] = None) -> None:
    import time

    from mlflow.entities import Metric

    ts = timestamp_ms or int(time.time() * 1000)
    items = [Metric(k, v, ts, step) for k, v in numeric_metrics(metrics).items()]
    for i in range(0, len(items), 500):
        cl.log_batch(run_id, metrics=items[i:i + 500])


def log_history(cl, run_id: str, history: Iterable[dict]) -> None:
    for metrics in history:
        log_metrics(cl, run_id, metrics, int(metrics.get("step", 0)))


def set_tags(cl, run_id: str, tags: dict) -> None:
    from mlflow.entities import RunTag

    cl.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def log_single_trial(tracking_uri: str, experiment: str, result, history: list[dict], run_name: str) -> str:
    """`hqlt train --tracking-uri`: one run holding the trial's params, metric history and tags."""
    cl = client(tracking_uri)
    exp_id = ensure_experiment(cl, experiment)
    run = cl.create_run(exp_id, run_name=run_name, tags={"hqlt.role": "train"})
    rid = run.info.run_id
    log_params(cl, rid, result.config)
    log_history(cl, rid, history)
    logged = set(history[-1]) if history else set()
    log_metrics(cl, rid, {k: v for k, v in result.metrics.items() if k not in logged},
                int(result.metrics.get("step", 0)))  # what no report carried (e.g. a failed trial's sizes)
    set_tags(cl, rid, {"status": result.status, "reason": result.reason, "arch": result.arch,
                       "config_hash": result.config_hash, "seed": result.config.get("seed", "")})
    cl.set_terminated(rid, "FINISHED" if result.status == "completed" else "FAILED")
    return rid
