"""hqlt.search_space — YAML sweep specs: schema, validation, compilation to Optuna define-by-run.

    from hqlt.search_space import load_spec, compile_space, make_sampler, materialize, describe
    from hqlt.orchestration.space_hooks import HOOKS           # the torch-side checks, injected

    spec = load_spec("space.yaml", ["sweep.num_samples=4"], hooks=HOOKS)   # raises SpecError (one line)
    space_fn = compile_space(spec, HOOKS)                       # picklable define-by-run callable
    sampler = make_sampler(spec.sweep, spec.params)
    cfg = materialize(spec, ray_trial_config)                   # plain, resolved trial config

This package imports neither torch nor ray.
"""
from .errors import SpecError
from .hooks import Hooks
from .spec import (AshaSettings, Budgets, Objective, Param, Resources, SweepSettings, SweepSpec, load_spec,
                   spec_hash)
from .validate import describe, space_size, survey, validate
from .compile import (INFEASIBLE_KEY, SpaceFunction, compile_space, directions, make_sampler, materialize,
                      nsga2_population, study_name)

__all__ = ["AshaSettings", "Budgets", "Hooks", "INFEASIBLE_KEY", "Objective", "Param", "Resources", "SpaceFunction",
           "SpecError", "SweepSettings", "SweepSpec", "compile_space", "describe", "directions", "load_spec",
           "make_sampler", "materialize", "nsga2_population", "space_size", "spec_hash", "study_name", "survey",
           "validate"]
