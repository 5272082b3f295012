"""Objectives: parsing ``metric:mode`` specs, orientation helpers and human-readable axis labels.

An objective is a metric name (see docs/sweep-folder-and-mlflow.md, "Metric names") plus a mode, ``"max"`` or ``"min"``:
:class:`hqlt.search_space.Objective`, the sweep spec's own type (re-exported here).
Everywhere in :mod:`hqlt.reports` numbers are *oriented* before comparison: a ``min`` objective is
negated so that "larger is better" holds for every column. :func:`orient` does that.
"""

from __future__ import annotations

import json
import math
from typing import Iterable, Sequence

import numpy as np

from hqlt.search_space import Objective
from hqlt.search_space.vocabulary import METRIC_LABELS, OBJECTIVES_TAG

__all__ = [
    "Objective",
    "ObjectiveSpecError",
    "parse_objectives",
    "objectives_from_tag",
    "normalize_modes",
    "orient",
    "metric_label",
    "axis_label",
    "is_accuracy_like",
]

MODES = ("max", "min")


class ObjectiveSpecError(ValueError):
    """A malformed objective specification (bad ``metric:mode`` string, unknown mode, duplicates...)."""


def _checked(o: Objective) -> Objective:
    """`o` itself if its metric is a non-empty string and its mode "max" or "min" (the spec's `Objective`
    does not check its fields), else :class:`ObjectiveSpecError`."""
    if not isinstance(o.metric, str) or not o.metric.strip():
        raise ObjectiveSpecError(f"objective metric name must be a non-empty string, got {o.metric!r}")
    if o.mode not in MODES:
        raise ObjectiveSpecError(
            f"objective {o.metric!r}: mode must be 'max' or 'min', got {o.mode!r}"
        )
    return o


def _parse_one(item: object) -> Objective:
    if isinstance(item, Objective):
        return _checked(item)
    if isinstance(item, str):
        text = item.strip()
        if ":" not in text:
            raise ObjectiveSpecError(
                f"bad objective {item!r}: expected 'METRIC:max' or 'METRIC:min' (e.g. 'val/acc:max')"
            )
        metric, mode = text.rsplit(":", 1)
        metric, mode = metric.strip(), mode.strip().lower()
        if not metric:
            raise ObjectiveSpecError(f"bad objective {item!r}: empty metric name before ':'")
        if mode not in MODES:
            raise ObjectiveSpecError(f"bad objective {item!r}: mode must be 'max' or 'min', got {mode!r}")
        return Objective(metric, mode)
    if isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item):
        metric, mode = item[0].strip(), item[1].strip().lower()
        if not metric:
            raise ObjectiveSpecError(f"bad objective {list(item)!r}: empty metric name")
        if mode not in MODES:
            raise ObjectiveSpecError(f"bad objective {list(item)!r}: mode must be 'max' or 'min', got {mode!r}")
        return Objective(metric, mode)
    raise ObjectiveSpecError(
        f"bad objective {item!r}: expected a 'METRIC:max|min' string or a [metric, mode] pair"
    )


def parse_objectives(spec: str | Iterable[object]) -> list[Objective]:
    """Parse objectives from ``"val/acc:max,perf/train_tok_s:max"``, a list of such strings,
    a list of ``[metric, mode]`` pairs (the sweep's ``hqlt.objectives`` tag format) or :class:`Objective` s.

    The mode is split off at the *last* ``:`` so metric names may contain ``/`` and ``@``.
    Raises :class:`ObjectiveSpecError` (a ``ValueError``) with a one-line message on bad input:
    empty spec, missing/unknown mode, empty metric, duplicated metric.
    """
    if spec is None:
        raise ObjectiveSpecError("no objectives given")
    if isinstance(spec, str):
        items: list[object] = [s for s in (p.strip() for p in spec.split(",")) if s]
        if not items:
            raise ObjectiveSpecError(f"no objectives in {spec!r}: expected e.g. 'val/acc:max,perf/train_tok_s:max'")
    else:
        items = []
        for x in spec:
            # a list of strings may itself contain comma-joined specs ("a:max,b:min")
            if isinstance(x, str) and "," in x:
                items.extend(s for s in (p.strip() for p in x.split(",")) if s)
            else:
                items.append(x)
        if not items:
            raise ObjectiveSpecError("no objectives given")
    objectives = [_parse_one(x) for x in items]
    seen: set[str] = set()
    for o in objectives:
        if o.metric in seen:
            raise ObjectiveSpecError(f"objective {o.metric!r} given more than once")
        seen.add(o.metric)
    return objectives


