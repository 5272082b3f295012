"""The sweep spec: typed dataclasses (what `parse.load_spec` builds from a YAML file + CLI `key=value` overrides).

    base:   a full trial config (what `hqlt train` reads); `${...}` interpolation allowed, resolved after sampling
    space:  dotted key path of base -> distribution  ({choice: [...]} | {int: [lo, hi], step, log} |
            {float: [lo, hi], step, log}, each with an optional `when: {other.path: [values]}`)
    sweep:  objectives, sampler, scheduler, num_samples, seeds, resources, budgets (see `SweepSettings`)

`space` may be written flat (``model.d_model: {int: [32, 128]}``) or nested (``model: {d_model: {int: ...}}``);
both normalise to flat dotted keys, so overrides like ``space.model.d_model.int=[32,256]`` work, and
``space.model.d_model=null`` removes a parameter.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Union

from .vocabulary import FW_STATE_BYTES, KV_CACHE_BYTES, PARAMS, VAL_ACC

SCALAR = (str, int, float, bool, type(None))


# ---- sweep settings ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Objective:
    """An objective: a metric name (`vocabulary`) and its mode, "max" or "min" (which way is better).

    The one objective type of hqlt: a spec's `sweep.objectives` and `hqlt.reports` (which parses
    ``metric:mode`` strings into it) share it. Its fields are not checked here: `load_spec` checks a spec's
    objectives, `hqlt.reports.objectives.parse_objectives` the ones it reads."""

    metric: str = VAL_ACC
    mode: Literal["max", "min"] = "max"

    def __str__(self) -> str:  # the same syntax hqlt.reports.objectives.parse_objectives accepts
        return f"{self.metric}:{self.mode}"

    @property
    def sign(self) -> float:
        return 1.0 if self.mode == "max" else -1.0


@dataclass
class AshaSettings:
    max_t: int = 10  # in reports (evaluations)
    grace_period: int = 1
    reduction_factor: float = 3


@dataclass
class Resources:
    cpu: float = 1
    gpu: Union[float, Literal["auto"]] = 0  # auto: a GPU fraction per trial from its memory estimate (orchestration/startup.py)


@dataclass
class Budgets:
    max_params: Optional[float] = None
    max_fw_state_bytes: Optional[float] = None
    max_kv_cache_bytes: Optional[float] = None

    def items(self) -> list[tuple[str, float]]:
        """[(budget key, limit)] of the budgets that are set."""
        return [(k, v) for k, v in asdict(self).items() if v is not None]


BUDGET_METRIC = {"max_params": PARAMS, "max_fw_state_bytes": FW_STATE_BYTES, "max_kv_cache_bytes": KV_CACHE_BYTES}

# `sweep.order`: the order in which a grid's points start (`search_space/grid.py`). longest_first: by descending
# predicted training FLOPs (the analytic cost the driver hands in); as_listed: the spec's order (first parameter
# slowest, values as listed); shuffled: Optuna's GridSampler, seeded with sampler_seed (hqlt before the key).
# Only a grid's order is free to choose: tpe, nsga2 and random pick each trial from the results so far, so for
# them the key must stay null.
ORDERS = ("longest_first", "as_listed", "shuffled")
DEFAULT_GRID_ORDER = "longest_first"


@dataclass
class SweepSettings:
    name: Optional[str] = None  # null: the spec file's stem
    objectives: list[Objective] = field(default_factory=lambda: [Objective()])
    sampler: Literal["tpe", "nsga2", "random", "grid"] = "tpe"
    scheduler: Literal["fifo", "asha"] = "fifo"
    asha: AshaSettings = field(default_factory=AshaSettings)
    num_samples: int = 8
    seeds: int = 1  # seeds per architecture, run one after another inside a trial
    seed_aggregate: Literal["max", "mean"] = "max"
    sampler_seed: int = 0
    resources: Resources = field(default_factory=Resources)
    max_concurrent: Optional[int] = None  # null: as many as resources allow
    budgets: Budgets = field(default_factory=Budgets)
    order: Any = None  # null | one of ORDERS (grid only); null: longest_first with sampler grid (checked by parse)
    # Seed snapshots (orchestration/seed_snapshot.py): a running seed saves its training state at the first evaluation
    # at least this many minutes after its last snapshot (0: at every evaluation; null: never), into results/; a
    # resumed sweep goes on from there instead of training the seed again from step 0.
    snapshot_minutes: Optional[float] = None

    @property
    def grid_order(self) -> Optional[str]:
        """The order a grid sampler starts its points in (None: not a grid, the sampler's own order)."""
        return (self.order or DEFAULT_GRID_ORDER) if self.sampler == "grid" else None

    @property
    def metrics(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def modes(self) -> list[str]:
        return [o.mode for o in self.objectives]


# ---- parameters -------------------------------------------------------------------------------------
def label(value: Any) -> str:
    """Canonical text of a value (json): identity of choice values, condition values, grid points."""
    return json.dumps(value, sort_keys=True, default=str)


def matches(value: Any, allowed: Iterable) -> bool:
    """`value` is one of `allowed` (numbers compared with a relative tolerance: stepped floats)."""
    for a in allowed:
        if isinstance(value, float) and isinstance(a, (int, float)) and not isinstance(a, bool):
            if math.isclose(value, a, rel_tol=1e-9, abs_tol=1e-12):
                return True
        elif label(value) == label(a):
            return True
    return False


@dataclass
class Param:
    """One sampled key path. kind: choice | int | float. `when`: {controlling path: [values]} (AND)."""

    path: str
    kind: str
    choices: list = field(default_factory=list)
    low: Any = None
    high: Any = None
    step: Any = None
    log: bool = False
    when: dict = field(default_factory=dict)

    # -- categorical encoding: Optuna's categorical values are None/bool/int/float/str only --
    @property
    def encoded(self) -> bool:
        """True when some choice is a list/mapping: Optuna then sees json labels, decoded on the way out."""
        return self.kind == "choice" and not all(isinstance(c, SCALAR) for c in self.choices)

    def optuna_choices(self) -> list:
        return [label(c) for c in self.choices] if self.encoded else list(self.choices)

    def decode(self, value: Any) -> Any:
        if self.encoded and isinstance(value, str):
            for c in self.choices:
                if label(c) == value:
                    return c
        return value

    # -- domain --
    def value_at(self, k: int) -> Any:
        """The k-th value of a finite numeric grid (k = 0 .. size-1)."""
        if self.kind == "int":
            return self.low + k * (self.step or 1)
        return float(round(self.low + k * self.step, 12))

    def grid(self, continuous_endpoints: bool = True) -> Optional[list]:
        """All values of a finite domain (ints on their step grid, stepped floats on theirs); a continuous
        float gives its endpoints when `continuous_endpoints`, else None."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return list(range(self.low, self.high + 1, self.step or 1))
        if self.step is None:
            return [float(self.low), float(self.high)] if continuous_endpoints else None
        return [self.value_at(k) for k in range(self.size())]

    def size(self) -> Optional[int]:
        """Number of values, None when continuous."""
        if self.kind == "choice":
            return len(self.choices)
        if self.kind == "int":
            return (self.high - self.low) // (self.step or 1) + 1
        if self.step is None:
            return None
        return int(round((self.high - self.low) / self.step)) + 1

    def extremes(self) -> list:
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def can_take(self, value: Any) -> bool:
        if self.kind == "choice":
            return label(value) in {label(c) for c in self.choices}
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not self.low <= value <= self.high:
            return False
        if self.kind == "int":
            return float(value).is_integer() and (int(value) - self.low) % (self.step or 1) == 0
        if self.step is not None:
            k = (value - self.low) / self.step
            return abs(k - round(k)) < 1e-9 * max(1.0, abs(k))
        return True

    def describe_domain(self) -> str:
        if self.kind == "choice":
            return ", ".join(map(str, self.choices))
        text = f"{self.kind} in [{self.low}, {self.high}]"
        if self.step is not None:
            text += f" step {self.step}"
        return text + (" (log)" if self.log else "")

    def is_active(self, sampled: dict) -> bool:
        """Active iff every controlling parameter was sampled and took one of the listed values."""
        for key, values in self.when.items():
            if key not in sampled or not matches(sampled[key], values):
                return False
        return True

    # -- Optuna --
    def suggest(self, trial) -> Any:
        """Suggest on an Optuna trial (or Ray's captor); returns the decoded value."""
        if self.kind == "choice":
            return self.decode(trial.suggest_categorical(self.path, self.optuna_choices()))
        if self.kind == "int":
            return trial.suggest_int(self.path, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.path, float(self.low), float(self.high), step=self.step, log=self.log)

    def to_dict(self) -> dict:
        d = {self.kind: list(self.choices) if self.kind == "choice" else [self.low, self.high]}
        if self.step is not None:
            d["step"] = self.step
        if self.log:
            d["log"] = True
        if self.when:
            d["when"] = {k: list(v) for k, v in self.when.items()}
        return d


def topological(params: Iterable[Param]) -> list[Param]:
    """Params ordered so that every controlling parameter comes before the ones it controls (declaration order
    otherwise). Assumes no cycles (load_spec rejects them)."""
    params = list(params)
    done: set[str] = set()
    out: list[Param] = []
    pending = list(params)
    while pending:
        progressed = False
        for p in list(pending):
            if all(k in done for k in p.when):
                out.append(p)
                done.add(p.path)
                pending.remove(p)
                progressed = True
                break
        if not progressed:
            raise ValueError(f"cyclic conditions among {[p.path for p in pending]}")
    return out


# ---- the spec ---------------------------------------------------------------------------------------
@dataclass
class SweepSpec:
    file: str  # the spec file as named by the user (error messages, artifacts)
    base: dict  # the trial config, plain containers, interpolations kept as `${...}` strings
    params: list[Param]  # in topological order of their `when:` dependencies
    sweep: SweepSettings
    text: str = ""  # the merged spec (file + overrides) as YAML, for logging as an artifact
    overrides: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.sweep.name or Path(self.file).stem

    @property
    def hash(self) -> str:
        return spec_hash(self)

    def param(self, path: str) -> Param:
        for p in self.params:
            if p.path == path:
                return p
        raise KeyError(path)

    @property
    def paths(self) -> list[str]:
        return [p.path for p in self.params]

    def decode(self, sampled: dict) -> dict:
        """{dotted path: value} from a sampled mapping (a Ray trial config or Optuna params): keeps the space's
        parameters (decoding json-labelled choices), drops everything else (``hqlt.*`` keys, derived values)."""
        by_path = {p.path: p for p in self.params}
        return {k: by_path[k].decode(v) for k, v in sampled.items() if k in by_path}

    def normalised(self) -> dict:
        """The spec with defaults filled in, in a canonical form (what the hash covers, see `spec_hash`)."""
        s = asdict(self.sweep)
        s["name"] = self.name
        if s.get("order") in (None, DEFAULT_GRID_ORDER):  # specs from before the key keep their hash
            s.pop("order", None)
        return {"base": self.base, "space": {p.path: p.to_dict() for p in sorted(self.params, key=lambda p: p.path)},
                "sweep": s}


# Sweep keys that change how a sweep runs, not what it searches: changing them does not change the hash, so
# a sweep can be resumed with more samples, other resources, another concurrency or another snapshot interval (a
# resumed seed ends where an uninterrupted one would).
OPERATIONAL_KEYS = ("num_samples", "resources", "max_concurrent", "snapshot_minutes")


def spec_hash(spec: SweepSpec, exclude: Iterable[str] = OPERATIONAL_KEYS) -> str:
    """16-hex hash of the normalised spec (base, space, and the sweep settings except `exclude` and the name).

    Equal for specs that differ only in formatting, key order, defaults spelled out, flat vs nested space keys,
    the sweep name (it names the folder; `study_name` adds it) or the operational keys; used to namespace the
    Optuna study and to refuse resuming a changed spec."""
    norm = spec.normalised()
    norm["sweep"] = {k: v for k, v in norm["sweep"].items() if k not in set(exclude) and k != "name"}
    text = json.dumps(norm, sort_keys=True, default=str, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


__all__ = ["AshaSettings", "BUDGET_METRIC", "Budgets", "DEFAULT_GRID_ORDER", "OPERATIONAL_KEYS", "ORDERS", "Objective", "Param", "Resources", "SCALAR",
           "SweepSettings", "SweepSpec", "label", "matches", "spec_hash", "topological"]
