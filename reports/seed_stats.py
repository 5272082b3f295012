"""Seed statistics of a sweep: per task group and per arm (one trial = one arm), the spread of an objective over
the trial's seeds, the checkpoint that was scored, per-length accuracy, and which orderings the seeds support.

    from hqlt.reports.seed_stats import seed_stats, seed_stats_markdown
    arms = seed_stats(df, Objective("test/acc_scaled", "max"))    # {group: [ArmStats, ...]}, best median first
    text = seed_stats_markdown(df, Objective("test/acc_scaled", "max"))

``df`` is the trials frame of :func:`hqlt.reports.report.rank_trials` (``status``, ``group``, ``metrics.*``,
``params.*``, ``tags.*`` columns). What is read, per completed trial (superseded runs are not ``completed``):

* each seed's value: ``seed<i>/<metric>`` (vocabulary ``seed_metric``); a trial without them (a metric that is
  not an objective of the sweep, or an older sweep) has one value: the trial's ``<metric>``;
* the spread: ``seeds_min|median|max/<metric>`` (``seed_stat_metric``: the trial's own statistics over its
  completed seeds) when the trial logged all three, else computed from the per-seed values;
* ``trial/selected_seed`` (the seed whose whole record is the trial's, ``seed_aggregate: max``);
* the scored checkpoint: the child-run tag ``checkpoint`` (``final`` | ``best_val``, from the trial's
  ``trial/checkpoint``) and ``train/selected_step``; a run without the tag says ``not recorded`` (no default
  stands in for what the sweep did not record);
* per-slice accuracy of the trial record: ``test/acc@<slice>`` for a ``test/`` objective, ``val/acc@<slice>``
  for a ``val/`` one (stored in MLflow as ``…/acc_at_<slice>``; :func:`from_mlflow_metric` reads them back).

Ordering rule ("separated"): arm A is above arm B when *every* seed of A beats *every* seed of B — for a ``max``
objective min(A) > max(B), for ``min`` max(A) < min(B). Anything else (overlapping or touching ranges, ties) is
"not separated". An arm with a single seed has no spread: it is "single seed, not tested" and is never ordered.
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import pandas as pd

from hqlt.search_space.labels import decode_arm, flatten, format_metric, is_task_key, run_name, short_value
from hqlt.search_space.vocabulary import (ALL_GROUP, BOOKKEEPING_PREFIX, CHECKPOINT_TAG, COMPLETED, SEED_STATS,
                                          SEED_STATS_MD,
                                          SEED_TAG, SELECTED_SEED, SELECTED_STEP, SLICE_METRIC_PREFIX, TEST_PREFIX,
                                          TEST_SLICE_METRIC_PREFIX, VAL_PREFIX, seed_metric, seed_stat_metric,
                                          to_mlflow_metric)

from .groups import GROUP_COLUMN
from .objectives import Objective

__all__ = ["ArmStats", "SEED_STATS_MD", "arm_label", "compare", "ordering", "seed_stats", "seed_stats_markdown",
           "seed_stats_json", "slice_prefix"]

NOT_RECORDED = "not recorded"
_SEED_COL = re.compile(r"^metrics\.seed(\d+)/(.+)$")


@dataclass
class ArmStats:
    """One arm (trial) of a group: its seeds' values of one objective and what was scored."""

    group: str
    label: str
    trial_id: str
    run_id: str
    values: list[float]  # finite per-seed values, by seed index (per_seed False: the trial's value)
    seed_indices: list[int]
    n_run: int  # seeds the trial trained (the `seed` tag), at least len(values)
    best: float
    median: float
    lo: float  # min over the seeds
    hi: float  # max over the seeds
    recorded_stats: bool  # lo/median/hi are the trial's own seeds_* metrics
    per_seed: bool  # values are seed<i>/<metric> (False: the trial's value only)
    checkpoint: str
    selected_step: float | None
    selected_seed: int | None
    slices: dict[str, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.values)


def _finite(v: Any) -> bool:
    try:
        return v is not None and not pd.isna(v) and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _metric(row: pd.Series, name: str) -> float | None:
    """A metric of the row under its hqlt name or the name MLflow stored (`@` -> `_at_`); None if not finite."""
    for col in (f"metrics.{name}", f"metrics.{to_mlflow_metric(name)}"):
        v = row.get(col)
        if _finite(v):
            return float(v)
    return None


