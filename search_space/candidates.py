"""Candidates of a space: enumeration and sampling of its points, the candidate `Survey` through the hooks,
`space_size`, and `describe` for `hqlt validate`.

Candidates: the finite space (ints on their step grid, floats at their endpoints) is enumerated when it has at
most `limit` (5000) combinations, else its corners (numeric parameters at their bounds) plus seeded random
samples are checked. Nothing is written anywhere.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Iterator, Optional

from hqlt.blocks.validation import ConfigError

from .errors import one_line
from .hooks import Hooks, as_hooks
from .spec import Param, SweepSpec, label, matches
from .tree import apply, resolve_config
from .vocabulary import FW_STATE_BYTES, KV_CACHE_BYTES, PARAMS

ENUMERATE_LIMIT = 5000


# ---- enumeration / sampling of the space --------------------------------------------------------------
def _condition_values(params: list[Param]) -> dict[str, list]:
    """Values each parameter is named with in other parameters' `when:` (controller path -> values)."""
    out: dict[str, list] = {}
    for p in params:
        for key, values in p.when.items():
            out.setdefault(key, [])
            out[key] += [v for v in values if not matches(v, out[key])]
    return out


def survey_grid(p: Param, named: list = ()) -> list:
    """Values a candidate survey uses: choices, ints on their step grid, floats at their endpoints (plus the
    values that conditions name, so conditional branches under a stepped float are surveyed too)."""
    if p.kind == "choice":
        return list(p.choices)
    if p.kind == "int":
        return p.grid()
    return [p.low] + [float(v) for v in named if not matches(v, [p.low, p.high])] + [p.high]


def corner_grid(p: Param, named: list = ()) -> list:
    if p.kind == "choice":
        return list(p.choices)
    return [p.low] + [v for v in named if not matches(v, [p.low, p.high])] + [p.high]


def enumerate_tree(params: list[Param], grids: dict[str, list]) -> Iterator[dict]:
    """Every assignment of the active parameters (conditional ones only where their condition holds)."""
    n = len(params)
    cur: dict = {}

    def rec(i: int):
        if i == n:
            yield dict(cur)
            return
        p = params[i]
        if not p.is_active(cur):
            yield from rec(i + 1)
            return
        for v in grids[p.path]:
            cur[p.path] = v
            yield from rec(i + 1)
        del cur[p.path]

    yield from rec(0)


def count_tree(params: list[Param], sizes: dict[str, Optional[int]], cap: int = 200_000,
               grids: Optional[dict[str, list]] = None) -> Optional[int]:
    """Number of distinct active assignments (None = infinite), given each parameter's number of values.

    The parameters that control others are enumerated (over `grids`, default their full grids; at most `cap`
    assignments, else the unconditional product is returned — an upper bound) and the sizes of the active
    other parameters multiplied in."""
    controllers = {k for p in params for k in p.when}
    ctrl = [p for p in params if p.path in controllers]
    leaves = [p for p in params if p.path not in controllers]
    ctrl_sizes = [sizes[p.path] for p in ctrl]
    if any(s is None for s in ctrl_sizes) or math.prod(s or 1 for s in ctrl_sizes) > cap:
        if any(sizes[p.path] is None for p in params):
            return None
        return math.prod(sizes[p.path] for p in params)
    total = 0
    grids = {p.path: (grids or {}).get(p.path) or p.grid() for p in ctrl}
    for assign in enumerate_tree(ctrl, grids):
        prod = 1
        for p in leaves:
            if p.is_active(assign):
                if sizes[p.path] is None:
                    return None
                prod *= sizes[p.path]
        total += prod
    return total


def random_candidate(params: list[Param], rng: random.Random) -> dict:
    cur: dict = {}
    for p in params:
        if not p.is_active(cur):
            continue
        if p.kind == "choice":
            cur[p.path] = p.choices[rng.randrange(len(p.choices))]
        elif p.kind == "int" or p.step is not None:
            cur[p.path] = p.value_at(rng.randrange(p.size()))
        elif p.log:
            cur[p.path] = math.exp(rng.uniform(math.log(p.low), math.log(p.high)))
        else:
            cur[p.path] = rng.uniform(p.low, p.high)
    return cur


