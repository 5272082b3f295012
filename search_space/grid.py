"""The order a grid sweep starts its points in (`sweep.order`), and the grid sampler that keeps it.

Optuna's `GridSampler` shuffles its grid (seeded) and hands trial number k the k-th point. On a GPU sweep the
order matters: the longest trials started last leave GPUs idle while they finish alone. `OrderedGridSampler`
takes the grid's points in a given order instead:

- ``longest_first`` (the default with ``sampler: grid``): by descending predicted cost — a function of the
  sampled assignment handed in by the caller (the sweep driver: training FLOPs per step × steps,
  orchestration/startup.py `predicted_flops`); ties keep the spec's order;
- ``as_listed``: the spec's order: parameters in declaration order (conditions first where they control others),
  the first one varying slowest, each over its values as listed (ints and stepped floats ascending);
- ``shuffled``: Optuna's own GridSampler (seeded with `sweep.sampler_seed`), the order hqlt used before the key.

Each trial gets the first point in that order that no trial holds: none finished, none running. A trial
closed as an orphan of a hard kill (Optuna FAIL with `hqlt.orphaned`, orchestration/sweep.py) never trained, so
its point is free again; every other finished trial — completed, pruned, failed — keeps its point. A resumed or
extended sweep therefore goes on with the points it has not run, in the same order, and runs none twice.

The sampler holds plain data only (the ordered grid), so it pickles with Ray's searcher state. Only grids have an
order free to choose: TPE, NSGA-II and random sampling pick each trial from the results so far.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable, Optional, Sequence

import optuna
from optuna.samplers import GridSampler
from optuna.trial import TrialState

from .spec import Param, label, topological
from .vocabulary import OPTUNA_ORPHANED_ATTR

Cost = Callable[[dict], float]  # active sampled assignment {dotted path: decoded value} -> predicted cost


def grid_points(params: Iterable[Param]) -> list[dict]:
    """Every point of the grid as Optuna sees it ({path: value}, json labels for list/mapping choices), in the
    spec's order: the first parameter varies slowest."""
    params = list(params)
    values = []
    for p in params:
        grid = p.optuna_choices() if p.kind == "choice" else p.grid(continuous_endpoints=False)
        if grid is None:
            raise ValueError(f"grid sampler: {p.path} is a continuous float (give it a step)")
        values.append(grid)
    return [dict(zip((p.path for p in params), combo)) for combo in itertools.product(*values)]


def active_assignment(params: Iterable[Param], point: dict) -> dict:
    """The assignment a trial of grid point `point` samples: the active parameters only (conditions checked in
    topological order, as the define-by-run function does), values decoded."""
    out: dict = {}
    for p in topological(params):
        if p.is_active(out):
            out[p.path] = p.decode(point[p.path])
    return out


def order_points(params: Iterable[Param], order: str, cost: Optional[Cost] = None) -> tuple[list[dict], list]:
    """(the grid's points in `order`, their predicted costs in that order — None where not computed).
    longest_first without a cost function keeps the spec's order. A point whose cost cannot be computed
    counts as 0 (it fails, or is infeasible, in a moment)."""
    params = list(params)
    points = grid_points(params)
    if order != "longest_first" or cost is None:
        return points, [None] * len(points)
    memo: dict = {}
    costs = []
    for point in points:
        sampled = active_assignment(params, point)
        key = label(sampled)  # points differing only in inactive parameters: one config, one cost
        if key not in memo:
            try:
                memo[key] = float(cost(sampled))
            except Exception:  # noqa: BLE001
                memo[key] = 0.0
        costs.append(memo[key])
    ranked = sorted(range(len(points)), key=lambda i: -costs[i])  # stable: ties keep the spec's order
    return [points[i] for i in ranked], [costs[i] for i in ranked]


class OrderedGridSampler(GridSampler):
    """A `GridSampler` whose points start in a fixed order (see module doc), not shuffled.

    `points`: every grid point ({param: Optuna value}), in the order to run them."""

    def __init__(self, search_space: dict, points: Sequence[dict], seed: Optional[int] = None):
        super().__init__(search_space, seed=seed)
        ordered = [tuple(point[name] for name in self._param_names) for point in points]
        if sorted(map(repr, ordered)) != sorted(map(repr, self._all_grids)):
            raise ValueError("OrderedGridSampler: the ordered points are not the grid's points")
        self._all_grids = ordered

    def _get_unvisited_grid_ids(self, study) -> list[int]:
        """Grid ids, in order, that no trial holds (finished, except orphans; or running); when every point has
        been started, those not finished (what GridSampler does too)."""
        finished, running = set(), set()
        for t in study._storage.get_all_trials(study._study_id, deepcopy=False):
            attrs = t.system_attrs
            if "grid_id" not in attrs or not self._same_search_space(attrs["search_space"]):
                continue
            if t.state.is_finished():
                if not (t.state == TrialState.FAIL and t.user_attrs.get(OPTUNA_ORPHANED_ATTR)):
                    finished.add(attrs["grid_id"])
            elif t.state == TrialState.RUNNING:
                running.add(attrs["grid_id"])
        free = [i for i in range(self._n_min_trials) if i not in finished and i not in running]
        return free or [i for i in range(self._n_min_trials) if i not in finished]

    def before_trial(self, study, trial) -> None:
        if "grid_id" in trial.system_attrs or "fixed_params" in trial.system_attrs:
            return  # a trial that has its point already (a restored one), or an enqueued one
        target = self._get_unvisited_grid_ids(study)
        if target:
            grid_id = target[0]
        else:  # the grid is exhausted (more samples than points): a visited point again, as GridSampler does
            optuna.logging.get_logger(__name__).warning("the grid is exhausted: re-evaluating a point")
            grid_id = int(self._rng.rng.choice(len(self._all_grids)))
        study._storage.set_trial_system_attr(trial._trial_id, "search_space", self._search_space)
        study._storage.set_trial_system_attr(trial._trial_id, "grid_id", grid_id)

    def point(self, grid_id: int) -> dict:
        """{param: Optuna value} of a grid id."""
        return dict(zip(self._param_names, self._all_grids[grid_id]))


def grid_sampler(space: dict, params: Iterable[Param], order: str, seed: int = 0, cost: Optional[Cost] = None):
    """The grid sampler of `sweep.order` (module doc) over `space` (`compile.grid_space(params)`); `cost` orders
    longest_first (without it: as listed)."""
    params = list(params)
    if order == "shuffled":
        return GridSampler(space, seed=seed)
    points, _ = order_points(params, order, cost)
    return OrderedGridSampler(space, points, seed=seed)


__all__ = ["Cost", "OrderedGridSampler", "active_assignment", "grid_points", "grid_sampler", "order_points"]