def slice_prefix(metric: str, columns: Sequence[str]) -> str | None:
    """The per-slice accuracies that go with ``metric``: ``test/acc@`` for a test metric, ``val/acc@`` for a
    validation metric, else whichever the trials logged (test first); None if none."""
    have = {p for p in (TEST_SLICE_METRIC_PREFIX, SLICE_METRIC_PREFIX)
            if any(c.startswith("metrics." + p) for c in columns)}
    if metric.startswith(TEST_PREFIX):
        return TEST_SLICE_METRIC_PREFIX if TEST_SLICE_METRIC_PREFIX in have else None
    if metric.startswith(VAL_PREFIX):
        return SLICE_METRIC_PREFIX if SLICE_METRIC_PREFIX in have else None
    return next((p for p in (TEST_SLICE_METRIC_PREFIX, SLICE_METRIC_PREFIX) if p in have), None)


def _slice_key(label: str) -> tuple:
    """`len_3-40` < `len_41-64` < `len_129-256`; `kv_16` < `kv_64` (numbers compared as numbers)."""
    head = re.split(r"\d", label, maxsplit=1)[0]
    return (head, [int(n) for n in re.findall(r"\d+", label)], label)


def arm_label(row: pd.Series, group_label: str | None = None) -> str:
    """The arm's name as the report names runs: the MLflow run name (``run_name``: architecture id, searched
    values the id does not show, task), rebuilt from ``arch`` + params when the run is still ``trial-<id>``;
    the task suffix is dropped when it is the group's label (the table says the group)."""
    name = str(row.get("run_name") or "")
    arch = str(row.get("arch") or "")
    if (not name or name == f"trial-{row.get('trial_id')}") and arch:
        params = {c[len("params."):]: v for c, v in row.items() if str(c).startswith("params.") and pd.notna(v)}
        name = run_name(arch, params)
    name = name or arch or str(row.get("trial_id") or row.get("run_id", ""))[:12]
    head, sep, tail = name.rpartition(" · ")
    if sep and group_label is not None and tail == group_label:
        return head
    return name


def _checkpoint(row: pd.Series) -> str:
    tag = row.get(f"tags.{CHECKPOINT_TAG}")
    return str(tag) if isinstance(tag, str) and tag.strip() else NOT_RECORDED


def _n_run(row: pd.Series) -> int:
    seeds = str(row.get("seed") or "").strip()
    return len([s for s in seeds.split(",") if s.strip()]) if seeds else 0


def _arm(row: pd.Series, objective: Objective, group: str, label: str, prefix: str | None) -> ArmStats | None:
    metric, mode = objective.metric, objective.mode
    per: dict[int, float] = {}
    for col, v in row.items():
        m = _SEED_COL.match(str(col))
        if m and m.group(2) in (metric, to_mlflow_metric(metric)) and _finite(v):
            per[int(m.group(1))] = float(v)
    n_run = _n_run(row)
    per_seed = bool(per) or n_run <= 1  # a one-seed trial's own value is its seed's
    if not per:
        value = _metric(row, metric)
        if value is None:
            return None
        per = {0: value}
    idx = sorted(per)
    values = [per[i] for i in idx]
    recorded = [_metric(row, seed_stat_metric(s, metric)) for s in SEED_STATS]
    stats = dict(zip(SEED_STATS, recorded))
    use_recorded = per_seed and all(v is not None for v in recorded)
    if not per_seed:  # several seeds, only the trial's value: no statistics
        stats = dict.fromkeys(SEED_STATS, math.nan)
    elif not use_recorded:
        stats = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    sel = _metric(row, SELECTED_SEED)
    slices = {}
    if prefix:
        for col, v in row.items():
            c = str(col)
            if c.startswith("metrics." + prefix) and _finite(v):
                slices[c[len("metrics." + prefix):]] = float(v)
    return ArmStats(
        group=group, label=label, trial_id=str(row.get("trial_id") or ""), run_id=str(row.get("run_id") or ""),
        values=values, seed_indices=idx, n_run=max(n_run, len(values)),
        best=stats["max"] if mode == "max" else stats["min"], median=stats["median"], lo=stats["min"],
        hi=stats["max"], recorded_stats=use_recorded, per_seed=per_seed, checkpoint=_checkpoint(row),
        selected_step=_metric(row, SELECTED_STEP), selected_seed=None if sel is None else int(sel),
        slices=dict(sorted(slices.items(), key=lambda kv: _slice_key(kv[0]))),
    )


