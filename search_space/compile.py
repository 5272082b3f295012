"""Compile a spec into Optuna's define-by-run form, plus the pieces a sweep needs around it.

    spec = load_spec("space.yaml", overrides, hooks=HOOKS)
    space_fn = compile_space(spec, HOOKS)            # picklable; OptunaSearch(space_fn, metric=[..], mode=[..], ...)
    sampler = make_sampler(spec.sweep, spec.params)
    ...
    trial_cfg = materialize(spec, ray_config)        # inside the trainable: plain, resolved trial config

`SpaceFunction` holds only plain data (base dict, `Param`s, budgets) and references to module-level hook
functions, so it pickles with the searcher (Ray saves it on checkpoint and restore). Parameter names are the
dotted key paths; Ray unflattens names only on '/', so they stay flat keys of the trial's config.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping, Optional

from hqlt.blocks.validation import ConfigError

from .errors import fmt_number
from .hooks import Hooks, as_hooks
from .spec import BUDGET_METRIC, Param, SweepSettings, SweepSpec, topological
from .tree import materialize_base

INFEASIBLE_KEY = "hqlt.infeasible"  # in the define-by-run's returned dict (and so in Ray's trial config)
CONSTRAINT_CONFIG = "hqlt.config"  # Optuna constraint: 1 = the sampled config is not a valid trial config


def materialize(spec_or_base: SweepSpec | Mapping, sampled: Mapping[str, Any]) -> dict:
    """The plain, resolved trial config: base with the flat {dotted path: value} `sampled` set in it, then
    `${...}` interpolations resolved (so derived values follow sampled ones).

    With a `SweepSpec`, `sampled` may be a whole Ray trial config: keys that are not space parameters are
    ignored and json-labelled choices (lists/mappings) are decoded. With a plain base mapping, every key is set
    except ``hqlt.*`` bookkeeping keys. Raises `ConfigError` (dotted path) when a value cannot be resolved."""
    if isinstance(spec_or_base, SweepSpec):
        return materialize_base(spec_or_base.base, spec_or_base.decode(dict(sampled)))
    return materialize_base(spec_or_base, {k: v for k, v in sampled.items() if not str(k).startswith("hqlt.")})


class SpaceFunction:
    """Optuna define-by-run callable: suggests the space's parameters, then marks infeasible configs.

    `__call__(trial)` suggests in topological order of the `when:` dependencies (inactive conditional
    parameters are not suggested at all), materialises the trial config, runs the injected estimator (or
    config check), and returns ``{}`` when the config is valid and within budget, else
    ``{"hqlt.infeasible": "<reason>"}`` (e.g. ``model/params 2.1e+06 > max_params 1e+06``). With
    `set_constraints` it also records Optuna constraints (``trial.set_constraint``: budget keys as relative
    excess value/limit - 1, ``hqlt.config`` 0/1) so TPE and NSGA-II steer away from infeasible regions.
    """

    def __init__(self, base: dict, params: Iterable[Param], budgets: Iterable[tuple[str, float]] = (),
                 hooks: Optional[Hooks] = None, set_constraints: bool = True):
        self.base = base
        self.params = topological(params)
        self.budgets = [(str(k), float(v)) for k, v in budgets]
        self.hooks = as_hooks(hooks)
        self.set_constraints = set_constraints

    def __repr__(self) -> str:
        return f"SpaceFunction({', '.join(p.path for p in self.params)})"

    def suggest(self, trial) -> dict:
        """{dotted path: value} of the active parameters (choice values decoded)."""
        sampled: dict = {}
        for p in self.params:
            if p.is_active(sampled):
                sampled[p.path] = p.suggest(trial)
        return sampled

    def check(self, sampled: dict) -> tuple[list[str], dict]:
        """(reasons the config is infeasible, Optuna constraint values) of a sampled assignment."""
        reasons: list[str] = []
        constraints: dict = {}
        if not self.hooks.can_check:
            return reasons, constraints
        try:
            metrics = self.hooks.validate(materialize_base(self.base, sampled)) or {}
            constraints[CONSTRAINT_CONFIG] = 0.0
        except ConfigError as exc:
            constraints[CONSTRAINT_CONFIG] = 1.0
            return [f"invalid config: {exc}"], constraints
        for key, limit in self.budgets:
            metric = BUDGET_METRIC[key]
            value = metrics.get(metric)
            if value is None:
                continue
            constraints[key] = float(value) / limit - 1.0
            if value > limit:
                reasons.append(f"{metric} {fmt_number(value)} > {key} {fmt_number(limit)}")
        return reasons, constraints

    def __call__(self, trial) -> dict:
        sampled = self.suggest(trial)
        reasons, constraints = self.check(sampled)
        if self.set_constraints and constraints:
            setter = getattr(trial, "set_constraint", None)  # Optuna >= 5; Ray's captor forwards it
            if setter is not None:
                for key, value in constraints.items():
                    setter(key, value)
        return {INFEASIBLE_KEY: "; ".join(reasons)} if reasons else {}


def compile_space(spec: SweepSpec, hooks: Optional[Hooks] = None, set_constraints: bool = True) -> SpaceFunction:
    """The define-by-run callable of a spec (budgets enforced when `hooks` has an estimator)."""
    return SpaceFunction(spec.base, spec.params, spec.sweep.budgets.items(), hooks, set_constraints)


def nsga2_population(num_samples: int) -> int:
    """NSGA-II population: about a quarter of the budget, so a sweep runs >= 4 generations (the first one is
    random; selection + crossover need later ones to matter), at least 4 (2 parents for crossover plus room
    for selection), at most 50 (Optuna's default; larger populations only slow convergence per trial)."""
    return min(50, max(4, num_samples // 4))


def grid_space(params: Iterable[Param]) -> dict:
    """GridSampler's search space: every parameter's finite grid (choices as Optuna sees them)."""
    out = {}
    for p in params:
        if p.kind == "choice":
            out[p.path] = p.optuna_choices()
        else:
            values = p.grid(continuous_endpoints=False)
            if values is None:
                raise ValueError(f"grid sampler: {p.path} is a continuous float (give it a step)")
            out[p.path] = values
    return out


def make_sampler(settings: SweepSettings, params: Iterable[Param], cost=None):
    """The Optuna sampler of `sweep.sampler`, seeded with `sweep.sampler_seed`.

    - tpe: ``TPESampler(multivariate=True, group=True)`` — joint model per group of co-occurring parameters,
      right for conditional (tree-structured) spaces; multi-objective works too (MOTPE);
    - nsga2: ``NSGAIISampler(population_size=nsga2_population(num_samples))``;
    - random: ``RandomSampler``; grid: a ``GridSampler`` over choices, int step grids and stepped floats
      (conditional parameters are in the grid; where inactive their grid value is simply not used), its points
      started in `sweep.order` (`grid.OrderedGridSampler`): longest_first ranks them by `cost` (the active
      sampled assignment -> predicted cost, handed in by the sweep driver; without it they keep the spec's
      order), as_listed keeps the spec's order, shuffled is Optuna's own seeded shuffle.
    Ray builds a plain ``TPESampler(seed=...)`` when given none, so always pass this one to OptunaSearch."""
    import optuna

    params = list(params)
    seed = settings.sampler_seed
    if settings.sampler == "tpe":
        with warnings.catch_warnings():  # `group` is flagged experimental; it is what conditional spaces need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed)
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=nsga2_population(settings.num_samples), seed=seed)
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if settings.sampler == "grid":
        from .grid import grid_sampler

        return grid_sampler(grid_space(params), params, settings.grid_order, seed=seed, cost=cost)
    raise ValueError(f"unknown sampler {settings.sampler!r}")


def study_name(spec: SweepSpec) -> str:
    """The Optuna study name: sweep name namespaced by the spec hash (Ray loads studies with load_if_exists)."""
    return f"{spec.name}-{spec.hash}"


def directions(settings: SweepSettings) -> list[str]:
    return ["maximize" if o.mode == "max" else "minimize" for o in settings.objectives]


__all__ = ["CONSTRAINT_CONFIG", "INFEASIBLE_KEY", "SpaceFunction", "compile_space", "directions", "grid_space",
           "make_sampler", "materialize", "nsga2_population", "study_name"]
