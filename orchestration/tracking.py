"""MLflow writing, from one process only (the CLI or the sweep driver — never from trial workers).

Layout (read by `hqlt.reports`): one experiment per sweep name; a parent run per sweep tagged `hqlt.role=sweep`,
`hqlt.sweep_id` (what identifies the sweep) and `hqlt.objectives`; one child run per trial tagged `hqlt.role=trial`,
`mlflow.parentRunId`, `status`, `reason`, `arch`, `trial_id`, `config_hash`, `seed`, `node`; params = flattened
config; metrics per step.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import sqlite3
from typing import Iterable, Optional

from hqlt.blocks.validation import ConfigError
from hqlt.search_space.labels import flatten
from hqlt.search_space.vocabulary import to_mlflow_metric
from hqlt.search_space.vocabulary import (ARCH_TAG, COMPLETED, CONFIG_HASH_TAG, PARENT_TAG, REASON_TAG, RESULT_TAGS,
                                          ROLE_SWEEP, ROLE_TAG, ROLE_TRAIN, ROLE_TRIAL, SEED_TAG, STATUS_TAG,
                                          SWEEP_ID_TAG)

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

SERVER_URIS = ("http://", "https://", "postgresql", "mysql", "databricks")  # tracking stores a cluster can share


def numeric_metrics(metrics: dict) -> dict:
    """MLflow metrics must be finite floats; names may only hold [A-Za-z0-9_./ -@]."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[to_mlflow_metric(key)] = float(value)
    return out


