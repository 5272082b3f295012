"""Reading a sweep back from MLflow, and writing report results onto it.

The MLflow layout written by the sweep (the contract between ``hqlt.orchestration`` and ``hqlt.reports``)
========================================================================================================

* **One experiment per sweep name**; its name is the sweep name (two sweeps of one name on one server share it).
* **One parent run** per sweep, tagged

  - ``hqlt.role = sweep``
  - ``hqlt.sweep_id`` = the sweep id of its folder's sweep.json (a sweep is its id, never its name)
  - ``hqlt.objectives`` = JSON list of ``[metric_name, "max"|"min"]`` pairs,
    e.g. ``[["val/acc","max"],["perf/train_tok_s","max"]]``
  - ``hqlt.sweep_name`` = the sweep name
  - optional ``hqlt.reference_point`` = JSON list of numbers, one per objective, used as the hypervolume
    reference point instead of the data-derived default (see :mod:`hqlt.reports.hypervolume`).

* **One child run per trial**, tagged

  - ``mlflow.parentRunId = <parent run id>`` and ``hqlt.role = trial``
  - ``status`` in {completed, failed, oom, nan, pruned, infeasible, running}
  - ``reason`` (free text, may be empty), ``arch`` (short architecture id, e.g. ``S64-dn2-vec``, ``T``, ``dn2``),
    ``trial_id``, ``config_hash``, ``seed``
  - optional ``baseline`` in {transformer, deltanet} for the baseline arms.
  - ``probe.size`` (``340M``, ``own``, ``d<D>-L<n>-H<h>-V<v>``) and ``probe.device`` (the card, or ``cpu``): how
    the ``perf/*`` metrics were measured (the Pareto plot's throughput axis names them); ``checkpoint``
    (``final`` | ``best_val``): the weights the ``test/*`` metrics scored.

  Params are the flattened sampled config (``model.mixer.kv.window`` ...; a whole-arm choice as its leaves plus
  ``<key> = arm<i>``; older sweeps: the arm's JSON text); ``task.*`` params that vary split the trials into one
  front per task (:mod:`hqlt.reports.groups`). Metrics include ``val/acc``,
  ``val/acc_scaled``, ``perf/train_tok_s``, ``perf/peak_mem_mb``, ``model/params``, ``model/fw_state_bytes``,
  ``model/kv_cache_bytes`` and ``train/loss`` (logged per step). The report uses the *latest* value of each
  metric (what MLflow returns in ``run.data.metrics``: highest step, then latest timestamp).
  Several trials may share an ``arch`` (different seeds or learning rates); ``arch`` is a label, not a key.

What the report writes back (:func:`hqlt.reports.report.write_report`)
---------------------------------------------------------------------

* every child run: tag ``pareto_rank`` = ``"0"``, ``"1"``, ... for completed trials with finite values for
  all objectives, and ``"none"`` for every other trial (failed, oom, nan, pruned, infeasible, running,
  completed-but-missing-an-objective, superseded duplicates). Writing ``"none"`` rather than leaving the
  tag absent overwrites a stale rank from an earlier report (e.g. one with other objectives), and lets
  the MLflow UI filter with ``tags.pareto_rank = '0'``. Ranks are within the trial's group (task); tag
  ``pareto_group`` names it, metric ``pareto_rank`` repeats the rank as a number (NaN when excluded). Tag
  ``dominated_by`` = how many ranked trials of its group dominate this one (``"none"`` if excluded). Tag
  ``pareto_objectives`` = the objectives the rank refers to.
* the parent run: metrics ``report/hypervolume``, ``report/front_size``, ``report/n_completed``,
  ``report/n_trials``, ``report/n_ranked`` and ``report/n_<status>`` for each status seen (step = number of
  trials, so repeated reports during a sweep draw a curve); tags ``report.objectives`` and
  ``report.reference_point``, ``report.group_by``, the description ``mlflow.note.content`` (front tables and
  the Pareto image); on the experiment the runs view and the front's shared view (:mod:`hqlt.reports.browse`);
  artifacts ``pareto.png``, ``pareto.html``, ``hypervolume.png``, ``front.md``,
  ``front.csv``, ``trials.csv`` and ``report.json`` at the artifact root.

Trial status when the ``status`` tag is missing is derived from the MLflow run status
(FINISHED → completed, FAILED/KILLED → failed, RUNNING/SCHEDULED → running).
Runs sharing a ``trial_id`` (a resumed trial that opened a second run) are reduced to one: a completed run
wins, then the most recently started; the others are marked ``superseded``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from hqlt.orchestration.tracking import client as tracking_client, sqlite_file
from hqlt.search_space.vocabulary import (ARCH_TAG, BASELINE_TAG, COMPLETED, CONFIG_HASH_TAG, FAILED, PARENT_TAG,
                                          REASON_TAG, ROLE_SWEEP, ROLE_TAG, RUNNING, SEED_TAG, STATUS_TAG,
                                          SWEEP_ID_TAG, TRIAL_ID_TAG, from_mlflow_metric)

__all__ = [
    "ReportError",
    "NoCompletedTrials",
    "SweepRef",
    "client_for",
    "find_experiment",
    "list_experiment_names",
    "load_sweep",
    "set_trial_tags",
]


_MLFLOW_STATUS_MAP = {
    "FINISHED": COMPLETED,
    "FAILED": FAILED,
    "KILLED": FAILED,
    "RUNNING": RUNNING,
    "SCHEDULED": RUNNING,
}

# the fixed columns of the trials DataFrame (metrics/params/tags follow as "metrics.<name>", ...)
BASE_COLUMNS = [
    "run_id",
    "run_name",
    "trial_id",
    "arch",
    "status",
    "reason",
    "baseline",
    "seed",
    "config_hash",
    "start_time",
    "end_time",
    "mlflow_status",
]


class ReportError(Exception):
    """Bad input for a report (unknown experiment, no parent run, bad objectives, unknown metric...)."""


class NoCompletedTrials(ReportError):
    """The sweep exists but has no completed trial with values for every objective."""


@dataclass
class SweepRef:
    """The parent run of a sweep plus the facts the report needs from it."""

    experiment_id: str
    experiment_name: str
    run: Any  # mlflow.entities.Run

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def tags(self) -> dict[str, str]:
        return dict(self.run.data.tags)

    @property
    def artifact_uri(self) -> str:
        return self.run.info.artifact_uri


def client_for(tracking_uri: str):
    """An ``MlflowClient`` for ``tracking_uri``; refuses to create a new SQLite file by accident."""
    db = sqlite_file(tracking_uri)
    if db and db != ":memory:" and not Path(db).exists():
        raise ReportError(f"no MLflow database at {db}")
    return tracking_client(tracking_uri)


def list_experiment_names(client) -> list[str]:
    from mlflow.entities import ViewType

    names: list[str] = []
    token = None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        names.extend(e.name for e in page)
        token = page.token
        if not token:
            return names


def find_experiment(client, experiment_name: str):
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None or exp.lifecycle_stage != "active":
        known = [n for n in list_experiment_names(client) if n != "Default"]
        hint = f"; known experiments: {', '.join(sorted(known))}" if known else "; the store has no experiments"
        raise ReportError(f"unknown experiment {experiment_name!r}{hint}")
    return exp


def _all_runs(client, experiment_id: str) -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _select_parent(runs: Iterable[Any], experiment_name: str, sweep_id: str | None = None) -> Any:
    runs = list(runs)
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == ROLE_SWEEP]
    if sweep_id:  # a sweep folder names its sweep: only that parent, never another sweep of the same name
        parents = [r for r in parents if r.data.tags.get(SWEEP_ID_TAG) == sweep_id]
        if not parents:
            raise ReportError(f"experiment {experiment_name!r} has no parent run of sweep {sweep_id} "
                              f"(tag {SWEEP_ID_TAG}); has the sweep started?")
    if not parents:
        # tolerate a parent without the role tag: a run that other runs name as their parent
        parent_ids = {r.data.tags.get(PARENT_TAG) for r in runs} - {None}
        parents = [r for r in runs if r.info.run_id in parent_ids]
    if not parents:
        raise ReportError(
            f"experiment {experiment_name!r} has no sweep parent run (tag {ROLE_TAG}={ROLE_SWEEP}); is it an hqlt sweep?"
        )
    if len(parents) == 1:
        return parents[0]
    # several parents (e.g. a sweep started twice): the one with the most children, then the latest
    n_children = {p.info.run_id: 0 for p in parents}
    for r in runs:
        pid = r.data.tags.get(PARENT_TAG)
        if pid in n_children:
            n_children[pid] += 1
    return max(parents, key=lambda p: (n_children[p.info.run_id], p.info.start_time or 0))


def _trial_status(run: Any) -> str:
    tag = (run.data.tags.get(STATUS_TAG) or "").strip().lower()
    if tag:
        return tag
    return _MLFLOW_STATUS_MAP.get(str(run.info.status).upper(), RUNNING)


def _row(run: Any) -> dict[str, Any]:
    tags = run.data.tags
    row: dict[str, Any] = {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name or tags.get("mlflow.runName", ""),
        "trial_id": tags.get(TRIAL_ID_TAG, "") or "",
        "arch": tags.get(ARCH_TAG, "") or (run.info.run_name or ""),
        "status": _trial_status(run),
        "reason": tags.get(REASON_TAG, "") or "",
        "baseline": (tags.get(BASELINE_TAG, "") or "").strip().lower(),
        "seed": tags.get(SEED_TAG, ""),
        "config_hash": tags.get(CONFIG_HASH_TAG, ""),
        "start_time": pd.to_datetime(run.info.start_time, unit="ms") if run.info.start_time else pd.NaT,
        "end_time": pd.to_datetime(run.info.end_time, unit="ms") if run.info.end_time else pd.NaT,
        "mlflow_status": run.info.status,
    }
    for k, v in run.data.metrics.items():
        row[f"metrics.{from_mlflow_metric(k)}"] = float(v)
    for k, v in run.data.params.items():
        row[f"params.{k}"] = v
    for k, v in tags.items():
        row[f"tags.{k}"] = v
    return row


def _coerce_param(series: pd.Series) -> pd.Series:
    """Params come back as strings; turn all-numeric columns into numbers."""
    converted = pd.to_numeric(series, errors="coerce")
    if converted.notna().sum() == series.notna().sum():
        return converted
    return series


def load_sweep(tracking_uri: str, experiment_name: str, sweep_id: str | None = None) -> tuple[SweepRef, pd.DataFrame]:
    """Load a sweep: ``(parent, trials)``.

    ``parent`` is a :class:`SweepRef` (``.run`` is the ``mlflow.entities.Run``); ``trials`` has one row per
    child run, sorted by start time, with columns ``BASE_COLUMNS`` plus ``metrics.<name>`` (latest value,
    float; NaN if never logged), ``params.<name>`` (numeric when every value parses as a number) and
    ``tags.<name>``. Raises :class:`ReportError` for an unknown experiment or a missing parent run.
    ``sweep_id``: the parent run is that sweep's (tag ``hqlt.sweep_id``); without it, the experiment's parent
    with the most children.
    """
    client = client_for(tracking_uri)
    exp = find_experiment(client, experiment_name)
    runs = _all_runs(client, exp.experiment_id)
    parent = _select_parent(runs, experiment_name, sweep_id)
    pid = parent.info.run_id
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == pid and r.info.run_id != pid]
    rows = [_row(r) for r in children]
    df = pd.DataFrame(rows, columns=None if rows else BASE_COLUMNS)
    for col in BASE_COLUMNS:
        if col not in df.columns:
            df[col] = pd.Series(dtype=object)
    for col in [c for c in df.columns if c.startswith("params.")]:
        df[col] = _coerce_param(df[col])
    if len(df):
        df = df.sort_values(["start_time", "trial_id", "run_id"], kind="stable", na_position="last")
        df = df.reset_index(drop=True)
    ordered = BASE_COLUMNS + sorted(c for c in df.columns if c not in BASE_COLUMNS)
    return SweepRef(exp.experiment_id, exp.name, parent), df[ordered]


def set_trial_tags(client, tags_by_run: dict[str, dict[str, str]]) -> None:
    """Set several tags on several runs (one ``log_batch`` call per run)."""
    from mlflow.entities import RunTag

    for run_id, tags in tags_by_run.items():
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)
