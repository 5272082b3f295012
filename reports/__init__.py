"""hqlt.reports — Pareto ranks, hypervolume, plots and tables of a sweep, read from and logged to MLflow.

Public API (matplotlib / plotly / mlflow are imported only when a function needs them):

* :func:`non_dominated_sort`, :func:`pareto_front`, :func:`dominates`        — :mod:`.pareto`
* :func:`hypervolume`, :func:`default_reference`, :func:`hypervolume_growth`  — :mod:`.hypervolume`
* :func:`parse_objectives`                                                   — :mod:`.objectives`
* :class:`Objective` (metric + mode, the sweep spec's type)                   — :mod:`hqlt.search_space`
* :func:`load_sweep` (MLflow layout contract in :mod:`.mlflow_io`)
* :func:`write_report` → :class:`ReportResult`                               — :mod:`.report`
* plots in :mod:`.plots`, tables in :mod:`.tables` (the ``hqlt report`` command is :mod:`hqlt.cli.report`)

This package never imports torch or ray.
"""

from hqlt.search_space import Objective

from .hypervolume import default_reference, hypervolume, hypervolume_growth
from .mlflow_io import NoCompletedTrials, ReportError, load_sweep
from .objectives import ObjectiveSpecError, parse_objectives
from .pareto import dominates, non_dominated_sort, pareto_front
from .report import ReportResult, rank_trials, write_report

__all__ = [
    "Objective",
    "ObjectiveSpecError",
    "parse_objectives",
    "dominates",
    "non_dominated_sort",
    "pareto_front",
    "hypervolume",
    "default_reference",
    "hypervolume_growth",
    "load_sweep",
    "ReportError",
    "NoCompletedTrials",
    "ReportResult",
    "rank_trials",
    "write_report",
]
