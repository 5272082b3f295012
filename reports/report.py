"""The sweep report: rank the completed trials, compute the hypervolume, draw, tabulate and log it all
back to MLflow (layout and write-back contract: :mod:`hqlt.reports.mlflow_io`).

    from hqlt.reports import write_report
    result = write_report("sqlite:///sweeps/s1/mlflow.db", "s1")          # objectives from the sweep
    result = write_report(uri, "s1", objectives=["val/acc:max", "model/params:min"], out_dir="s1-report")
    print(result.table)

Ranking population: trials whose status is ``completed`` and that have a finite latest value for every
objective. Failed / oom / nan / pruned / infeasible / running trials are excluded (``pareto_rank=none``) but
counted in the table's summary line and in the parent's ``report/n_<status>`` metrics. Baseline arms are
ranked like any other trial (so the table shows whether a baseline is on the front).
"""

from __future__ import annotations

import importlib.util
import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .hypervolume import default_reference, hypervolume, hypervolume_growth
from .mlflow_io import (
    NoCompletedTrials,
    ReportError,
    client_for,
    load_sweep,
    set_trial_tags,
)
from .objectives import Objective, ObjectiveSpecError, objectives_from_tag, parse_objectives
from .pareto import domination_counts, non_dominated_sort
from .tables import front_csv, front_markdown, front_rows, front_table, status_counts

__all__ = ["ReportResult", "rank_trials", "resolve_objectives", "write_report", "ARTIFACTS"]

ARTIFACTS = ("pareto.png", "pareto.html", "hypervolume.png", "front.md", "front.csv", "trials.csv", "report.json")
NONE_TAG = "none"


@dataclass
class ReportResult:
    """What :func:`write_report` computed and where it put it."""

    experiment_name: str
    experiment_id: str
    parent_run_id: str
    objectives: list[Objective]
    reference_point: list[float]
    hypervolume: float
    hypervolume_growth: list[float]
    front_size: int
    n_completed: int
    n_ranked: int
    n_trials: int
    counts: dict[str, int]
    trials: pd.DataFrame  # every child run, with pareto_rank (Int64, <NA> = excluded) and dominated_by
    table: str  # the terminal front table + summary line
    artifact_uri: str  # the parent run's artifact root (where the artifacts were logged)
    artifacts: list[str] = field(default_factory=list)  # artifact names logged on the parent run
    files: dict[str, Path] = field(default_factory=dict)  # local copies (only when out_dir was given)

    @property
    def front(self) -> pd.DataFrame:
        return front_rows(self.trials, self.objectives, 0)


def resolve_objectives(override: Any, parent_tags: dict[str, str]) -> list[Objective]:
    """``override`` (string / list of ``metric:mode`` / pairs) if given, else the parent's ``hqlt.objectives``."""
    if override is not None and not (isinstance(override, (list, tuple)) and len(override) == 0):
        return parse_objectives(override)
    return objectives_from_tag(parent_tags.get("hqlt.objectives"))


def _dedupe(trials: pd.DataFrame) -> pd.DataFrame:
    """Mark all but one run per non-empty trial_id as ``superseded`` (completed wins, then latest start)."""
    df = trials.copy()
    df["superseded"] = False
    if len(df) == 0:
        return df
    tid = df["trial_id"].fillna("").astype(str)
    dup = tid.duplicated(keep=False) & (tid != "")
    if not dup.any():
        return df
    for _, group in df[dup].groupby(tid[dup]):
        pref = group.assign(
            _c=(group["status"] == "completed").astype(int),
            _t=group["start_time"].fillna(pd.Timestamp(0)),
        ).sort_values(["_c", "_t"], ascending=False)
        losers = pref.index[1:]
        df.loc[losers, "superseded"] = True
        df.loc[losers, "status"] = "superseded"
    return df


def rank_trials(trials: pd.DataFrame, objectives: Sequence[Objective]) -> pd.DataFrame:
    """Return a copy with ``pareto_rank`` and ``dominated_by`` (nullable Int64) for the ranking population.

    Also adds ``superseded`` (see module :mod:`hqlt.reports.mlflow_io`). Missing metric columns count as NaN.
    """
    df = _dedupe(trials)
    cols = [f"metrics.{o.metric}" for o in objectives]
    for c in cols:
        if c not in df.columns:
            df[c] = np.nan
    modes = [o.mode for o in objectives]
    values = df[cols].to_numpy(float) if len(df) else np.zeros((0, len(cols)))
    eligible = (df["status"] == "completed").to_numpy() & np.all(np.isfinite(values), axis=1)
    rows = np.flatnonzero(eligible)
    sub = values[eligible]

    def full_column(found: list) -> pd.Series:
        # built whole: masked assignment of a list into an Int64 Series breaks on pandas 3.0.x
        col: list = [pd.NA] * len(df)
        for i, v in zip(rows, found):
            col[i] = pd.NA if v is None else int(v)
        return pd.Series(col, index=df.index, dtype="Int64")

    df["pareto_rank"] = full_column(non_dominated_sort(sub, modes))
    df["dominated_by"] = full_column(domination_counts(sub, modes))
    return df


