"""Validation of a sweep spec before anything runs; `describe` for `hqlt validate`.

Two stages, both raising a one-line `SpecError` (``<file>: <key path>: <what is wrong>; allowed: <...>``):

1. `parse_spec` (what `load_spec` calls): the YAML itself and everything that needs no trial-config schema —
   top-level sections, no code-executing YAML (`_target_`, non-built-in resolvers), the `sweep` settings,
   each distribution (kind, types, bounds, log, step), `when:` conditions (names a space parameter, values the
   controller can take, no cycles), grid-sampler finiteness.
2. `validate(spec, hooks)`: what needs the torch side through injected `Hooks` — every space path is a key of
   the trial config schema, base is a valid trial config, every choice value (and numeric endpoint) gives a
   valid trial config in some combination (registry names: ``space.model.mixer.mix: got 'vectr': unknown mix
   ...; allowed: ...``), and each budget can be met by some candidate.

Candidates: the finite space (ints on their step grid, floats at their endpoints) is enumerated when it has at
most `limit` (5000) combinations, else its corners (numeric parameters at their bounds) plus seeded random
samples are checked. Nothing is written anywhere.
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from hqlt.blocks.configs import ConfigError, build, closest, join

from .errors import SpecError, one_line
from .hooks import Hooks, as_hooks
from .spec import BUDGET_METRIC, Param, SweepSettings, SweepSpec, fmt_number, label, matches, topological
from .tree import apply, children, flatten_paths, get_path, has_path, resolve_config

SECTIONS = ("base", "space", "sweep")
KINDS = ("choice", "int", "float")
DIST_KEYS = ("choice", "int", "float", "step", "log", "when")
# OmegaConf's own resolvers; none imports or evaluates code. Custom resolvers are refused even if some module
# registered one in this process.
BUILTIN_RESOLVERS = ("oc.env", "oc.select", "oc.decode", "oc.create", "oc.deprecated", "oc.coerce",
                     "oc.dict.keys", "oc.dict.values")
INSTANTIATE_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
# Metric names shared by trials, sweeps and reports (ARCHITECTURE.md "Metric names"); `val/acc@<slice>` too.
KNOWN_METRICS = ("train/loss", "val/acc", "val/acc_scaled", "val/loss", "val/bpb", "perf/train_tok_s",
                 "perf/peak_mem_mb", "perf/step_ms", "perf/mfu", "model/params", "model/fw_state_bytes",
                 "model/kv_cache_bytes", "model/flops_per_token")
SLICE_METRIC_PREFIX = "val/acc@"
_RESOLVER_CALL = re.compile(r"\$\{\s*([A-Za-z_][\w.\-]*)\s*:")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
ENUMERATE_LIMIT = 5000
GRID_LIMIT = 100_000


# =====================================================================================================
# stage 1: parse
# =====================================================================================================
def parse_spec(path, overrides: list[str] = ()) -> SweepSpec:
    file = str(path)
    doc = _load_yaml(file)
    over = _parse_overrides(list(overrides), file)
    for section, origin in ((doc, "file"), (over, "override")):
        for key in section:
            if key not in SECTIONS:
                where = f" (from an override)" if origin == "override" else ""
                raise SpecError(str(key), f"unknown section{where}; allowed: {', '.join(SECTIONS)}{closest(key, SECTIONS)}",
                                file)
    for sec in ("base", "space", "sweep"):
        if doc.get(sec) is not None and not isinstance(doc[sec], dict):
            raise SpecError(sec, f"got {_short(doc[sec])}; expected a mapping", file)
    space = _normalise_space(doc.get("space") or {}, "space", file)
    space = _merge_space(space, _normalise_space(over.get("space") or {}, "space", file))
    merged = {"base": _merge(doc.get("base") or {}, over.get("base") or {}),
              "space": space,
              "sweep": _merge(doc.get("sweep") or {}, over.get("sweep") or {})}
    if not isinstance(merged["base"], dict) or not merged["base"]:
        raise SpecError("base", "missing or empty; allowed: a full trial config (model, task, train, ...)", file)
    _check_safe(merged, "", file)
    sweep_raw, space_raw = _resolve_sections(merged, file)
    settings = parse_sweep(sweep_raw, file)
    params = parse_space(space_raw, merged["base"], settings, file)
    text = _dump(merged)
    return SweepSpec(file=file, base=merged["base"], params=params, sweep=settings, text=text,
                     overrides=list(overrides))


def _load_yaml(file: str) -> dict:
    from omegaconf import DictConfig, OmegaConf

    p = Path(file)
    if not p.is_file():
        raise SpecError("", "no such file", file)
    try:
        cfg = OmegaConf.load(p)  # a yaml SafeLoader: python tags cannot construct objects
    except Exception as exc:  # noqa: BLE001 — yaml/OmegaConf errors of many kinds, reported as one line
        raise SpecError("", f"not valid YAML: {one_line(str(exc))[:300]}", file) from None
    if not isinstance(cfg, DictConfig):
        raise SpecError("", "expected a mapping with sections base, space, sweep", file)
    return OmegaConf.to_container(cfg, resolve=False)


def _parse_overrides(items: list[str], file: str) -> dict:
    from omegaconf import OmegaConf

    for item in items:
        if "=" not in item or item.startswith("="):
            raise SpecError(item, "override must look like key.path=value (e.g. sweep.num_samples=4)", file)
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(items), resolve=False) if items else {}
    except Exception as exc:  # noqa: BLE001
        raise SpecError("", f"bad override: {one_line(str(exc))[:300]}", file) from None


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


def _merge(a: Any, b: Any) -> Any:
    """Recursive dict merge, b on top (lists and scalars are replaced) — OmegaConf's merge on plain data."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = _merge(a[k], v) if k in a else v
        return out
    return b


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
            out[path] = _merge(old, dist)
        else:
            out[path] = dist
    return {k: v for k, v in out.items() if v is not None}


