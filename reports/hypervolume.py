"""Hypervolume (the Lebesgue measure of the region dominated by a set of points and bounded by a
reference point), with per-objective modes, and its growth over the trials of a sweep.

Orientation: ``min`` objectives are negated (points *and* reference), so the computation always
maximises. Only points strictly better than the reference in **every** objective contribute; points
with NaN/inf/missing coordinates contribute nothing.

Algorithms (exact): 1-D is ``max - ref``; 2-D is a sort-and-sweep (O(N log N)); 3-D and higher use
slicing along the last objective down to the 2-D sweep (HSO; O(N^(d-1) log N)), after reducing the
input to its non-dominated subset — ample for sweep-sized fronts (hundreds of points, 2-4 objectives).

Default reference point (:func:`default_reference`), per objective, using only valid points:

* accuracy-like metrics (``val/acc``, ``val/acc_scaled``, ``val/acc@slice`` — see
  :func:`hqlt.reports.objectives.is_accuracy_like`) that are maximised and never negative: ``0``;
* everything else: the worst observed value pushed 1% of the observed range further out
  (``min - 0.01·range`` for ``max``, ``max + 0.01·range`` for ``min``); when the range is 0 the margin
  is 1% of ``|value|`` (or 0.01 if the value is 0).

The margin makes the extreme points of the front contribute a non-zero volume. Because the default
reference depends on the observed values, hypervolumes from different reports are only comparable when
the same explicit reference is given; :func:`hypervolume_growth` fixes one reference for all prefixes so
its curve is non-decreasing.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .objectives import as_matrix, is_accuracy_like, normalize_modes, orient
from .pareto import domination_matrix

__all__ = ["hypervolume", "default_reference", "hypervolume_growth"]


def _hv2d(p: np.ndarray, ref: np.ndarray) -> float:
    """2-D HV of oriented points all strictly better than ref."""
    if p.shape[0] == 0:
        return 0.0
    order = np.lexsort((-p[:, 1], -p[:, 0]))  # x descending, then y descending
    x, y = p[order, 0], p[order, 1]
    best = np.maximum.accumulate(np.concatenate(([ref[1]], y)))
    gains = np.diff(best)  # >= 0; > 0 only where a point raises the upper envelope
    return float(np.sum((x - ref[0]) * gains))


def _nondominated(p: np.ndarray) -> np.ndarray:
    if p.shape[0] <= 1:
        return p
    p = np.unique(p, axis=0)
    dom = domination_matrix(p)
    return p[~dom.any(axis=0)]


def _hv_rec(p: np.ndarray, ref: np.ndarray) -> float:
    d = p.shape[1]
    if p.shape[0] == 0:
        return 0.0
    if d == 1:
        return float(p[:, 0].max() - ref[0])
    if d == 2:
        return _hv2d(p, ref)
    p = _nondominated(p)
    z = p[:, -1]
    levels = np.unique(z)[::-1]  # descending distinct values of the last objective
    total = 0.0
    for i, lv in enumerate(levels):
        nxt = levels[i + 1] if i + 1 < len(levels) else ref[-1]
        slab = p[z >= lv, :-1]
        total += (lv - nxt) * _hv_rec(slab, ref[:-1])
    return float(total)


def hypervolume(
    points: object,
    reference: Sequence[float],
    modes: str | Sequence[str] | None = None,
) -> float:
    """Exact hypervolume of ``points`` ([N, M]) w.r.t. ``reference`` (length M) under ``modes``.

    Points not strictly better than the reference in every (oriented) objective, and points with
    non-finite coordinates, contribute nothing. Returns 0.0 for an empty input.
    """
    arr = as_matrix(points)
    ref_raw = np.asarray(reference, dtype=float).reshape(-1)
    if arr.size == 0:
        return 0.0
    m = arr.shape[1]
    if ref_raw.shape[0] != m:
        raise ValueError(f"reference has {ref_raw.shape[0]} values for {m} objectives")
    if not np.all(np.isfinite(ref_raw)):
        raise ValueError(f"reference point must be finite, got {ref_raw.tolist()}")
    modes_ = normalize_modes(modes, m)
    p = orient(arr, modes_)
    ref = orient(ref_raw[None, :], modes_)[0]
    keep = np.all(np.isfinite(p), axis=1) & np.all(p > ref, axis=1)
    return _hv_rec(p[keep], ref)


def default_reference(
    points: object,
    modes: str | Sequence[str] | None = None,
    names: Sequence[str] | None = None,
) -> list[float]:
    """The default reference point (in the objectives' own units/directions) — rule in the module doc.

    ``names`` (metric names) enable the accuracy rule; without them every objective uses the 1% margin.
    Raises ``ValueError`` when no point is fully finite.
    """
    arr = as_matrix(points)
    if arr.size == 0:
        raise ValueError("no points to derive a reference point from")
    m = arr.shape[1]
    modes_ = normalize_modes(modes, m)
    ok = np.all(np.isfinite(arr), axis=1)
    if not ok.any():
        raise ValueError("no point has finite values for every objective")
    valid = arr[ok]
    ref: list[float] = []
    for j in range(m):
        col = valid[:, j]
        lo, hi = float(col.min()), float(col.max())
        if names is not None and modes_[j] == "max" and is_accuracy_like(names[j]) and lo >= 0.0:
            ref.append(0.0)
            continue
        rng = hi - lo
        worst = lo if modes_[j] == "max" else hi
        margin = 0.01 * rng if rng > 0 else (0.01 * abs(worst) if worst != 0 else 0.01)
        ref.append(worst - margin if modes_[j] == "max" else worst + margin)
    return ref


def hypervolume_growth(
    points_in_trial_order: object,
    modes: str | Sequence[str] | None = None,
    reference: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
) -> list[float]:
    """HV of the first ``k`` points for ``k = 1..N`` (one value per input point, non-decreasing).

    Points with missing/non-finite values (e.g. failed trials) add nothing but still get an entry, so the
    curve can be drawn against the trial index. The reference is :func:`default_reference` of *all* valid
    points unless given, and is the same for every prefix.
    """
    arr = as_matrix(points_in_trial_order)
    if arr.size == 0:
        return []
    m = arr.shape[1]
    modes_ = normalize_modes(modes, m)
    ok = np.all(np.isfinite(arr), axis=1)
    if not ok.any():
        return [0.0] * arr.shape[0]
    ref_raw = np.asarray(default_reference(arr, modes_, names) if reference is None else reference, dtype=float)
    p = orient(arr, modes_)
    ref = orient(ref_raw[None, :], modes_)[0]
    out: list[float] = []
    front = np.zeros((0, m))
    hv = 0.0
    for i in range(arr.shape[0]):
        q = p[i]
        if ok[i] and np.all(q > ref):
            weakly_dominated = front.shape[0] and np.any(np.all(front >= q, axis=1))
            if not weakly_dominated:
                dominated_by_q = np.all(q >= front, axis=1) if front.shape[0] else np.zeros(0, dtype=bool)
                front = np.vstack([front[~dominated_by_q], q[None, :]])
                hv = _hv_rec(front, ref)
        out.append(hv)
    return out
