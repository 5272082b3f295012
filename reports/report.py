"""The sweep report: rank the completed trials, compute the hypervolume, draw, tabulate and log it all
back to MLflow (layout and write-back contract: :mod:`hqlt.reports.mlflow_io`).

    from hqlt.reports import write_report
    result = write_report("sqlite:///sweeps/s1/mlflow.db", "s1")          # objectives from the sweep
    result = write_report(uri, "s1", objectives=["val/acc:max", "model/params:min"], out_dir="s1-report")
    print(result.table)

Ranking population: trials whose status is ``completed`` and that have a finite latest value for every
objective. Failed / oom / nan / pruned / infeasible / running trials are excluded (``pareto_rank=none``) but
counted in the table's summary line and in the parent's ``report/n_<status>`` metrics. Baseline arms are
ranked like any other trial (so the table shows whether a baseline is on the front). Trials are ranked within
their group (:mod:`hqlt.reports.groups`): one front per value of the searched ``task.*`` keys, so that accuracies
of two tasks are never compared.
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

from hqlt.search_space.labels import format_metric, format_number, run_name
from hqlt.search_space.vocabulary import (COMPLETED, DOMINATED_BY_TAG, NONE_TAG, NOTE_TAG, OBJECTIVES_TAG,
                                          PARETO_GROUP_TAG, PARETO_OBJECTIVES_TAG, PARETO_RANK_METRIC,
                                          PARETO_RANK_TAG, REFERENCE_POINT_TAG, REPORT_ARTIFACTS,
                                          REPORT_GROUP_BY_TAG, REPORT_OBJECTIVES_TAG, REPORT_REFERENCE_POINT_TAG,
                                          RUN_NAME_TAG, SUPERSEDED, SWEEP_NAME_TAG)

from hqlt.orchestration.faults import fault_point

from .browse import description, ensure_browsable
from .groups import GROUP_COLUMN, group_keys, group_labels
from .hypervolume import default_reference, hypervolume, hypervolume_growth
from .mlflow_io import (
    NoCompletedTrials,
    ReportError,
    client_for,
    load_sweep,
)
from .objectives import Objective, ObjectiveSpecError, objectives_from_tag, parse_objectives
from .pareto import domination_counts, non_dominated_sort
from .seed_stats import SEED_STATS_MD, seed_stats_json, seed_stats_markdown
from .tables import front_csv, front_markdown, front_rows, front_table, status_counts, status_summary

__all__ = ["ReportResult", "rank_trials", "resolve_objectives", "resolve_seed_objective", "write_report", "ARTIFACTS"]

ARTIFACTS = REPORT_ARTIFACTS


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
    group_by: list[str] = field(default_factory=list)  # params ranked apart (task.* by default); [] = one front
    # per group label when grouped: reference_point, hypervolume, hypervolume_growth, front_size, n_ranked
    # (then the fields above hold the first group's hypervolume / reference point and the summed growth)
    groups: dict[str, dict] = field(default_factory=dict)
    seed_objective: Objective | None = None  # the objective of the seed statistics (default: the first)
    seed_stats: str = ""  # the seed-statistics section, Markdown (:mod:`hqlt.reports.seed_stats`)

    @property
    def front(self) -> pd.DataFrame:
        return front_rows(self.trials, self.objectives, 0)


def resolve_objectives(override: Any, parent_tags: dict[str, str]) -> list[Objective]:
    """``override`` (string / list of ``metric:mode`` / pairs) if given, else the parent's ``hqlt.objectives``."""
    if override is not None and not (isinstance(override, (list, tuple)) and len(override) == 0):
        return parse_objectives(override)
    return objectives_from_tag(parent_tags.get(OBJECTIVES_TAG))