def _check_safe(node: Any, path: str, file: str) -> None:
    """No key or value of the spec may make OmegaConf/Hydra import or evaluate code."""
    if isinstance(node, dict):
        for key, value in node.items():
            kp = join(path, str(key))
            if str(key) in INSTANTIATE_KEYS:
                raise SpecError(kp, f"'{key}' is not allowed: hqlt never instantiates objects from YAML; "
                                    "allowed: plain values, registry names and {name: ..., options} mappings", file)
            _check_safe(value, kp, file)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_safe(value, f"{path}[{i}]", file)
    elif isinstance(node, str):
        for name in _RESOLVER_CALL.findall(node):
            if name not in BUILTIN_RESOLVERS:
                raise SpecError(path, f"resolver '{name}' is not allowed (in {node!r}); allowed: ${{key.path}} "
                                      f"interpolation and OmegaConf's built-ins {', '.join(BUILTIN_RESOLVERS)}", file)


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


def _dump(doc: dict) -> str:
    import yaml

    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120)


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
                                f"{SLICE_METRIC_PREFIX}<slice>{closest(o.metric, KNOWN_METRICS)}")
        if o.metric in seen:
            bad(f"{kp}.metric", f"{o.metric!r} is listed twice; allowed: each metric once")
        seen.add(o.metric)
    if s.scheduler == "asha":
        if len(s.objectives) > 1:
            bad("sweep.scheduler", f"asha needs exactly one objective, got {len(s.objectives)} "
                                   f"({', '.join(s.metrics)}); allowed: fifo for several objectives, or asha with one")
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
    r = s.resources
    for key in ("cpu", "gpu"):
        v = getattr(r, key)
        if not math.isfinite(v) or v < 0:
            bad(f"sweep.resources.{key}", f"got {v}; allowed: a number >= 0")
    if r.gpu > 1 and not float(r.gpu).is_integer():
        bad("sweep.resources.gpu", f"got {r.gpu}; allowed: a fraction in (0, 1] (shared GPU) or a whole number of GPUs")
    if r.cpu == 0 and r.gpu == 0:
        bad("sweep.resources", "cpu and gpu are both 0; allowed: cpu > 0 or gpu > 0 per trial")
    for key, v in s.budgets.items():
        if not math.isfinite(v) or v <= 0:
            bad(f"sweep.budgets.{key}", f"got {v}; allowed: a number > 0, or null (no budget)")
    return s


def _known_metric(name: str) -> bool:
    return name in KNOWN_METRICS or (name.startswith(SLICE_METRIC_PREFIX) and len(name) > len(SLICE_METRIC_PREFIX))


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


# =====================================================================================================
# candidates: enumeration / sampling of the space
# =====================================================================================================
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
# stage 2: validate with the torch-side hooks
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


def _relates(err_path: str, path: str) -> bool:
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
                if old is None or (not _relates(old.path, key[0]) and _relates(err.path, key[0])):
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
    if err is not None and not any(_relates(err.path, p.path) for p in spec.params):
        raise SpecError(join("base", err.path), err.message, file)
    # 3. candidates
    sv = survey(spec, hooks, limit)
    # 3a. every choice value / numeric bound gives a valid config in some combination: first the values whose
    #     error is about their own key path (registry names, ranges), then "nothing is valid at all", then
    #     values that are only ever invalid in combination with others.
    problems = _value_problems(spec, hooks, sv, fill)
    for p, v, i, err in problems:
        if _relates(err.path, p.path):
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


# =====================================================================================================
# describe
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
        "params_range": rng("model/params"),
        "fw_state_bytes_range": rng("model/fw_state_bytes"),
        "kv_cache_bytes_range": rng("model/kv_cache_bytes"),
        "objectives": [f"{o.metric} ({o.mode})" for o in s.objectives],
        "sampler": s.sampler,
        "scheduler": s.scheduler,
        "num_samples": s.num_samples,
        "seeds": s.seeds,
        "budgets": dict(s.budgets.items()),
    }


__all__ = ["BUILTIN_RESOLVERS", "ENUMERATE_LIMIT", "KNOWN_METRICS", "SpecError", "Survey", "candidates", "count_tree",
           "describe", "enumerate_tree", "known_paths", "parse_param", "parse_spec", "parse_space", "parse_sweep",
           "space_size", "survey", "validate"]