def _leaves(row: pd.Series) -> dict[str, str]:
    """The row's params as leaves (an arm logged as JSON text expanded), bookkeeping and task keys left out."""
    out: dict[str, str] = {}
    for col, v in row.items():
        c = str(col)
        if not c.startswith("params.") or (not isinstance(v, str) and pd.isna(v)):
            continue
        key = c[len("params."):]
        if key.startswith(BOOKKEEPING_PREFIX) or is_task_key(key) or key.rsplit(".", 1)[-1] == SEED_TAG:
            continue
        arm = decode_arm(v)
        if arm is not None:
            out.update({k: short_value(x) for k, x in flatten(arm, key).items()})
        else:
            out[key] = short_value(v)
    return out


def _disambiguate(arms: list[ArmStats], rows: dict[str, pd.Series], max_values: int = 3) -> None:
    """Arms of one name (the architecture id does not show every difference): add the values that differ
    between them (`d_model=128`), then the trial id if they still collide."""
    by_name: dict[str, list[ArmStats]] = {}
    for a in arms:
        by_name.setdefault(a.label, []).append(a)
    for name, same in by_name.items():
        if len(same) < 2:
            continue
        leaves = [_leaves(rows[a.run_id]) for a in same]
        keys = sorted({k for lv in leaves for k in lv})
        differ = [k for k in keys if len({lv.get(k) for lv in leaves}) > 1][:max_values]
        for a, lv in zip(same, leaves):
            extra = " ".join(f"{k.rsplit('.', 1)[-1]}={lv.get(k, '-')}" for k in differ)
            a.label = f"{name} {extra}".strip()
    labels = [a.label for a in arms]
    for a in arms:
        if labels.count(a.label) > 1:
            a.label = f"{a.label} [{a.trial_id or a.run_id[:8]}]"


def _order_key(a: ArmStats, mode: str) -> tuple:
    sign = -1.0 if mode == "max" else 1.0
    if not a.per_seed:  # the trial's value only: after the arms with seeds, by that value
        return (1, sign * a.values[0], 0.0, a.label, a.trial_id)
    return (0, sign * a.median, sign * a.best, a.label, a.trial_id)


def seed_stats(df: pd.DataFrame, objective: Objective) -> dict[str, list[ArmStats]]:
    """Per group (in label order): the completed trials with a value of ``objective``, best median first."""
    if len(df) == 0:
        return {}
    prefix = slice_prefix(objective.metric, list(df.columns))
    groups = df[GROUP_COLUMN] if GROUP_COLUMN in df.columns else pd.Series([ALL_GROUP] * len(df), index=df.index)
    out: dict[str, list[ArmStats]] = {}
    for label in sorted(set(groups.astype(str))):
        rows = df[(groups.astype(str) == label).to_numpy() & (df["status"] == COMPLETED).to_numpy()]
        arms = []
        for _, row in rows.iterrows():
            a = _arm(row, objective, label, arm_label(row, None if label == ALL_GROUP else label), prefix)
            if a is not None:
                arms.append(a)
        _disambiguate(arms, {r["run_id"]: r for _, r in rows.iterrows()})
        if arms:
            out[label] = sorted(arms, key=lambda a: _order_key(a, objective.mode))
    return out


def compare(a: ArmStats, b: ArmStats, mode: str) -> int | None:
    """1: every seed of ``a`` beats every seed of ``b``; -1: the reverse; 0: not separated (ranges overlap or
    touch); None: either arm has a single seed (not tested)."""
    if a.n < 2 or b.n < 2:
        return None
    if mode == "max":
        return 1 if a.lo > b.hi else (-1 if b.lo > a.hi else 0)
    return 1 if a.hi < b.lo else (-1 if b.hi < a.lo else 0)


def _v(metric: str, v: float) -> str:
    return format_metric(metric, v) if _finite(v) else "-"


def ordering(arms: Sequence[ArmStats], objective: Objective) -> list[str]:
    """The ordering statements of one group (Markdown list items without the bullet), pairs in median order."""
    metric, mode = objective.metric, objective.mode
    arms = sorted(arms, key=lambda a: _order_key(a, mode))
    multi = [a for a in arms if a.n >= 2]
    better = ">" if mode == "max" else "<"
    lines = []
    for i, first in enumerate(multi):
        for second in multi[i + 1:]:
            c = compare(first, second, mode)
            a, b = (second, first) if c == -1 else (first, second)  # -1 only where medians tie
            if c:
                wa = a.lo if mode == "max" else a.hi
                bb = b.hi if mode == "max" else b.lo
                lines.append(f"`{a.label}` {better} `{b.label}` — separated ({a.label}'s worst seed "
                             f"{_v(metric, wa)} {better} {b.label}'s best seed {_v(metric, bb)})")
            else:
                lines.append(f"`{a.label}` ≈ `{b.label}` — not separated (seed ranges "
                             f"[{_v(metric, a.lo)}, {_v(metric, a.hi)}] and [{_v(metric, b.lo)}, {_v(metric, b.hi)}] "
                             "overlap)")
    for why, per_seed in (("single seed", True), ("no per-seed values logged", False)):
        single = [a for a in arms if a.n < 2 and a.per_seed == per_seed]
        if single:
            lines.append(f"{why}, not tested (not ordered against any arm): "
                         + ", ".join(f"`{a.label}` {_v(metric, a.values[0])}" for a in single))
    return lines


