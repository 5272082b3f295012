"""Fronts per task: which params split a sweep's trials into groups that are ranked apart.

Accuracy on parity and accuracy on modular arithmetic do not compare, so a sweep that searches its task
(``task.name: {choice: [parity, mod_arith]}``) has one Pareto front per task. By default the groups are the
values of every searched ``task.*`` key (the child runs' ``params.task.*`` that take more than one value);
``hqlt report --group-by KEY[,KEY]`` names other params, ``--group-by none`` ranks all trials together.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from hqlt.search_space.labels import is_task_key, task_label
from hqlt.search_space.vocabulary import ALL_GROUP, COMPLETED

from .mlflow_io import ReportError

__all__ = ["GROUP_COLUMN", "NO_GROUPING", "group_keys", "group_labels"]

GROUP_COLUMN = "group"
NO_GROUPING = "none"
_PARAM = "params."


def _varying(trials: pd.DataFrame, col: str) -> bool:
    done = trials[trials["status"] == COMPLETED] if "status" in trials.columns else trials
    return done[col].dropna().astype(str).nunique() > 1


def group_keys(trials: pd.DataFrame, group_by: str | Sequence[str] | None = None) -> list[str]:
    """The param names (without ``params.``) whose values split the trials into groups; ``[]`` = one group.

    ``group_by``: None = the searched ``task.*`` params that vary (an arm's id ``task`` only when its leaves
    are not logged); ``"none"`` = no grouping; else a comma-separated string or a list of param names."""
    if group_by is None:
        cols = [c for c in trials.columns if c.startswith(_PARAM) and is_task_key(c[len(_PARAM):])]
        keys = [c[len(_PARAM):] for c in cols if _varying(trials, c)]
        return [k for k in keys if "." in k] or keys
    names = [s.strip() for s in (group_by.split(",") if isinstance(group_by, str) else group_by) if s.strip()]
    if names == [NO_GROUPING]:
        return []
    keys = [n[len(_PARAM):] if n.startswith(_PARAM) else n for n in names]
    known = sorted(c[len(_PARAM):] for c in trials.columns if c.startswith(_PARAM))
    for k in keys:
        if _PARAM + k not in trials.columns:
            raise ReportError(f"--group-by: no trial has a param {k!r}; params: {', '.join(known) or 'none'}")
    return keys


def group_labels(trials: pd.DataFrame, keys: Sequence[str]) -> pd.Series:
    """One label per trial: its values of ``keys`` ('parity', 'mod_arith', 'd_model=128'); ``all`` without keys."""
    if not keys:
        return pd.Series([ALL_GROUP] * len(trials), index=trials.index, dtype=object)

    def label(row: pd.Series) -> str:
        values = {k: row.get(_PARAM + k) for k in keys if pd.notna(row.get(_PARAM + k))}
        return task_label(values, [k for k in keys if k in values]) or "-"

    return trials.apply(label, axis=1).astype(object) if len(trials) else pd.Series([], dtype=object)
