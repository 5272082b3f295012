"""The checks of a parsed spec that need the torch side, through injected `Hooks`: `validate(spec, hooks)`.

`validate` raises a one-line `SpecError` (``<file>: <key path>: <what is wrong>; allowed: <...>``) unless
every space path is a key of the trial config schema, base is a valid trial config, every choice value (and
numeric endpoint) gives a valid trial config in some combination (registry names: ``space.model.mixer.mix:
got 'vectr': unknown mix ...; allowed: ...``), and each budget can be met by some candidate (the candidates
are those of `candidates.survey`). Nothing is written anywhere.
"""
from __future__ import annotations

from typing import Any, Optional

from hqlt.blocks.validation import ConfigError, closest, join

from .candidates import ENUMERATE_LIMIT, Survey, relates, run_candidate, survey
from .errors import SpecError, fmt_number
from .hooks import Hooks, as_hooks
from .spec import BUDGET_METRIC, Param, SweepSpec, label, matches
from .tree import apply, children, flatten_paths, get_path, resolve_config


def known_paths(spec: SweepSpec, hooks=None) -> set[str]:
    """Key paths a space may sample: those of base, plus (with a `paths` hook) the trial config schema's, for
    base and for base with each choice value set (registry options depend on the chosen name)."""
    hooks = as_hooks(hooks)
    known = set(flatten_paths(spec.base))
    if hooks.paths is None:
        return known
    variants: list[dict] = [{}] + [{p.path: v} for p in spec.params if p.kind == "choice" for v in p.choices]
    for variant in variants:
        cfg = apply(spec.base, variant)
        try:
            cfg = resolve_config(cfg)
        except ConfigError:
            pass
        try:
            known |= set(hooks.paths(cfg))
        except Exception:  # noqa: BLE001 — a variant the schema cannot read adds nothing
            continue
    return known


def _fmt_candidate(cand: dict, n: int = 160) -> str:
    text = "{" + ", ".join(f"{k}: {v}" for k, v in cand.items()) + "}"
    return text if len(text) <= n else text[: n - 4] + "...}"


def validate(spec: SweepSpec, hooks=None, limit: int = ENUMERATE_LIMIT) -> Survey:
    """The checks that need the trial config (see module doc). Returns the candidate `Survey` (pass it to
    `describe` to avoid checking the candidates twice). Raises `SpecError`."""
    hooks = as_hooks(hooks)
    file = spec.file
    # 1. every sampled key path exists in the trial config schema
    known = known_paths(spec, hooks)
    for p in spec.params:
        if p.path in known:
            continue
        parts = p.path.split(".")
        prefix = ""
        for i in range(len(parts) - 1, 0, -1):
            if ".".join(parts[:i]) in known:
                prefix = ".".join(parts[:i])
                break
        kids = children(known, prefix)
        where = f"under {prefix}" if prefix else "at the top level"
        if prefix and not kids:
            msg = f"not a key of the trial config ({prefix} is a value, not a mapping)"
        else:
            msg = f"not a key of the trial config; allowed {where}: {', '.join(kids)}"
        raise SpecError(f"space.{p.path}", msg + closest(p.path, sorted(known)), file)
    if not hooks.can_check:
        return Survey()
    # 2. base is a valid trial config (sampled keys it leaves missing take their first value)
    fill = {}
    for p in spec.params:
        if get_path(spec.base, p.path, "???") == "???":
            fill[p.path] = p.extremes()[0]
    _, err = run_candidate(spec.base, hooks, fill)
    if err is not None and not any(relates(err.path, p.path) for p in spec.params):
        raise SpecError(join("base", err.path), err.message, file)
    # 3. candidates
    sv = survey(spec, hooks, limit)
    # 3a. every choice value / numeric bound gives a valid config in some combination: first the values whose
    #     error is about their own key path (registry names, ranges), then "nothing is valid at all", then
    #     values that are only ever invalid in combination with others.
    problems = _value_problems(spec, hooks, sv, fill)
    for p, v, i, err in problems:
        if relates(err.path, p.path):
            raise SpecError(f"space.{p.path}", _value_message(p, v, i, err), file)
    # 3b. some candidate is valid
    if sv.checked and not sv.valid and sv.first_error is not None:
        cand, err = sv.first_error
        raise SpecError("space", f"none of the {sv.checked} checked candidates is a valid trial config, e.g. "
                                 f"{_fmt_candidate(cand)}: {err.path}: {err.message}", file)
    for p, v, i, err in problems:
        raise SpecError(f"space.{p.path}", _value_message(p, v, i, err), file)
    # 3c. budgets: some candidate meets each one
    for key, limit_value in spec.sweep.budgets.items():
        metric = BUDGET_METRIC[key]
        if not sv.estimated or metric not in sv.minimum:
            continue
        lowest, cand = sv.minimum[metric]
        if lowest > limit_value:
            how = "all" if sv.enumerated else "corners + random samples of the space;"
            raise SpecError(f"sweep.budgets.{key}",
                            f"no candidate can meet {fmt_number(limit_value)}: the minimum achievable {metric} is "
                            f"{fmt_number(lowest)} (at {_fmt_candidate(cand)}; {how} {sv.checked} candidates checked); "
                            f"allowed: a budget >= {fmt_number(lowest)}, or a space with smaller models", file)
    return sv


def _value_problems(spec: SweepSpec, hooks: Hooks, sv: Survey, fill: dict) -> list[tuple]:
    """[(param, value, index, error)] for choice values / numeric bounds that no checked candidate made valid."""
    out = []
    for p in spec.params:
        for i, v in enumerate(p.extremes()):
            key = (p.path, label(v))
            if sv.seen.get(key):
                continue
            err = sv.errors.get(key)
            if err is None:  # never drawn: check it in the context that makes it active
                ctx = _activating_context(spec, p)
                if ctx is None:
                    continue
                _, err = run_candidate(spec.base, hooks, {**fill, **ctx, p.path: v})
                if err is None:
                    continue
            out.append((p, v, i, err))
    return out


def _value_message(p: Param, v: Any, i: int, err: ConfigError) -> str:
    what = f"got {v!r}" if p.kind == "choice" else f"{('low', 'high')[i]} {v}"
    own = err.path.split("[")[0] == p.path
    if own and err.message.startswith("got "):
        return err.message + " (in every checked combination)"
    if own:
        return f"{what}: {err.message}"
    return f"{what} never gives a valid trial config ({err.path}: {err.message})" if err.path else f"{what}: {err.message}"


def _activating_context(spec: SweepSpec, p: Param) -> Optional[dict]:
    """Values of the controlling parameters (recursively) that make `p` active; None if there are none."""
    ctx: dict = {}
    todo = [p]
    while todo:
        q = todo.pop()
        for key, values in q.when.items():
            if key in ctx:
                if not matches(ctx[key], values):
                    return None
                continue
            ctx[key] = values[0]
            todo.append(spec.param(key))
    return ctx


__all__ = ["known_paths", "validate"]