def candidates(params: list[Param], limit: int = ENUMERATE_LIMIT, seed: int = 0) -> tuple[list[dict], bool]:
    """(candidate assignments, enumerated exhaustively?)."""
    named = _condition_values(params)
    sizes = {p.path: len(p.choices) if p.kind == "choice" else p.size() if p.kind == "int"
             else len(survey_grid(p, named.get(p.path, ()))) for p in params}
    small_grids = {p.path: survey_grid(p, named.get(p.path, ())) for p in params if p.kind == "float"}
    n = count_tree(params, sizes, grids=small_grids)
    if n is not None and n <= limit:  # then every grid is small too: each parameter is active somewhere
        return list(enumerate_tree(params, {p.path: survey_grid(p, named.get(p.path, ())) for p in params})), True
    rng = random.Random(seed)
    out: dict[str, dict] = {}
    corners = {p.path: corner_grid(p, named.get(p.path, ())) for p in params}
    n_corner = count_tree(params, {p: len(g) for p, g in corners.items()}, grids=corners)
    if n_corner is not None and n_corner <= limit // 2:
        for c in enumerate_tree(params, corners):
            out[label(c)] = c
    else:
        for _ in range(limit // 2):
            c = _random_corner(params, corners, rng)
            out[label(c)] = c
    for _ in range(limit // 5):
        c = random_candidate(params, rng)
        out[label(c)] = c
    return list(out.values()), False


def _random_corner(params: list[Param], corners: dict[str, list], rng: random.Random) -> dict:
    cur: dict = {}
    for p in params:
        if p.is_active(cur):
            g = corners[p.path]
            cur[p.path] = g[rng.randrange(len(g))]
    return cur


# =====================================================================================================
# the survey: candidates checked through the torch-side hooks
# =====================================================================================================
@dataclass
class Survey:
    """What checking the candidates found (also the numbers `describe` prints)."""

    checked: int = 0
    valid: int = 0
    enumerated: bool = False
    minimum: dict = field(default_factory=dict)  # metric -> (value, candidate)
    maximum: dict = field(default_factory=dict)  # metric -> (value, candidate)
    seen: dict = field(default_factory=dict)  # (path, label) -> bool: some candidate with it was valid
    errors: dict = field(default_factory=dict)  # (path, label) -> ConfigError (preferably one about `path`)
    first_error: Optional[tuple] = None  # (candidate, ConfigError)
    estimated: bool = False  # an estimator ran (min/max are meaningful)


def relates(err_path: str, path: str) -> bool:
    e = err_path.split("[")[0]
    return e == path or e.startswith(path + ".") or path.startswith(e + ".") if e else False


def run_candidate(spec_base: dict, hooks: Hooks, sampled: dict) -> tuple[Optional[dict], Optional[ConfigError]]:
    try:
        cfg = resolve_config(apply(spec_base, sampled))
        return hooks.validate(cfg) or {}, None
    except ConfigError as exc:
        return None, exc
    except Exception as exc:  # noqa: BLE001 — a hook's own failure: report it as the candidate's problem
        return None, ConfigError("", f"{type(exc).__name__}: {one_line(str(exc))[:200]}")


def survey(spec: SweepSpec, hooks=None, limit: int = ENUMERATE_LIMIT) -> Survey:
    hooks = as_hooks(hooks)
    sv = Survey()
    if not hooks.can_check:
        return sv
    cands, sv.enumerated = candidates(spec.params, limit, seed=spec.sweep.sampler_seed)
    sv.estimated = hooks.estimate is not None
    for cand in cands:
        metrics, err = run_candidate(spec.base, hooks, cand)
        sv.checked += 1
        keys = [(path, label(v)) for path, v in cand.items()]
        if err is not None:
            if sv.first_error is None:
                sv.first_error = (cand, err)
            for key in keys:
                sv.seen.setdefault(key, False)
                old = sv.errors.get(key)
                if old is None or (not relates(old.path, key[0]) and relates(err.path, key[0])):
                    sv.errors[key] = err
            continue
        sv.valid += 1
        for key in keys:
            sv.seen[key] = True
        for metric, value in (metrics or {}).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if metric not in sv.minimum or value < sv.minimum[metric][0]:
                sv.minimum[metric] = (value, cand)
            if metric not in sv.maximum or value > sv.maximum[metric][0]:
                sv.maximum[metric] = (value, cand)
    return sv


# =====================================================================================================
# space size, describe
# =====================================================================================================
def space_size(spec: SweepSpec) -> int | str:
    """Number of distinct points of the space (conditional parameters counted where active), or
    'infinite (continuous: a, b)'."""
    continuous = [p.path for p in spec.params if p.size() is None]
    if continuous:
        return f"infinite (continuous: {', '.join(continuous)})"
    n = count_tree(spec.params, {p.path: p.size() for p in spec.params})
    return int(n) if n is not None else "infinite"


def describe(spec: SweepSpec, hooks=None, survey_result: Optional[Survey] = None, limit: int = ENUMERATE_LIMIT) -> dict:
    """Summary for `hqlt validate`: parameter count, space size, ranges of the estimated sizes over the checked
    candidates (and how many were checked)."""
    sv = survey_result if survey_result is not None else survey(spec, hooks, limit)

    def rng(metric):
        if metric in sv.minimum:
            return (sv.minimum[metric][0], sv.maximum[metric][0])
        return None

    s = spec.sweep
    return {
        "file": spec.file,
        "name": spec.name,
        "hash": spec.hash,
        "parameters": len(spec.params),
        "conditional": sum(1 for p in spec.params if p.when),
        "space_size": space_size(spec),
        "candidates_checked": sv.checked,
        "candidates_valid": sv.valid,
        "enumerated": sv.enumerated,
        "params_range": rng(PARAMS),
        "fw_state_bytes_range": rng(FW_STATE_BYTES),
        "kv_cache_bytes_range": rng(KV_CACHE_BYTES),
        "objectives": [f"{o.metric} ({o.mode})" for o in s.objectives],
        "sampler": s.sampler,
        "scheduler": s.scheduler,
        "num_samples": s.num_samples,
        "seeds": s.seeds,
        "budgets": dict(s.budgets.items()),
    }


__all__ = ["ENUMERATE_LIMIT", "Survey", "candidates", "corner_grid", "count_tree", "describe", "enumerate_tree",
           "random_candidate", "relates", "run_candidate", "space_size", "survey", "survey_grid"]
