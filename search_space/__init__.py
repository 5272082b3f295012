"""hqlt.search_space — YAML sweep specs: schema, validation, compilation to Optuna define-by-run.

    from hqlt.search_space import load_spec, compile_space, make_sampler, materialize, describe
    from hqlt.orchestration.space_hooks import HOOKS           # the torch-side checks, injected

    spec = load_spec("space.yaml", ["sweep.num_samples=4"], hooks=HOOKS)   # raises SpecError (one line)
    space_fn = compile_space(spec, HOOKS)                       # picklable define-by-run callable
    sampler = make_sampler(spec.sweep, spec.params)
    cfg = materialize(spec, ray_trial_config)                   # plain, resolved trial config

Modules, each depending only on those listed before it: `vocabulary` (metric names, statuses, tags, folder
names), `errors`, `hooks`, `tree` (dotted paths, materialize), `yamlio` (the YAML + override reader, safety
checks), `spec` (the dataclasses), `candidates` (enumeration, survey, space_size, describe), `checks`
(`validate`: the hook-driven checks), `parse` (`load_spec`), `grid` (the order of a grid's points; it imports
optuna, so `compile.make_sampler` imports it only for a grid), `compile` (Optuna define-by-run, samplers).

This package imports neither torch nor ray.
"""
from .errors import SpecError
from .hooks import Hooks
from .spec import AshaSettings, Budgets, Objective, Param, Resources, SweepSettings, SweepSpec, spec_hash
from .parse import load_spec
from .candidates import describe, space_size, survey
from .checks import validate
from .compile import (INFEASIBLE_KEY, SpaceFunction, compile_space, directions, make_sampler, materialize,
                      nsga2_population, study_name)

__all__ = ["AshaSettings", "Budgets", "Hooks", "INFEASIBLE_KEY", "Objective", "Param", "Resources", "SpaceFunction",
           "SpecError", "SweepSettings", "SweepSpec", "compile_space", "describe", "directions", "load_spec",
           "make_sampler", "materialize", "nsga2_population", "space_size", "spec_hash", "study_name", "survey",
           "validate"]
