"""Tables of the Pareto front for the terminal, Markdown and CSV, plus trial counts by status.

All functions take the trials DataFrame of :func:`hqlt.reports.mlflow_io.load_sweep` with an added
``pareto_rank`` column (nullable int; missing = excluded from the ranking) as produced by
:func:`hqlt.reports.report.rank_trials`.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import pandas as pd

from hqlt.search_space.labels import decode_arm
from hqlt.search_space.vocabulary import ALL_GROUP, BOOKKEEPING_PREFIX, COMPLETED, TRIAL_STATUSES

from .objectives import Objective, is_accuracy_like

__all__ = [
    "status_counts",
    "status_summary",
    "select_key_params",
    "front_rows",
    "format_value",
    "format_table",
    "front_table",
    "front_markdown",
    "front_csv",
]

# params that are bookkeeping rather than architecture/training choices
_IGNORED_PARAM_LEAVES = {"seed", "trial_id", "config_hash", "name", "run_name", "output_dir", "out_dir"}


def status_counts(trials: pd.DataFrame) -> dict[str, int]:
    """Counts of trials per status, known statuses first (zeros omitted)."""
    if len(trials) == 0:
        return {}
    vc = trials["status"].fillna("unknown").astype(str).value_counts()
    counts = {s: int(vc[s]) for s in TRIAL_STATUSES if s in vc.index}
    for s in sorted(set(vc.index) - set(TRIAL_STATUSES)):
        counts[s] = int(vc[s])
    return counts


def status_summary(trials: pd.DataFrame) -> str:
    """One line: ``12 trials: 8 completed (8 ranked, front 5), 1 failed, 1 pruned, ...``."""
    counts = status_counts(trials)
    n = len(trials)
    ranks = trials["pareto_rank"] if "pareto_rank" in trials.columns else pd.Series(dtype="Int64")
    n_ranked = int(ranks.notna().sum())
    front = int((ranks == 0).sum()) if n_ranked else 0
    parts = []
    for status, c in counts.items():
        if status == COMPLETED:
            parts.append(f"{c} completed ({n_ranked} ranked, front {front})")
        else:
            parts.append(f"{c} {status}")
    excluded = n - n_ranked
    tail = f"; {excluded} excluded from the ranking" if excluded else ""
    return f"{n} trial{'s' if n != 1 else ''}: " + (", ".join(parts) if parts else "none") + tail


def _short_names(cols: Sequence[str]) -> dict[str, str]:
    """``params.model.mixer.kv.window`` → ``kv.window`` (longer when two would collide)."""
    keys = [c[len("params.") :] if c.startswith("params.") else c for c in cols]
    out: dict[str, str] = {}
    for depth in range(2, 64):
        short = {c: ".".join(k.split(".")[-depth:]) for c, k in zip(cols, keys)}
        if len(set(short.values())) == len(short):
            out = short
            break
    else:  # pragma: no cover - identical keys cannot happen
        out = dict(zip(cols, keys))
    return out


def select_key_params(trials: pd.DataFrame, max_params: int | None = 6) -> list[str]:
    """``params.*`` columns whose value differs between the given trials (model params first).

    Bookkeeping params (seed, names, paths) are skipped. ``max_params=None`` keeps all.
    """
    cols = []
    for c in trials.columns:
        if not c.startswith("params."):
            continue
        if c.rsplit(".", 1)[-1] in _IGNORED_PARAM_LEAVES or c.startswith("params." + BOOKKEEPING_PREFIX):
            continue  # hqlt.* params are sweep bookkeeping (Optuna trial number, infeasibility)
        values = trials[c].dropna().astype(str)
        if values.nunique() > 1 and not any(decode_arm(v) is not None for v in values):
            cols.append(c)  # a whole arm's JSON text (older sweeps) is left to the arch column
    cols.sort(key=lambda c: (not c.startswith("params.model."), c))
    return cols if max_params is None else cols[:max_params]


def front_rows(trials: pd.DataFrame, objectives: Sequence[Objective], max_rank: int = 0) -> pd.DataFrame:
    """Rows with ``pareto_rank <= max_rank``, by rank then by the first objective (best first)."""
    if "pareto_rank" not in trials.columns or len(trials) == 0:
        return trials.iloc[0:0]
    sel = trials[trials["pareto_rank"].notna() & (trials["pareto_rank"] <= max_rank)].copy()
    if len(sel) == 0:
        return sel
    first = objectives[0]
    sel["_key"] = sel[f"metrics.{first.metric}"] * (-1.0 if first.mode == "max" else 1.0)
    order = (["group"] if "group" in sel.columns else []) + ["pareto_rank", "_key", "arch"]
    sel = sel.sort_values(order, kind="stable").drop(columns="_key")
    return sel


def grouped(trials: pd.DataFrame) -> bool:
    """True when the trials were ranked in several groups (fronts per task)."""
    return "group" in trials.columns and bool((trials["group"].dropna() != ALL_GROUP).any())


def format_value(value: object, metric: str | None = None) -> str:
    """Compact number formatting for tables: accuracies to 4 decimals, 1.23M / 45.6k style for big values."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "-"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if metric is not None and is_accuracy_like(metric):
        return f"{v:.4f}"
    a = abs(v)
    if a >= 1e12:
        return f"{v / 1e12:.3g}T"
    if a >= 1e9:
        return f"{v / 1e9:.3g}G"
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if float(v).is_integer():
        return f"{int(v)}"
    return f"{v:.4g}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool] | None = None) -> str:
    """Plain-text table: columns padded to width, numeric columns right-aligned, a dashed rule."""
    numeric = list(numeric) if numeric is not None else [False] * len(headers)
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]

    def fmt(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)]
        return "  ".join(out).rstrip()

    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    lines.extend(fmt(r) for r in rows)
    return "\n".join(lines)


