"""Non-dominated sorting for any number of objectives, each maximised or minimised.

Definitions (after orienting: ``min`` columns are negated so larger is better everywhere):

* ``a`` dominates ``b`` iff ``a >= b`` in every objective and ``a > b`` in at least one.
  Identical points therefore never dominate each other and always share a rank.
* rank 0 is the set of points no valid point dominates (the Pareto front), rank 1 the front of what is
  left after removing rank 0, and so on ("full" ranks, as in NSGA-II's fast non-dominated sort).
* A point with any NaN, ±inf or ``None`` coordinate is *excluded*: its rank is ``None`` and it neither
  dominates nor is dominated by anything.

Complexity: O(M·N²) time; memory is bounded by comparing in blocks of rows.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .objectives import as_matrix, orient

__all__ = ["dominates", "domination_matrix", "non_dominated_sort", "pareto_front", "domination_counts", "valid_mask"]

_BLOCK_ELEMS = 8_000_000  # max rows*N*M booleans materialised at once


def dominates(a: Sequence[float], b: Sequence[float], modes: str | Sequence[str] | None = None) -> bool:
    """True iff point ``a`` dominates point ``b`` under ``modes`` (default: all ``max``)."""
    o = orient([list(a), list(b)], modes)
    return bool(np.all(o[0] >= o[1]) and np.any(o[0] > o[1]))


def valid_mask(points: object) -> np.ndarray:
    """Boolean mask of the rows whose coordinates are all finite."""
    arr = as_matrix(points)
    if arr.size == 0:
        return np.zeros(arr.shape[0], dtype=bool)
    return np.all(np.isfinite(arr), axis=1)


def domination_matrix(oriented: np.ndarray) -> np.ndarray:
    """``D[i, j]`` is True iff row ``i`` dominates row ``j`` (rows already oriented and finite)."""
    n, m = oriented.shape
    out = np.zeros((n, n), dtype=bool)
    if n == 0:
        return out
    block = max(1, _BLOCK_ELEMS // max(1, n * max(m, 1)))
    for s in range(0, n, block):
        a = oriented[s : s + block, None, :]  # [b, 1, m]
        b = oriented[None, :, :]  # [1, n, m]
        out[s : s + block] = np.all(a >= b, axis=2) & np.any(a > b, axis=2)
    return out


def _ranks_from_matrix(dom: np.ndarray) -> np.ndarray:
    n = dom.shape[0]
    ranks = np.full(n, -1, dtype=int)
    remaining_dominators = dom.sum(axis=0).astype(int)  # how many (unranked) points dominate j
    unranked = np.ones(n, dtype=bool)
    rank = 0
    while unranked.any():
        front = unranked & (remaining_dominators == 0)
        if not front.any():  # impossible for a strict partial order; guard against float weirdness
            raise RuntimeError("non-dominated sorting did not converge")
        ranks[front] = rank
        unranked &= ~front
        remaining_dominators -= dom[front].sum(axis=0).astype(int)
        rank += 1
    return ranks


def non_dominated_sort(points: object, modes: str | Sequence[str] | None = None) -> list[int | None]:
    """Pareto rank of every point (0 = first front); ``None`` for points with NaN/inf/missing values.

    ``points``: ``[N, M]`` array-like (``None`` allowed as a missing value); ``modes``: one of
    ``"max"``/``"min"`` per objective, a single mode for all, or ``None`` (= all ``max``).
    """
    arr = orient(points, modes)
    n = arr.shape[0]
    if n == 0:
        return []
    ok = np.all(np.isfinite(arr), axis=1)
    result: list[int | None] = [None] * n
    idx = np.flatnonzero(ok)
    if idx.size:
        ranks = _ranks_from_matrix(domination_matrix(arr[idx]))
        for i, r in zip(idx.tolist(), ranks.tolist()):
            result[i] = int(r)
    return result


def domination_counts(points: object, modes: str | Sequence[str] | None = None) -> list[int | None]:
    """For every point, how many valid points dominate it (0 on the first front; ``None`` if excluded)."""
    arr = orient(points, modes)
    n = arr.shape[0]
    if n == 0:
        return []
    ok = np.all(np.isfinite(arr), axis=1)
    result: list[int | None] = [None] * n
    idx = np.flatnonzero(ok)
    if idx.size:
        counts = domination_matrix(arr[idx]).sum(axis=0)
        for i, c in zip(idx.tolist(), counts.tolist()):
            result[i] = int(c)
    return result


def pareto_front(points: object, modes: str | Sequence[str] | None = None) -> list[int]:
    """Indices of the first front (rank 0), in input order."""
    return [i for i, r in enumerate(non_dominated_sort(points, modes)) if r == 0]