def resolve_seed_objective(spec: Any, objectives: Sequence[Objective], known_metrics: Sequence[str]) -> Objective:
    """The objective of the seed statistics: ``spec`` (``"M:max"``, or ``"M"`` naming one of ``objectives``), else
    the first of ``objectives`` (the sweep's own unless the report overrides them)."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return objectives[0]
    if isinstance(spec, Objective):
        chosen = spec
    else:
        text = str(spec).strip()
        same = [o for o in objectives if o.metric == text]
        if same:
            return same[0]
        if ":" not in text:
            raise ReportError(f"seed statistics: {text!r} is not an objective of the report "
                              f"({', '.join(str(o) for o in objectives)}); give its mode, {text}:max or {text}:min")
        try:
            chosen = parse_objectives(text)[0]
        except ObjectiveSpecError as e:
            raise ReportError(str(e)) from None
    if chosen.metric not in known_metrics:
        raise ReportError(f"seed statistics: unknown metric {chosen.metric!r}: no trial logged it")
    return chosen


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
            _c=(group["status"] == COMPLETED).astype(int),
            _t=group["start_time"].fillna(pd.Timestamp(0)),
        ).sort_values(["_c", "_t"], ascending=False)
        losers = pref.index[1:]
        df.loc[losers, "superseded"] = True
        df.loc[losers, "status"] = SUPERSEDED
    return df


def rank_trials(trials: pd.DataFrame, objectives: Sequence[Objective],
                group_by: Sequence[str] = ()) -> pd.DataFrame:
    """Return a copy with ``pareto_rank`` and ``dominated_by`` (nullable Int64) for the ranking population,
    ranked within each group of ``group_by`` params (:mod:`hqlt.reports.groups`; ``()``: one group).

    Also adds ``superseded`` (see module :mod:`hqlt.reports.mlflow_io`) and ``group`` (the group's label).
    Missing metric columns count as NaN.
    """
    df = _dedupe(trials)
    df[GROUP_COLUMN] = group_labels(df, list(group_by))
    cols = [f"metrics.{o.metric}" for o in objectives]
    for c in cols:
        if c not in df.columns:
            df[c] = np.nan
    modes = [o.mode for o in objectives]
    values = df[cols].to_numpy(float) if len(df) else np.zeros((0, len(cols)))
    eligible = (df["status"] == COMPLETED).to_numpy() & np.all(np.isfinite(values), axis=1)
    # built whole: masked assignment of a list into an Int64 Series breaks on pandas 3.0.x
    rank: list = [pd.NA] * len(df)
    dominated: list = [pd.NA] * len(df)
    labels = df[GROUP_COLUMN].to_numpy()
    for label in dict.fromkeys(labels.tolist()):
        rows = np.flatnonzero(eligible & (labels == label))
        sub = values[rows]
        for i, r, d in zip(rows, non_dominated_sort(sub, modes), domination_counts(sub, modes)):
            rank[i] = pd.NA if r is None else int(r)
            dominated[i] = pd.NA if d is None else int(d)
    df["pareto_rank"] = pd.Series(rank, index=df.index, dtype="Int64")
    df["dominated_by"] = pd.Series(dominated, index=df.index, dtype="Int64")
    return df


def _metric_key(status: str) -> str:
    return "report/n_" + (re.sub(r"[^a-z0-9_]+", "_", status.lower()).strip("_") or "unknown")


def _reference(
    explicit: Sequence[float] | None, parent_tags: dict[str, str], points: np.ndarray, objectives: Sequence[Objective]
) -> list[float]:
    modes = [o.mode for o in objectives]
    if explicit is None and parent_tags.get(REFERENCE_POINT_TAG):
        try:
            explicit = [float(v) for v in json.loads(parent_tags[REFERENCE_POINT_TAG])]
        except (TypeError, ValueError) as e:
            raise ReportError(f"bad '{REFERENCE_POINT_TAG}' tag on the parent run: {e}") from None
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
    group_by: str | Sequence[str] | None = None,
    sweep_id: str | None = None,
    seed_metric: Any = None,
) -> ReportResult:
    """Rank the sweep's completed trials and write the report (see module docs).

    ``objectives`` overrides the sweep's (``"val/acc:max,perf/train_tok_s:max"`` or a list of such strings);
    ``out_dir`` keeps local copies of the artifacts (else a temporary folder is used and removed);
    ``reference`` fixes the hypervolume reference point (else the parent's ``hqlt.reference_point`` tag,
    else :func:`hqlt.reports.hypervolume.default_reference`, per group); ``max_rank`` = how many ranks the tables
    show (0 = front only); ``log_to_mlflow=False`` computes and writes files without touching the store;
    ``group_by`` = the params whose values are ranked apart (:func:`hqlt.reports.groups.group_keys`: by default
    every searched ``task.*`` key; ``"none"``: one front); ``sweep_id`` (a sweep folder's): the report is that
    sweep's, whatever other sweep of the same name the experiment holds; ``seed_metric`` = the objective of the
    seed statistics (:mod:`hqlt.reports.seed_stats`; ``"M:max"`` or an objective's metric; default: the first
    objective), written to ``seed_stats.md``, appended to ``front.md`` and kept in ``report.json``. A report written
    again on the same trials adds no metric values (only what changed is logged), so a report cut off by a kill can
    simply run again.

    Raises :class:`ReportError` (bad input: unknown experiment/metric/param, no parent run, bad objectives — an
    :class:`ObjectiveSpecError` is re-raised as ReportError) or :class:`NoCompletedTrials`.
    """
    parent, trials = load_sweep(tracking_uri, experiment_name, sweep_id)
    try:
        objs = resolve_objectives(objectives, parent.tags)
    except ObjectiveSpecError as e:
        raise ReportError(str(e)) from None

    n_trials = len(trials)
    if n_trials == 0 or not (trials["status"] == COMPLETED).any():
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

    seed_obj = resolve_seed_objective(seed_metric, objs, known_metrics)

    keys = group_keys(trials, group_by)
    df = rank_trials(trials, objs, keys)
    ranked = df["pareto_rank"].notna()
    if not ranked.any():
        raise NoCompletedTrials(
            f"sweep {experiment_name!r}: no completed trial has values for all of "
            f"{', '.join(o.metric for o in objs)}"
        )
    cols = [f"metrics.{o.metric}" for o in objs]
    modes = [o.mode for o in objs]
    groups: dict[str, dict[str, Any]] = {}
    for label in sorted(df.loc[ranked, GROUP_COLUMN].unique().tolist()):
        in_group = (df[GROUP_COLUMN] == label).to_numpy()
        mask = ranked.to_numpy() & in_group
        points = df.loc[mask, cols].to_numpy(float)
        ref = _reference(reference, parent.tags, points, objs)
        # growth over *all* trials in start order; excluded trials and other groups contribute nothing
        growth_pts = df[cols].to_numpy(float).copy()
        growth_pts[~mask] = np.nan
        groups[label] = {
            "reference_point": ref,
            "hypervolume": hypervolume(points, ref, modes),
            "hypervolume_growth": hypervolume_growth(growth_pts, modes, reference=ref),
            "front_size": int((df.loc[in_group, "pareto_rank"] == 0).sum()),
            "n_ranked": int(mask.sum()),
        }
    first = next(iter(groups.values()))
    grouped = bool(keys)
    hv, ref = first["hypervolume"], first["reference_point"]
    growth = first["hypervolume_growth"] if not grouped else _summed([g["hypervolume_growth"] for g in groups.values()])
    counts = status_counts(df)
    n_completed = counts.get(COMPLETED, 0)
    front_size = int((df["pareto_rank"] == 0).sum())
    title = parent.tags.get(SWEEP_NAME_TAG) or experiment_name
    over = ", ".join(str(o) for o in objs)
    table = front_table(df, objs, max_rank=max_rank,
                        title=f"{title}: Pareto front over {over}"
                        + (f", one per {', '.join(keys)}" if grouped else "")
                        + ("" if max_rank == 0 else f" (ranks 0-{max_rank})"))

    seed_md = seed_stats_markdown(df, seed_obj)
    summary = {
        "experiment": experiment_name,
        "parent_run_id": parent.run_id,
        "objectives": [[o.metric, o.mode] for o in objs],
        "group_by": keys,
        "reference_point": ref,
        "hypervolume": hv,
        "hypervolume_growth": growth,
        "front_size": front_size,
        "n_trials": n_trials,
        "n_completed": n_completed,
        "n_ranked": int(ranked.sum()),
        "counts": counts,
        "groups": groups if grouped else {},
        "seed_stats": seed_stats_json(df, seed_obj),
        "front": [
            {"run_id": r["run_id"], "trial_id": r["trial_id"], "arch": r["arch"], "baseline": r["baseline"],
             **({"group": r[GROUP_COLUMN]} if grouped else {}),
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
                {k: g["hypervolume_growth"] for k, g in groups.items()} if grouped else growth,
                base / "hypervolume.png", objectives=objs, reference=None if grouped else ref, title=title,
                improved_labels=df["arch"].fillna("").astype(str).tolist(),
            ),
        }
        if importlib.util.find_spec("plotly") is not None:  # the interactive plot is optional (no plotly: png only)
            files["pareto.html"] = plots.pareto_html(df, objs, base / "pareto.html", title=title)
        (base / "front.md").write_text(front_markdown(df, objs, max_rank=max_rank, title=f"{title} — Pareto front")
                                       + "\n" + seed_md)
        (base / SEED_STATS_MD).write_text(seed_md)
        (base / "front.csv").write_text(front_csv(df, objs, max_rank=max_rank))
        export = df.drop(columns=[c for c in df.columns if c.startswith("tags.")])
        export.to_csv(base / "trials.csv", index=False)
        (base / "report.json").write_text(json.dumps(summary, indent=2, default=str))
        files.update({n: base / n for n in ("front.md", "front.csv", "trials.csv", "report.json", SEED_STATS_MD)})

        logged: list[str] = []
        if log_to_mlflow:
            client = client_for(tracking_uri)
            _write_back(client, parent, df, objs, keys, groups, n_trials, counts)
            fault_point("report")  # tests: a kill during the report
            for name in (n for n in ARTIFACTS if n in files):
                client.log_artifact(parent.run_id, str(base / name))
                logged.append(name)
            note = _description(df, objs, title, groups, grouped, parent.run_id, logged)
            client.set_tag(parent.run_id, NOTE_TAG, note, synchronous=True)
            ensure_browsable(client, parent.experiment_id, objs, keys)
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
        group_by=keys,
        groups=groups if grouped else {},
        seed_objective=seed_obj,
        seed_stats=seed_md,
    )


def _summed(curves: list[list[float]]) -> list[float]:
    return [float(sum(vals)) for vals in zip(*curves)] if curves else []


def _metric_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_./ -]+", "_", text).strip() or "_"


MAX_NOTE_CHARS = 7500  # MLflow keeps tag values up to 8000 characters


def _description(df: pd.DataFrame, objs: Sequence[Objective], title: str, groups: dict, grouped: bool,
                 parent_run_id: str, artifacts: Sequence[str]) -> str:
    parts = []
    for label, g in groups.items():
        sub = df[df[GROUP_COLUMN] == label]
        hv_line = (f"front {g['front_size']} of {g['n_ranked']} ranked trials; hypervolume "
                   f"{format_number(g['hypervolume'])} (reference "
                   + ", ".join(format_metric(o.metric, r) for o, r in zip(objs, g["reference_point"])) + ")")
        table = front_markdown(sub.drop(columns=[GROUP_COLUMN]), objs, max_rank=0, summary=False)
        parts.append((label if grouped else "", hv_line, table))
    text = description(title, parts, parent_run_id, artifacts, status_summary(df))
    if len(text) > MAX_NOTE_CHARS:
        text = text[:MAX_NOTE_CHARS].rsplit("\n", 1)[0] + "\n\n… (cut; the whole front is in front.md)"
    return text


def _write_back(client, parent, df: pd.DataFrame, objs: Sequence[Objective], keys: Sequence[str], groups: dict,
                n_trials: int, counts: dict) -> None:
    """Tags and metrics of every child run (rank as tag and metric, group, a readable name for runs still named
    `trial-<id>`), and the report's metrics and tags on the parent run."""
    from mlflow.entities import Metric, RunTag

    obj_text = ",".join(str(o) for o in objs)
    now = int(time.time() * 1000)
    for _, r in df.iterrows():
        rank, dom = r["pareto_rank"], r["dominated_by"]
        tags = {
            PARETO_RANK_TAG: NONE_TAG if pd.isna(rank) else str(int(rank)),
            DOMINATED_BY_TAG: NONE_TAG if pd.isna(dom) else str(int(dom)),
            PARETO_OBJECTIVES_TAG: obj_text,
            PARETO_GROUP_TAG: str(r[GROUP_COLUMN]),
        }
        if r.get("run_name") == f"trial-{r.get('trial_id')}" and r.get("arch"):
            params = {c[len("params."):]: v for c, v in r.items() if c.startswith("params.") and pd.notna(v)}
            tags[RUN_NAME_TAG] = run_name(str(r["arch"]), params)
        value = float("nan") if pd.isna(rank) else float(rank)
        before = r.get(f"metrics.{PARETO_RANK_METRIC}")
        unchanged = before is not None and (before == value or (pd.isna(before) and pd.isna(value)))
        client.log_batch(r["run_id"], tags=[RunTag(k, v) for k, v in tags.items()],  # step: trials ranked over
                         metrics=[] if unchanged else [Metric(PARETO_RANK_METRIC, value, now, n_trials)],
                         synchronous=True)

    ranked = int(df["pareto_rank"].notna().sum())
    metrics = {
        "report/front_size": int((df["pareto_rank"] == 0).sum()),
        "report/n_completed": counts.get(COMPLETED, 0),
        "report/n_trials": n_trials,
        "report/n_ranked": ranked,
    }
    metrics["report/hypervolume"] = sum(g["hypervolume"] for g in groups.values())  # one group: its own
    if keys:
        for label, g in groups.items():
            metrics[f"report/hypervolume/{_metric_safe(label)}"] = g["hypervolume"]
            metrics[f"report/front_size/{_metric_safe(label)}"] = g["front_size"]
    for status, c in counts.items():
        metrics.setdefault(_metric_key(status), c)
    ref = next(iter(groups.values()))["reference_point"] if not keys else {k: g["reference_point"] for k, g in groups.items()}
    latest = dict(parent.run.data.metrics)  # a report again on the same trials (a rerun after a kill): no new values
    metrics = {k: v for k, v in metrics.items() if not (latest.get(k) == float(v) and any(
        m.step == n_trials and m.value == float(v) for m in client.get_metric_history(parent.run_id, k)))}
    client.log_batch(
        parent.run_id,
        metrics=[Metric(k, float(v), now, n_trials) for k, v in metrics.items()],
        tags=[RunTag(REPORT_OBJECTIVES_TAG, obj_text), RunTag(REPORT_REFERENCE_POINT_TAG, json.dumps(ref)),
              RunTag(REPORT_GROUP_BY_TAG, json.dumps(list(keys)))],
        synchronous=True,
    )