def objectives_from_tag(value: str | None) -> list[Objective]:
    """Decode the parent run's ``hqlt.objectives`` tag (JSON list of ``[metric, "max"|"min"]`` pairs).

    Also accepts the ``"metric:mode,..."`` string form. Raises :class:`ObjectiveSpecError` if missing/bad.
    """
    if value is None or not str(value).strip():
        raise ObjectiveSpecError(f"the sweep's parent run has no '{OBJECTIVES_TAG}' tag; pass objectives explicitly")
    try:
        decoded = json.loads(value)
    except (TypeError, ValueError):
        decoded = value  # maybe "a:max,b:min"
    if isinstance(decoded, dict):  # tolerate {"val/acc": "max", ...}
        decoded = list(decoded.items())
    try:
        return parse_objectives(decoded)
    except ObjectiveSpecError as e:
        raise ObjectiveSpecError(f"bad '{OBJECTIVES_TAG}' tag {value!r}: {e}") from None


def normalize_modes(modes: str | Sequence[str] | None, n_objectives: int) -> list[str]:
    """Broadcast/validate modes: ``None`` → all ``max``; one string → repeated; else one per objective."""
    if modes is None:
        return ["max"] * n_objectives
    if isinstance(modes, str):
        modes = [modes] * n_objectives
    modes = [str(m).strip().lower() for m in modes]
    if len(modes) != n_objectives:
        raise ValueError(f"got {len(modes)} modes for {n_objectives} objectives")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"mode must be 'max' or 'min', got {m!r}")
    return modes


def as_matrix(points: object) -> np.ndarray:
    """Points → float ``[N, M]`` array; ``None`` becomes NaN. An empty input gives shape ``(0, 0)``."""
    if isinstance(points, np.ndarray):
        arr = points.astype(float, copy=True)
    else:
        rows = [[np.nan if v is None else v for v in p] for p in points]
        if not rows:
            return np.zeros((0, 0))
        arr = np.asarray(rows, dtype=float)
    if arr.ndim == 1:  # a single objective given as a flat list
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"points must be a 2-D array-like [N, M], got shape {arr.shape}")
    return arr


def orient(points: object, modes: str | Sequence[str] | None = None) -> np.ndarray:
    """Return a float copy of ``points`` with ``min`` columns negated (so larger is better everywhere)."""
    arr = as_matrix(points)
    if arr.size == 0:
        return arr
    signs = np.array([1.0 if m == "max" else -1.0 for m in normalize_modes(modes, arr.shape[1])])
    return arr * signs


# ----------------------------------------------------------------------------------------------- labels

_UNIT_SUFFIXES = (  # (suffix, unit) — the first match wins
    ("_tok_s", "tokens/s"),
    ("_tokens_s", "tokens/s"),
    ("_mb", "MB"),
    ("_gb", "GB"),
    ("_bytes", "bytes"),
    ("_ms", "ms"),
    ("_s", "s"),
    ("_flops", "FLOPs"),
)

_PREFIX_WORDS = {"val": "validation", "train": "training", "test": "test", "perf": "", "model": ""}


def metric_label(metric: str) -> str:
    """A human-readable label with units derived from the metric name.

    ``val/acc`` → "validation accuracy", ``perf/train_tok_s`` → "throughput (tokens/s)",
    ``model/params`` → "parameters", ``val/acc@len40-256`` → "validation accuracy @ len40-256",
    unknown names fall back to the words of the name plus a unit guessed from the suffix.
    """
    if metric in METRIC_LABELS:
        return METRIC_LABELS[metric]
    if "@" in metric:
        base, slice_ = metric.split("@", 1)
        return f"{metric_label(base)} @ {slice_}"
    prefix, _, leaf = metric.rpartition("/")
    unit = ""
    for suffix, u in _UNIT_SUFFIXES:
        if leaf.endswith(suffix) and len(leaf) > len(suffix):
            leaf, unit = leaf[: -len(suffix)], u
            break
    words = leaf.replace("_", " ").strip()
    words = {"acc": "accuracy", "params": "parameters", "mem": "memory"}.get(words, words)
    head = _PREFIX_WORDS.get(prefix.split("/")[-1], prefix.replace("/", " ")) if prefix else ""
    label = f"{head} {words}".strip() if head else words
    return f"{label} ({unit})" if unit else label


def axis_label(objective: Objective) -> str:
    """``metric_label`` plus the direction: "validation accuracy ↑ (higher is better)"."""
    arrow = "↑ higher is better" if objective.mode == "max" else "↓ lower is better"
    return f"{metric_label(objective.metric)}  [{arrow}]"


def is_accuracy_like(metric: str) -> bool:
    """True for accuracy metrics (``val/acc``, ``val/acc_scaled``, ``val/acc@slice``, ``.../accuracy``)."""
    leaf = metric.rsplit("/", 1)[-1].split("@", 1)[0].lower()
    return leaf == "acc" or leaf.startswith("acc_") or leaf.startswith("accuracy")


def finite(x: object) -> bool:
    try:
        return x is not None and math.isfinite(float(x))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