def _table_cells(
    trials: pd.DataFrame,
    objectives: Sequence[Objective],
    max_rank: int,
    key_params: Sequence[str] | None,
    max_params: int | None,
) -> tuple[list[str], list[list[str]], list[bool]]:
    rows_df = front_rows(trials, objectives, max_rank)
    completed = trials[trials["status"] == COMPLETED] if "status" in trials.columns else trials
    params = list(key_params) if key_params is not None else select_key_params(completed, max_params)
    has_group = grouped(trials)
    if has_group:  # the group's own keys are the task column
        shown = {str(v) for v in rows_df["group"].dropna()}
        params = [p for p in params if not set(rows_df[p].dropna().astype(str)) <= shown]
    short = _short_names(params)
    has_baseline = "baseline" in rows_df.columns and (rows_df["baseline"].fillna("") != "").any()
    headers = ["rank", "arch"] + (["task"] if has_group else [])
    numeric = [True, False] + ([False] if has_group else [])
    if has_baseline:
        headers.append("baseline")
        numeric.append(False)
    headers += ["trial"]
    numeric += [False]
    for o in objectives:
        headers.append(f"{o.metric} {'↑' if o.mode == 'max' else '↓'}")
        numeric.append(True)
    for p in params:
        headers.append(short[p])
        numeric.append(False)
    headers.append("status")
    numeric.append(False)
    rows: list[list[str]] = []
    for _, r in rows_df.iterrows():
        cells = [str(int(r["pareto_rank"])), str(r.get("arch", "") or "-")]
        if has_group:
            cells.append(str(r.get("group", "") or "-"))
        if has_baseline:
            cells.append(str(r.get("baseline", "") or ""))
        cells.append(str(r.get("trial_id", "") or r.get("run_id", "")[:8]))
        for o in objectives:
            cells.append(format_value(r.get(f"metrics.{o.metric}"), o.metric))
        for p in params:
            cells.append(format_value(r.get(p)))
        cells.append(str(r.get("status", "")))
        rows.append(cells)
    return headers, rows, numeric


def front_table(
    trials: pd.DataFrame,
    objectives: Sequence[Objective],
    *,
    max_rank: int = 0,
    key_params: Sequence[str] | None = None,
    max_params: int | None = 6,
    title: str | None = None,
    width: int = 100,
) -> str:
    """Terminal table of the front (ranks ``0..max_rank``) followed by the status summary line.

    Columns: rank, arch, [task], [baseline], trial, one per objective (↑ max / ↓ min), the key params (params
    that vary between completed trials, at most ``max_params``, fewer when the table would be wider than
    ``width`` characters), status.
    """
    headers, rows, numeric = _table_cells(trials, objectives, max_rank, key_params, max_params)
    shown = len(headers) - 2 - max(i for i, h in enumerate(headers) if h.endswith(("↑", "↓")))  # key params
    while key_params is None and shown > 0 and _width(headers, rows) > width:
        shown -= 1  # drop the last key param until the table fits `width`
        headers, rows, numeric = _table_cells(trials, objectives, max_rank, key_params, shown)
    parts = []
    if title:
        parts.append(title)
    if rows:
        parts.append(format_table(headers, rows, numeric))
    else:
        parts.append("(no ranked trials)")
    parts.append(status_summary(trials))
    return "\n".join(parts)


def _width(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> int:
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]
    return sum(widths) + 2 * (len(widths) - 1)


def front_markdown(
    trials: pd.DataFrame,
    objectives: Sequence[Objective],
    *,
    max_rank: int = 0,
    max_params: int | None = 12,
    title: str | None = None,
    summary: bool = True,
) -> str:
    """The front as a Markdown table (for ``front.md``), with the status summary below it."""
    headers, rows, _ = _table_cells(trials, objectives, max_rank, None, max_params)

    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = []
    if title:
        lines += [f"# {title}", ""]
    lines.append("| " + " | ".join(esc(h) for h in headers) + " |")
    lines.append("|" + "|".join("---:" if i == 0 else "---" for i in range(len(headers))) + "|")
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    if summary:
        lines += ["", status_summary(trials), ""]
    return "\n".join(lines)


def front_csv(trials: pd.DataFrame, objectives: Sequence[Objective], *, max_rank: int = 0) -> str:
    """The front as CSV with raw (unformatted) values: ids, objectives, every varying param, tags."""
    rows_df = front_rows(trials, objectives, max_rank)
    completed = trials[trials["status"] == COMPLETED] if "status" in trials.columns else trials
    params = select_key_params(completed, None)
    cols = ["pareto_rank", *(["group"] if grouped(trials) else []), "arch", "baseline", "trial_id", "run_id", "seed",
            "config_hash"]
    cols += [f"metrics.{o.metric}" for o in objectives] + params + ["status"]
    out = rows_df.reindex(columns=cols)
    out = out.rename(columns={f"metrics.{o.metric}": o.metric for o in objectives})
    out = out.rename(columns={p: p[len("params.") :] for p in params})
    buf = io.StringIO()
    out.to_csv(buf, index=False)
    return buf.getvalue()