def _metric_key(status: str) -> str:
    return "report/n_" + (re.sub(r"[^a-z0-9_]+", "_", status.lower()).strip("_") or "unknown")


def _reference(
    explicit: Sequence[float] | None, parent_tags: dict[str, str], points: np.ndarray, objectives: Sequence[Objective]
) -> list[float]:
    modes = [o.mode for o in objectives]
    if explicit is None and parent_tags.get("hqlt.reference_point"):
        try:
            explicit = [float(v) for v in json.loads(parent_tags["hqlt.reference_point"])]
        except (TypeError, ValueError) as e:
            raise ReportError(f"bad 'hqlt.reference_point' tag on the parent run: {e}") from None
    if explicit is not None:
        ref = [float(v) for v in explicit]
        if len(ref) != len(objectives):
            raise ReportError(f"reference point has {len(ref)} values for {len(objectives)} objectives")
        return ref
    return default_reference(points, modes, [o.metric for o in objectives])


def write_report(
    tracking_uri: str,
    experiment_name: str,
    objectives: Any = None,
    out_dir: str | Path | None = None,
    *,
    reference: Sequence[float] | None = None,
    max_rank: int = 0,
    log_to_mlflow: bool = True,
) -> ReportResult:
    """Rank the sweep's completed trials and write the report (see module docs).

    ``objectives`` overrides the sweep's (``"val/acc:max,perf/train_tok_s:max"`` or a list of such strings);
    ``out_dir`` keeps local copies of the artifacts (else a temporary folder is used and removed);
    ``reference`` fixes the hypervolume reference point (else the parent's ``hqlt.reference_point`` tag,
    else :func:`hqlt.reports.hypervolume.default_reference`); ``max_rank`` = how many ranks the tables show
    (0 = front only); ``log_to_mlflow=False`` computes and writes files without touching the store.

    Raises :class:`ReportError` (bad input: unknown experiment/metric, no parent run, bad objectives — an
    :class:`ObjectiveSpecError` is re-raised as ReportError) or :class:`NoCompletedTrials`.
    """
    parent, trials = load_sweep(tracking_uri, experiment_name)
    try:
        objs = resolve_objectives(objectives, parent.tags)
    except ObjectiveSpecError as e:
        raise ReportError(str(e)) from None

    n_trials = len(trials)
    if n_trials == 0 or not (trials["status"] == "completed").any():
        counts = status_counts(trials) if n_trials else {}
        detail = ", ".join(f"{c} {s}" for s, c in counts.items()) or "no trial runs"
        raise NoCompletedTrials(f"sweep {experiment_name!r} has no completed trials yet ({detail})")
    known_metrics = sorted(c[len("metrics.") :] for c in trials.columns if c.startswith("metrics."))
    unknown = [o.metric for o in objs if o.metric not in known_metrics]
    if unknown:
        raise ReportError(
            f"unknown metric {unknown[0]!r}: no trial of {experiment_name!r} logged it; "
            f"metrics seen: {', '.join(known_metrics) or 'none'}"
        )

    df = rank_trials(trials, objs)
    ranked = df["pareto_rank"].notna()
    if not ranked.any():
        raise NoCompletedTrials(
            f"sweep {experiment_name!r}: no completed trial has values for all of "
            f"{', '.join(o.metric for o in objs)}"
        )
    cols = [f"metrics.{o.metric}" for o in objs]
    points = df.loc[ranked, cols].to_numpy(float)
    ref = _reference(reference, parent.tags, points, objs)
    modes = [o.mode for o in objs]
    hv = hypervolume(points, ref, modes)
    # growth over *all* trials in start order; excluded trials contribute nothing
    growth_pts = df[cols].to_numpy(float).copy()
    growth_pts[~ranked.to_numpy()] = np.nan
    growth = hypervolume_growth(growth_pts, modes, reference=ref)
    counts = status_counts(df)
    n_completed = counts.get("completed", 0)
    front_size = int((df["pareto_rank"] == 0).sum())
    title = parent.tags.get("hqlt.sweep_name") or experiment_name
    table = front_table(df, objs, max_rank=max_rank,
                        title=f"{title}: Pareto front over " + ", ".join(str(o) for o in objs)
                        + ("" if max_rank == 0 else f" (ranks 0-{max_rank})"))

    summary = {
        "experiment": experiment_name,
        "parent_run_id": parent.run_id,
        "objectives": [[o.metric, o.mode] for o in objs],
        "reference_point": ref,
        "hypervolume": hv,
        "hypervolume_growth": growth,
        "front_size": front_size,
        "n_trials": n_trials,
        "n_completed": n_completed,
        "n_ranked": int(ranked.sum()),
        "counts": counts,
        "front": [
            {"run_id": r["run_id"], "trial_id": r["trial_id"], "arch": r["arch"], "baseline": r["baseline"],
             **{o.metric: float(r[f"metrics.{o.metric}"]) for o in objs}}
            for _, r in front_rows(df, objs, 0).iterrows()
        ],
    }

    from . import plots  # matplotlib/plotly only when drawing

    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="hqlt-report-")
        base = Path(tmp.name)
    else:
        base = Path(out_dir)
        base.mkdir(parents=True, exist_ok=True)
    try:
        files = {
            "pareto.png": plots.pareto_png(df, objs, base / "pareto.png", title=title),
            "hypervolume.png": plots.hypervolume_png(
                growth, base / "hypervolume.png", objectives=objs, reference=ref, title=title,
                improved_labels=df["arch"].fillna("").astype(str).tolist(),
            ),
        }
        if importlib.util.find_spec("plotly") is not None:  # the interactive plot is optional (no plotly: png only)
            files["pareto.html"] = plots.pareto_html(df, objs, base / "pareto.html", title=title)
        (base / "front.md").write_text(front_markdown(df, objs, max_rank=max_rank, title=f"{title} — Pareto front"))
        (base / "front.csv").write_text(front_csv(df, objs, max_rank=max_rank))
        export = df.drop(columns=[c for c in df.columns if c.startswith("tags.")])
        export.to_csv(base / "trials.csv", index=False)
        (base / "report.json").write_text(json.dumps(summary, indent=2, default=str))
        files.update({n: base / n for n in ("front.md", "front.csv", "trials.csv", "report.json")})

        logged: list[str] = []
        if log_to_mlflow:
            client = client_for(tracking_uri)
            obj_text = ",".join(str(o) for o in objs)
            tags_by_run: dict[str, dict[str, str]] = {}
            for _, r in df.iterrows():
                rank, dom = r["pareto_rank"], r["dominated_by"]
                tags_by_run[r["run_id"]] = {
                    "pareto_rank": NONE_TAG if pd.isna(rank) else str(int(rank)),
                    "dominated_by": NONE_TAG if pd.isna(dom) else str(int(dom)),
                    "pareto_objectives": obj_text,
                }
            set_trial_tags(client, tags_by_run)
            from mlflow.entities import Metric, RunTag

            now = int(time.time() * 1000)
            metrics = {
                "report/hypervolume": hv,
                "report/front_size": front_size,
                "report/n_completed": n_completed,
                "report/n_trials": n_trials,
                "report/n_ranked": int(ranked.sum()),
            }
            for status, c in counts.items():
                metrics.setdefault(_metric_key(status), c)
            client.log_batch(
                parent.run_id,
                metrics=[Metric(k, float(v), now, n_trials) for k, v in metrics.items()],
                tags=[RunTag("report.objectives", obj_text), RunTag("report.reference_point", json.dumps(ref))],
                synchronous=True,
            )
            for name in (n for n in ARTIFACTS if n in files):
                client.log_artifact(parent.run_id, str(base / name))
                logged.append(name)
    finally:
        if tmp is not None:
            tmp.cleanup()

    return ReportResult(
        experiment_name=experiment_name,
        experiment_id=parent.experiment_id,
        parent_run_id=parent.run_id,
        objectives=objs,
        reference_point=ref,
        hypervolume=hv,
        hypervolume_growth=growth,
        front_size=front_size,
        n_completed=n_completed,
        n_ranked=int(ranked.sum()),
        n_trials=n_trials,
        counts=counts,
        trials=df,
        table=table,
        artifact_uri=parent.artifact_uri,
        artifacts=logged,
        files={} if tmp is not None else files,
    )