def sqlite_file(tracking_uri: str) -> str | None:
    """The file part of a ``sqlite:///`` tracking URI (without its query string); None for any other store."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return tracking_uri[len("sqlite:///"):].split("?", 1)[0]


class StoreVersionError(ConfigError):
    """A tracking database written by an MLflow version whose schema this MLflow does not know (no key path)."""

    def __init__(self, message: str):
        super().__init__("", message)


def other_version_message(found: str = "", expected: str = "") -> str:
    """The one line for a database whose schema revision ``found`` this MLflow (expecting ``expected``) cannot read:
    usually a sweep folder written by another MLflow version (e.g. on a GPU host)."""
    import mlflow
    schema = f" (schema {found}, this MLflow expects {expected})" if found else ""
    return (f"MLflow {mlflow.__version__} cannot read this database{schema}: it was written by another MLflow version. "
            "Open it with that version (pip install mlflow==<version>), or, if it is the older one, "
            "`mlflow db upgrade` a copy")


@functools.lru_cache(maxsize=1)
def _schema_revisions() -> tuple[frozenset, str]:
    """(every schema revision this MLflow's migrations know, the newest)."""
    from alembic.script import ScriptDirectory
    from mlflow.store import db_migrations
    script = ScriptDirectory(os.path.dirname(db_migrations.__file__))
    return frozenset(rev.revision for rev in script.walk_revisions()), script.get_current_head()


def check_store_schema(tracking_uri: str) -> None:
    """StoreVersionError for an existing SQLite store whose schema revision this MLflow's migrations do not know,
    before MLflow opens it: MLflow 3.18 then tries to migrate the file in place and stops half-way with alembic's
    traceback (earlier versions raised their own "out-of-date database schema" error, which the CLI words the
    same). Other stores, a missing file or one without MLflow's tables are left to MLflow."""
    path = sqlite_file(tracking_uri)
    if not path or path == ":memory:" or not os.path.isfile(path):
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            row = db.execute("select version_num from alembic_version").fetchone()
    except sqlite3.Error:
        return
    if row is None:
        return
    known, head = _schema_revisions()
    if row[0] not in known:
        raise StoreVersionError(other_version_message(row[0], head))


def client(tracking_uri: str):
    import mlflow

    check_store_schema(tracking_uri)
    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def role_filter(role: str) -> str:
    """The search_runs filter for the runs of one role (the sweep's parent run, its trials)."""
    return f"tags.`{ROLE_TAG}` = '{role}'"


def trials_filter(parent_run_id: str) -> str:
    """The search_runs filter for the trial runs of one sweep: those under its parent run (two sweeps of one
    name on one server share an experiment, never a parent run)."""
    return f"{role_filter(ROLE_TRIAL)} and tags.`{PARENT_TAG}` = '{parent_run_id}'"


def find_parent(cl, experiment: str, sweep_id: str):
    """The parent run of the sweep `sweep_id` (its `hqlt.sweep_id` tag) in `experiment`; None if there is none."""
    exp = cl.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = cl.search_runs([exp.experiment_id], max_results=1,
                          filter_string=f"{role_filter(ROLE_SWEEP)} and tags.`{SWEEP_ID_TAG}` = '{sweep_id}'")
    return runs[0] if runs else None


def metric_logged(cl, run_id: str, key: str, step: int, value: Optional[float] = None) -> bool:
    """Whether `run_id` holds `key` at `step` (with `value`, if given): what a re-run must not log twice."""
    return any(m.step == step and (value is None or m.value == value)
               for m in cl.get_metric_history(run_id, key))


def is_server(tracking_uri: str) -> bool:
    """A tracking store other processes and hosts can share (not a file or SQLite store)."""
    return tracking_uri.startswith(SERVER_URIS)


def check_server(tracking_uri: str, timeout: float = 5.0) -> None:
    """One line (ConfigError) unless the tracking server of `tracking_uri` answers within `timeout` s — instead
    of MLflow's client retrying for minutes and failing with chained tracebacks."""
    import socket
    import urllib.error
    import urllib.request
    from urllib.parse import urlparse

    from hqlt.blocks.validation import ConfigError

    url = urlparse(tracking_uri)
    try:
        if url.scheme in ("http", "https"):
            try:
                urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout).close()
            except urllib.error.HTTPError:
                pass  # it answered (an auth proxy, an old server without /health)
        elif url.hostname:  # postgresql://, mysql://: can a connection be opened at all
            port = url.port or {"postgresql": 5432, "mysql": 3306}.get(url.scheme.split("+")[0])
            if port:
                socket.create_connection((url.hostname, port), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ConfigError("--tracking-uri", f"the MLflow server {tracking_uri} does not answer ({reason}); start "
                                            "it (the sweep resumes where it stopped), or name a running one") from None


def ensure_store(tracking_uri: str) -> None:
    """Create a SQLite store that does not exist yet whole or not at all: MLflow builds its tables in several
    migrations (seconds), and a store cut off half-way cannot be opened again. It is made aside and renamed."""
    if not tracking_uri.startswith("sqlite:///"):
        return
    from pathlib import Path

    db = Path(tracking_uri[len("sqlite:///"):])
    if db.exists():
        return
    for stale in db.parent.glob(f".{db.name}.*.tmp"):  # left by a kill during an earlier attempt
        stale.unlink()
    tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    cl = client(f"sqlite:///{tmp}")
    cl.search_experiments()  # runs the migrations
    store = getattr(getattr(cl, "_tracking_client", None), "store", None)
    if getattr(store, "engine", None) is not None:
        store.engine.dispose()  # no pooled connection left on the file once it is renamed
    tmp.replace(db)


def ensure_experiment(cl, name: str, artifact_location: Optional[str] = None) -> str:
    """Experiment id of `name`, created if needed (artifacts beside the sweep, not in the cwd's ./mlruns), tagged
    so that MLflow 3's UI opens it on its runs table (`mlflow.experimentKind`), not on the GenAI overview."""
    from hqlt.search_space.vocabulary import EXPERIMENT_KIND_RUNS, EXPERIMENT_KIND_TAG

    exp = cl.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return cl.create_experiment(name, artifact_location=artifact_location,
                                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND_RUNS})


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
    run = cl.create_run(exp_id, run_name=run_name, tags={ROLE_TAG: ROLE_TRAIN})
    rid = run.info.run_id
    log_params(cl, rid, result.config)
    log_history(cl, rid, history)
    logged = set(history[-1]) if history else set()
    log_metrics(cl, rid, {k: v for k, v in result.metrics.items() if k not in logged},
                int(result.metrics.get("step", 0)))  # what no report carried (e.g. a failed trial's sizes)
    set_tags(cl, rid, {STATUS_TAG: result.status, REASON_TAG: result.reason, ARCH_TAG: result.arch,
                       CONFIG_HASH_TAG: result.config_hash, SEED_TAG: result.config.get("seed", ""),
                       **{tag: result.metrics[key] for key, tag in RESULT_TAGS.items() if key in result.metrics}})
    cl.set_terminated(rid, "FINISHED" if result.status == COMPLETED else "FAILED")
    return rid
