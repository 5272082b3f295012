"""The spec parser: `load_spec` (spec file + `key=value` overrides -> a checked `SweepSpec`).

`load_spec` parses and checks everything that needs no trial-config schema (structure, types, ranges,
conditions, sweep settings) and raises a one-line `SpecError` naming file and key path
(``<file>: <key path>: <what is wrong>; allowed: <...>``): the YAML itself (read by `yamlio`) — top-level
sections, no code-executing YAML (`_target_`, non-built-in resolvers), the `sweep` settings, each
distribution (kind, types, bounds, log, step), `when:` conditions (names a space parameter, values the
controller can take, no cycles), grid-sampler finiteness. The checks that need the torch side (space paths
exist in the trial config, registry names, budgets) are `checks.validate`, with injected hooks;
`load_spec(..., hooks=...)` runs them too. Nothing is written anywhere.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Iterable, Optional

from hqlt.blocks.validation import ConfigError, build, closest, join

from .checks import validate
from .errors import SpecError, one_line
from .spec import ORDERS, Param, SweepSettings, SweepSpec, label, topological
from .tree import has_path
from .vocabulary import KNOWN_METRICS, SLICE_METRIC_PREFIXES, TEST_PREFIX
from .yamlio import check_safe, dump_yaml, merge, read_overrides, read_yaml

SECTIONS = ("base", "space", "sweep")
KINDS = ("choice", "int", "float")
DIST_KEYS = ("choice", "int", "float", "step", "log", "when")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
GRID_LIMIT = 100_000


def load_spec(path, overrides: Iterable[str] = (), *, hooks=None) -> SweepSpec:
    """Read a spec file, merge `key=value` overrides on top, check it; `hooks` (a `Hooks` of the torch-side
    checks) also runs `checks.validate`. Nothing is written anywhere. Raises `SpecError`."""
    spec = parse_spec(path, list(overrides))
    if hooks is not None:
        validate(spec, hooks)
    return spec


def parse_spec(path, overrides: list[str] = ()) -> SweepSpec:
    file = str(path)
    doc = read_yaml(file, expected="a mapping with sections base, space, sweep")
    over = read_overrides(list(overrides), file, example="sweep.num_samples=4")
    for section, origin in ((doc, "file"), (over, "override")):
        for key in section:
            if key not in SECTIONS:
                where = " (from an override)" if origin == "override" else ""
                raise SpecError(str(key), f"unknown section{where}; allowed: {', '.join(SECTIONS)}{closest(key, SECTIONS)}",
                                file)
    for sec in ("base", "space", "sweep"):
        if doc.get(sec) is not None and not isinstance(doc[sec], dict):
            raise SpecError(sec, f"got {_short(doc[sec])}; expected a mapping", file)
    space = _normalise_space(doc.get("space") or {}, "space", file)
    space = _merge_space(space, _normalise_space(over.get("space") or {}, "space", file))
    merged = {"base": merge(doc.get("base") or {}, over.get("base") or {}),
              "space": space,
              "sweep": merge(doc.get("sweep") or {}, over.get("sweep") or {})}
    if not isinstance(merged["base"], dict) or not merged["base"]:
        raise SpecError("base", "missing or empty; allowed: a full trial config (model, task, train, ...)", file)
    check_safe(merged, "", file)
    sweep_raw, space_raw = _resolve_sections(merged, file)
    settings = parse_sweep(sweep_raw, file)
    params = parse_space(space_raw, merged["base"], settings, file)
    text = dump_yaml(merged)
    return SweepSpec(file=file, base=merged["base"], params=params, sweep=settings, text=text,
                     overrides=list(overrides))


def _is_dist(node: Any) -> bool:
    """A mapping that describes one distribution (vs. a nesting level of dotted paths)."""
    return isinstance(node, dict) and (not node or any(k in DIST_KEYS for k in node)
                                       or any(v is not None and not isinstance(v, dict) for v in node.values()))


def _normalise_space(node: Any, prefix: str, file: str, out: Optional[dict] = None) -> dict:
    """Nested or flat `space` -> {dotted path: distribution mapping | None (= remove)}."""
    out = {} if out is None else out
    if not isinstance(node, dict):
        raise SpecError(prefix, f"got {_short(node)}; expected a mapping of key paths to distributions", file)
    for key, value in node.items():
        path = join(prefix, str(key))
        rel = path[len("space."):]
        if value is None:
            out[rel] = None
        elif _is_dist(value):
            if rel in out and out[rel] is not None:
                raise SpecError(path, "given twice (flat and nested); allowed: one distribution per key path", file)
            out[rel] = value
        elif isinstance(value, dict):
            _normalise_space(value, path, file, out)
        else:
            raise SpecError(path, f"got {_short(value)}; expected a distribution; allowed: {{choice: [...]}}, "
                                  "{int: [low, high]}, {float: [low, high]} (+ step, log, when)", file)
    return out


def _merge_space(a: dict, b: dict) -> dict:
    out = dict(a)
    for path, dist in b.items():
        if dist is None:
            out.pop(path, None)
        elif path in out and isinstance(out[path], dict):
            old = dict(out[path])
            if any(k in dist for k in KINDS):  # a new kind replaces the old distribution (its step/log too)
                new_kind = next(k for k in KINDS if k in dist)
                same = new_kind in old
                old = {k: v for k, v in old.items() if k not in KINDS and (same or k not in ("step", "log"))}
            out[path] = merge(old, dist)
        else:
            out[path] = dist
    return {k: v for k, v in out.items() if v is not None}


def _resolve_sections(merged: dict, file: str) -> tuple[dict, dict]:
    """Resolve interpolations in sweep and space now (base waits until after sampling)."""
    if "${" not in json.dumps([merged["sweep"], merged["space"]], default=str):
        return merged["sweep"], merged["space"]
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = OmegaConf.create(merged)
    out = []
    for sec in ("sweep", "space"):
        try:
            out.append(OmegaConf.to_container(cfg[sec], resolve=True, throw_on_missing=False))
        except OmegaConfBaseException as exc:
            key = str(getattr(exc, "full_key", "") or sec)
            raise SpecError(key, f"cannot resolve: {one_line(str(exc).splitlines()[0])}", file) from None
    return out[0], out[1]


def _short(value: Any, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ---- sweep --------------------------------------------------------------------------------------------
def parse_sweep(raw: dict, file: str) -> SweepSettings:
    try:
        s: SweepSettings = build(SweepSettings, raw, "sweep")
    except SpecError:
        raise
    except ConfigError as exc:
        raise SpecError(exc.path, exc.message, file) from None

    def bad(path, msg):
        raise SpecError(path, msg, file)

    if s.name is not None and not _NAME.match(s.name):
        bad("sweep.name", f"got {s.name!r}; allowed: letters, digits, '_', '.', '-' (used for folders and study names)")
    if not s.objectives:
        bad("sweep.objectives", "empty list; allowed: one or more {metric: ..., mode: max|min}")
    seen = set()
    for i, o in enumerate(s.objectives):
        kp = f"sweep.objectives[{i}]"
        if not _known_metric(o.metric):
            bad(f"{kp}.metric", f"unknown metric {o.metric!r}; allowed: {', '.join(KNOWN_METRICS)}, "
                                f"{'<slice>, '.join(SLICE_METRIC_PREFIXES)}<slice>{closest(o.metric, KNOWN_METRICS)}")
        if o.metric in seen:
            bad(f"{kp}.metric", f"{o.metric!r} is listed twice; allowed: each metric once")
        seen.add(o.metric)
    if s.scheduler == "asha":
        if len(s.objectives) > 1:
            bad("sweep.scheduler", f"asha needs exactly one objective, got {len(s.objectives)} "
                                   f"({', '.join(s.metrics)}); allowed: fifo for several objectives, or asha with one")
        if s.metrics[0].startswith(TEST_PREFIX):
            bad("sweep.scheduler", f"asha compares the evaluations during training, which are on the validation set; "
                                   f"{s.metrics[0]!r} is measured once at the end; allowed: a val/ objective with asha, "
                                   f"or fifo")
        a = s.asha
        if a.max_t < 1:
            bad("sweep.asha.max_t", f"got {a.max_t}; allowed: an integer >= 1")
        if not 1 <= a.grace_period <= a.max_t:
            bad("sweep.asha.grace_period", f"got {a.grace_period}; allowed: 1..max_t ({a.max_t})")
        if not (math.isfinite(a.reduction_factor) and a.reduction_factor > 1):
            bad("sweep.asha.reduction_factor", f"got {a.reduction_factor}; allowed: a number > 1")
    if s.num_samples < 1:
        bad("sweep.num_samples", f"got {s.num_samples}; allowed: an integer >= 1")
    if s.seeds < 1:
        bad("sweep.seeds", f"got {s.seeds}; allowed: an integer >= 1")
    if s.max_concurrent is not None and s.max_concurrent < 1:
        bad("sweep.max_concurrent", f"got {s.max_concurrent}; allowed: an integer >= 1, or null (as many as resources allow)")
    m = s.snapshot_minutes
    if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0):
        bad("sweep.snapshot_minutes", f"got {m!r}; allowed: a number of minutes >= 0 (0: at every evaluation), or null "
                                      "(no seed snapshots)")
    r = s.resources
    for key in ("cpu", "gpu"):
        v = getattr(r, key)
        if key == "gpu" and v == "auto":  # a fraction per trial from its memory estimate
            continue
        if not math.isfinite(v) or v < 0:
            bad(f"sweep.resources.{key}", f"got {v}; allowed: a number >= 0" + (", or auto" if key == "gpu" else ""))
    if r.gpu != "auto" and r.gpu > 1 and not float(r.gpu).is_integer():
        bad("sweep.resources.gpu", f"got {r.gpu}; allowed: a fraction in (0, 1] (shared GPU), a whole number of GPUs, "
                                   "or auto")
    if r.cpu == 0 and r.gpu == 0:
        bad("sweep.resources", "cpu and gpu are both 0; allowed: cpu > 0 or gpu > 0 per trial")
    for key, v in s.budgets.items():
        if not math.isfinite(v) or v <= 0:
            bad(f"sweep.budgets.{key}", f"got {v}; allowed: a number > 0, or null (no budget)")
    if s.order is not None:
        if not isinstance(s.order, str) or s.order not in ORDERS:
            bad("sweep.order", f"got {_short(s.order)}; allowed: {', '.join(ORDERS)}, or null (longest_first with "
                               f"sampler grid){closest(s.order, ORDERS) if isinstance(s.order, str) else ''}")
        if s.sampler != "grid":
            bad("sweep.order", f"got {s.order!r} with sampler {s.sampler}, which picks each trial from the results so "
                               "far (the order is the sampler's); allowed: null, or sampler grid")
    return s


def _known_metric(name: str) -> bool:
    return name in KNOWN_METRICS or any(name.startswith(p) and len(name) > len(p) for p in SLICE_METRIC_PREFIXES)


# ---- space ----------------------------------------------------------------------------------------------
def parse_space(raw: dict, base: dict, settings: SweepSettings, file: str) -> list[Param]:
    params = {path: parse_param(path, dist, file) for path, dist in raw.items()}
    for path, dist in raw.items():
        params[path].when = _parse_when(path, dist.get("when"), params, base, file)
    _check_cycles(params, file)
    ordered = topological(params.values())
    if settings.sampler == "grid":
        for p in ordered:
            if p.size() is None:
                raise SpecError(f"space.{p.path}", "sweep.sampler is grid, which needs a finite grid, but this is a "
                                                   "continuous float; allowed: a choice, an int, or a float with step", file)
        points = math.prod(p.size() for p in ordered)
        if points > GRID_LIMIT:
            raise SpecError("sweep.sampler", f"grid of {points} points (every parameter's grid, multiplied); allowed: "
                                             f"<= {GRID_LIMIT} (Optuna's GridSampler lists them all) — use tpe, nsga2 "
                                             "or random, or coarser steps", file)
    return ordered


def parse_param(path: str, dist: Any, file: str) -> Param:
    kp = f"space.{path}"

    def bad(key, msg):
        raise SpecError(join(kp, key) if key else kp, msg, file)

    if not isinstance(dist, dict):
        bad("", f"got {_short(dist)}; expected a distribution mapping")
    for key in dist:
        if key not in DIST_KEYS:
            bad(str(key), f"unknown key; allowed: {', '.join(DIST_KEYS)}{closest(key, DIST_KEYS)}")
    kinds = [k for k in KINDS if k in dist]
    if not kinds:
        bad("", "no distribution; allowed: exactly one of choice, int, float")
    if len(kinds) > 1:
        bad("", f"several distributions ({', '.join(kinds)}); allowed: exactly one of choice, int, float")
    kind = kinds[0]
    log = dist.get("log", False)
    step = dist.get("step")
    if kind == "choice":
        values = dist["choice"]
        if not isinstance(values, list):
            bad("choice", f"got {_short(values)}; expected a list of values, e.g. [a, b]")
        if not values:
            bad("choice", "empty list; allowed: one or more values")
        labels = [label(v) for v in values]
        dups = sorted({lb for lb in labels if labels.count(lb) > 1})
        if dups:
            bad("choice", f"duplicate values {', '.join(dups)}; allowed: each value once")
        for key in ("step", "log"):
            if key in dist:
                bad(key, "only for int and float distributions; allowed with choice: when")
        return Param(path, "choice", choices=list(values))
    bounds = dist[kind]
    if not isinstance(bounds, list) or len(bounds) != 2:
        bad(kind, f"got {_short(bounds)}; expected [low, high]")
    for name, v in zip(("low", "high"), bounds):
        if isinstance(v, str):
            bad(kind, f"{name} is a string ({v!r}); allowed: a number (write 1.0e-4, not '1e-4')")
        ok = (isinstance(v, int) and not isinstance(v, bool)) if kind == "int" else _is_number(v)
        if not ok:
            bad(kind, f"{name} got {_short(v)}; allowed: {'an integer' if kind == 'int' else 'a number'}")
        if not math.isfinite(v):
            bad(kind, f"{name} got {v}; allowed: a finite number")
    low, high = bounds
    if low >= high:
        bad(kind, f"low {low} >= high {high}; allowed: low < high (put a fixed value in base instead)")
    if not isinstance(log, bool):
        bad("log", f"got {_short(log)}; allowed: true or false")
    if log and low <= 0:
        bad("log", f"log scale needs low > 0, got low {low}; allowed: a positive lower bound, or log: false")
    if step is not None:
        if kind == "int" and (isinstance(step, bool) or not isinstance(step, int)):
            bad("step", f"got {_short(step)}; allowed: an integer >= 1")
        if kind == "float" and not _is_number(step):
            bad("step", f"got {_short(step)}; allowed: a number > 0")
        if step <= 0 or not math.isfinite(step):
            bad("step", f"got {step}; allowed: {'an integer >= 1' if kind == 'int' else 'a number > 0'}")
        if log and not (kind == "int" and step == 1):
            bad("step", f"step {step} cannot be combined with log: true (Optuna samples log scales continuously); "
                        "allowed: step or log, not both")
        span = high - low
        if step > span:
            bad("step", f"step {step} is larger than the range high - low = {span}; allowed: a step <= {span}")
        if kind == "int":
            if span % step:
                bad("step", f"step {step} does not divide high - low = {span}; allowed: a divisor of {span}, "
                            f"or high = {low + span // step * step}")
        else:
            n = span / step
            if abs(n - round(n)) > 1e-9 * max(1.0, n):
                bad("step", f"step {step} does not divide high - low = {span:g}; allowed: a step that divides the "
                            f"range, or high = {low + math.floor(n) * step:g}")
    return Param(path, kind, low=low if kind == "int" else float(low), high=high if kind == "int" else float(high),
                 step=step, log=log)


def _flat_when(node: Any, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        path = join(prefix, str(key))
        if isinstance(value, dict) and value:
            out.update(_flat_when(value, path))
        else:
            out[path] = value
    return out


def _parse_when(path: str, raw: Any, params: dict[str, Param], base: dict, file: str) -> dict:
    kp = f"space.{path}.when"
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise SpecError(kp, f"got {_short(raw)}; expected a mapping {{space key path: [values]}} (several keys = AND)",
                        file)
    when = {}
    names = sorted(params)
    for key, values in _flat_when(raw).items():
        wp = f"{kp}.{key}"
        if key == path:
            raise SpecError(wp, "a parameter cannot be conditional on itself", file)
        if key not in params:
            what = "is a base key but not a space parameter" if has_path(base, key) else "unknown key"
            raise SpecError(wp, f"{what}; allowed: a sampled parameter ({', '.join(names)}){closest(key, names)}", file)
        ctrl = params[key]
        if ctrl.kind == "float" and ctrl.step is None:
            raise SpecError(wp, f"{key} is a continuous float, which almost never equals a listed value; allowed: "
                                "a condition on a choice, an int, or a float with step", file)
        if not isinstance(values, list):
            values = [values]
        if not values:
            raise SpecError(wp, f"empty list; allowed: one or more of {ctrl.describe_domain()}", file)
        never = [v for v in values if not ctrl.can_take(v)]
        if never:
            raise SpecError(wp, f"{key} can never take {', '.join(map(repr, never))}; allowed: {ctrl.describe_domain()}"
                                f"{closest(never[0], ctrl.choices) if ctrl.kind == 'choice' else ''}", file)
        if ctrl.kind == "int":
            values = [int(v) for v in values]
        elif ctrl.kind == "float":
            values = [float(v) for v in values]
        when[key] = list(values)
    return when


def _check_cycles(params: dict[str, Param], file: str) -> None:
    state: dict[str, int] = {}

    def visit(path: str, stack: list[str]) -> None:
        if state.get(path) == 2:
            return
        if state.get(path) == 1:
            cycle = stack[stack.index(path):] + [path]
            raise SpecError(f"space.{cycle[0]}.when", f"cyclic conditions: {' -> '.join(cycle)}; allowed: conditions "
                                                      "that form a tree (no parameter may depend on itself)", file)
        state[path] = 1
        for key in params[path].when:
            visit(key, stack + [path])
        state[path] = 2

    for path in params:
        visit(path, [])


__all__ = ["DIST_KEYS", "GRID_LIMIT", "KINDS", "SECTIONS", "load_spec", "parse_param", "parse_space", "parse_spec",
           "parse_sweep"]