def _esc(s: str) -> str:
    return str(s).replace("|", "\\|")


def _row_cells(a: ArmStats, metric: str) -> list[str]:
    if a.per_seed:
        seeds = str(a.n) if a.n == a.n_run else f"{a.n} of {a.n_run}"
        each = " / ".join(_v(metric, v) for v in a.values)
    else:
        seeds, each = f"{a.n_run}, not logged per seed", f"trial value {_v(metric, a.values[0])}"
    ckpt = a.checkpoint
    if a.selected_step is not None and ckpt != NOT_RECORDED:
        ckpt += f" (step {int(a.selected_step)})"
    return [a.label, a.trial_id or a.run_id[:8], seeds, _v(metric, a.best), _v(metric, a.median),
            _v(metric, a.lo), _v(metric, a.hi), each, ckpt]


def _record_seed(a: ArmStats) -> str:
    if a.selected_seed is not None:
        return f"seed {a.selected_seed}"
    return f"seed {a.seed_indices[0]}" if a.n_run <= 1 else NOT_RECORDED


def seed_stats_markdown(df: pd.DataFrame, objective: Objective, *, title: str | None = None,
                        level: int = 2) -> str:
    """The seed-statistics section (Markdown): per group a table, the ordering statements, per-slice accuracy."""
    metric, mode = objective.metric, objective.mode
    groups = seed_stats(df, objective)
    h = "#" * level
    arrow = "↑" if mode == "max" else "↓"
    lines = [f"{h} {title or 'Seed statistics'}: {metric} ({mode})", ""]
    if not groups:
        return "\n".join(lines + [f"No completed trial has a value of {metric}.", ""])
    lines += [
        f"Per arm (one trial each), over its seeds: best, median, min and max of `{metric}` ({arrow} better), "
        f"each seed's value (`{seed_metric(0, metric)}`, …), the checkpoint whose weights were scored "
        f"(run tag `{CHECKPOINT_TAG}`). \"A {'>' if mode == 'max' else '<'} B — separated\": every seed of A "
        "beats every seed of B; otherwise \"not separated\". A single seed is not tested.",
        "",
    ]
    prefix = slice_prefix(metric, list(df.columns))
    for label, arms in groups.items():
        if label != ALL_GROUP or len(groups) > 1:
            lines += [f"{h}# {label}", ""]
        headers = ["arm", "trial", "seeds", "best", "median", "min", "max", "each seed", "checkpoint"]
        lines.append("| " + " | ".join(headers) + " |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---|---|")
        lines += ["| " + " | ".join(_esc(c) for c in _row_cells(a, metric)) + " |" for a in arms]
        lines.append("")
        lines += [f"Ordering by median ({metric}):", ""]
        lines += [f"- {s}" for s in ordering(arms, objective)] or ["- (one arm)"]
        lines.append("")
        keys = sorted({k for a in arms for k in a.slices}, key=_slice_key)
        if prefix and keys:
            lines += [f"Per-slice accuracy `{prefix}<slice>` of the trial record (the selected seed's with "
                      "`seed_aggregate: max`):", ""]
            lines.append("| arm | record | " + " | ".join(_esc(k) for k in keys) + " |")
            lines.append("|---|---|" + "---:|" * len(keys))
            for a in arms:
                cells = [_v(prefix + k, a.slices[k]) if k in a.slices else "-" for k in keys]
                lines.append(f"| {_esc(a.label)} | {_record_seed(a)} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def seed_stats_json(df: pd.DataFrame, objective: Objective) -> dict[str, Any]:
    """The same as data (for ``report.json``): objective, per group the arms and the ordering statements."""
    groups = seed_stats(df, objective)
    return {"objective": [objective.metric, objective.mode],
            "groups": {g: {"arms": [{**asdict(a), "n": a.n} for a in arms],
                           "ordering": ordering(arms, objective)} for g, arms in groups.items()}}
