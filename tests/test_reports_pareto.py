"""hqlt.reports: non-dominated sorting, hypervolume, objectives parsing (pure numpy, fast)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from hqlt.reports.hypervolume import default_reference, hypervolume, hypervolume_growth
from hqlt.reports.objectives import (
    Objective,
    ObjectiveSpecError,
    is_accuracy_like,
    metric_label,
    objectives_from_tag,
    parse_objectives,
)
from hqlt.reports.pareto import dominates, domination_counts, non_dominated_sort, pareto_front


# ------------------------------------------------------------------------------------------ brute force


def _bf_dominates(a, b, modes):
    ge = all((x >= y) if m == "max" else (x <= y) for x, y, m in zip(a, b, modes))
    gt = any((x > y) if m == "max" else (x < y) for x, y, m in zip(a, b, modes))
    return ge and gt


def _bf_ranks(points, modes):
    valid = [i for i, p in enumerate(points) if all(v is not None and math.isfinite(v) for v in p)]
    ranks = [None] * len(points)
    left = set(valid)
    r = 0
    while left:
        front = {i for i in left if not any(_bf_dominates(points[j], points[i], modes) for j in left if j != i)}
        for i in front:
            ranks[i] = r
        left -= front
        r += 1
    return ranks


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("seed", range(6))
def test_sort_matches_brute_force_with_ties_and_duplicates(m, seed):
    rng = np.random.default_rng(1000 * m + seed)
    n = int(rng.integers(20, 70))
    # few distinct levels -> many ties in single coordinates; then copy some rows -> exact duplicates
    pts = rng.integers(0, 5, size=(n, m)).astype(float)
    dup_src = rng.integers(0, n, size=n // 4)
    pts = np.vstack([pts, pts[dup_src]])
    rng.shuffle(pts)
    # a few missing / NaN entries
    pts_list = pts.tolist()
    for k in rng.integers(0, len(pts_list), size=3):
        pts_list[k][int(rng.integers(0, m))] = None if k % 2 else float("nan")
    modes = [("max", "min")[int(b)] for b in rng.integers(0, 2, size=m)]
    got = non_dominated_sort(pts_list, modes)
    want = _bf_ranks(pts_list, modes)
    assert got == want
    # identical valid points share a rank
    seen = {}
    for p, r in zip(pts_list, got):
        if r is None:
            continue
        key = tuple(p)
        assert seen.setdefault(key, r) == r
    # full ranks: every rank between 0 and the max is used
    used = sorted({r for r in got if r is not None})
    assert used == list(range(len(used)))
    # domination counts agree with brute force
    cnt = domination_counts(pts_list, modes)
    for i, p in enumerate(pts_list):
        if got[i] is None:
            assert cnt[i] is None
        else:
            want_c = sum(
                1 for j, q in enumerate(pts_list) if got[j] is not None and j != i and _bf_dominates(q, p, modes)
            )
            assert cnt[i] == want_c


def test_sort_small_cases_by_hand():
    # max/max: duplicates share rank 0; (1,0) is dominated by (1,1) (equal in x, better in y)
    assert non_dominated_sort([[1, 1], [1, 1], [1, 0], [0, 0]], ["max", "max"]) == [0, 0, 1, 2]
    # min/min flips it
    assert non_dominated_sort([[1, 1], [1, 1], [1, 0], [0, 0]], ["min", "min"]) == [2, 2, 1, 0]
    # mixed: maximise acc, minimise params
    pts = [[0.9, 100], [0.8, 50], [0.85, 100], [0.9, 120], [0.7, 50]]
    assert non_dominated_sort(pts, ["max", "min"]) == [0, 0, 1, 1, 1]
    assert pareto_front(pts, ["max", "min"]) == [0, 1]
    # missing values are excluded and do not affect anyone else
    assert non_dominated_sort([[5, None], [1, 1], [float("nan"), 9], [float("inf"), 0]]) == [None, 0, None, None]
    assert non_dominated_sort([]) == []
    assert non_dominated_sort([[3.0]]) == [0]
    assert non_dominated_sort([[1], [3], [2], [3]], "max") == [2, 0, 1, 0]
    assert dominates([1, 2], [1, 1]) and not dominates([1, 1], [1, 1]) and dominates([0, 2], [1, 2], ["min", "max"])


def test_sort_rejects_bad_modes():
    with pytest.raises(ValueError):
        non_dominated_sort([[1, 2]], ["max"])
    with pytest.raises(ValueError):
        non_dominated_sort([[1, 2]], ["max", "maximize"])


# ------------------------------------------------------------------------------------------ hypervolume


def test_hypervolume_2d_staircase_by_hand():
    # max/max, ref (0,0): boxes 3x1, 2x2, 1x3 -> union = 3 + 2 + 1 = 6
    pts = [[3, 1], [2, 2], [1, 3]]
    assert hypervolume(pts, [0, 0]) == pytest.approx(6.0)
    # a dominated point and a duplicate change nothing
    assert hypervolume(pts + [[1, 1], [2, 2]], [0, 0]) == pytest.approx(6.0)
    # min/min mirror image
    assert hypervolume([[-3, -1], [-2, -2], [-1, -3]], [0, 0], ["min", "min"]) == pytest.approx(6.0)
    # mixed: maximise acc, minimise params; ref (acc 0, params 10)
    assert hypervolume([[0.5, 2], [1.0, 6]], [0, 10], ["max", "min"]) == pytest.approx(0.5 * 8 + 0.5 * 4)
    # points not strictly better than the reference in every objective contribute nothing
    assert hypervolume([[3, 0], [0, 3], [-1, 5]], [0, 0]) == 0.0
    assert hypervolume([[3, 0], [2, 2]], [0, 0]) == pytest.approx(4.0)
    assert hypervolume([[2, 2], [np.nan, 9]], [0, 0]) == pytest.approx(4.0)
    assert hypervolume([], [0, 0]) == 0.0


def test_hypervolume_3d_boxes_by_hand():
    assert hypervolume([[1, 2, 3]], [0, 0, 0]) == pytest.approx(6.0)
    # two boxes 1x2x3 and 3x2x1 overlap in 1x2x1
    assert hypervolume([[1, 2, 3], [3, 2, 1]], [0, 0, 0]) == pytest.approx(6 + 6 - 2)
    # three unit-corner boxes: [2,1,1],[1,2,1],[1,1,2] -> 2+2+2 - 3*1 + 1 = 4
    assert hypervolume([[2, 1, 1], [1, 2, 1], [1, 1, 2]], [0, 0, 0]) == pytest.approx(4.0)
    # same with all objectives minimised and a shifted reference
    assert hypervolume([[1, 2, 3], [3, 2, 1]], [4, 4, 4], ["min"] * 3) == pytest.approx(10.0)
    # mixed modes: (max, min, max)
    assert hypervolume([[1, -2, 3], [3, -2, 1]], [0, 0, 0], ["max", "min", "max"]) == pytest.approx(10.0)
    # one point on the reference plane contributes nothing
    assert hypervolume([[1, 2, 0], [1, 1, 1]], [0, 0, 0]) == pytest.approx(1.0)
    # 4-D works too (slicing): unit hypercube corner
    assert hypervolume([[1, 1, 1, 1], [0.5, 0.5, 0.5, 2]], [0, 0, 0, 0]) == pytest.approx(1 + 0.5**3 * 1)


@pytest.mark.parametrize("seed", range(3))
def test_hypervolume_3d_vs_monte_carlo(seed):
    rng = np.random.default_rng(seed)
    # points near a concave surface: many are mutually non-dominated
    raw = rng.random((40, 3))
    pts = raw / np.linalg.norm(raw, axis=1, keepdims=True) * rng.uniform(0.8, 1.0, size=(40, 1))
    modes = ["max", "min", "max"]
    pts[:, 1] = 1.0 - pts[:, 1]  # the 2nd objective is minimised
    ref = np.array([0.0, 1.0, 0.0])
    hv = hypervolume(pts, ref, modes)
    # Monte Carlo in the box [0,1]x[0,1]x[0,1] (oriented: every point lies inside it)
    samples = rng.random((200_000, 3))
    o = pts.copy()
    o[:, 1] = -o[:, 1]
    s = samples.copy()
    s[:, 1] = -s[:, 1]
    dominated = np.zeros(len(s), bool)
    for p in o:
        dominated |= np.all(s <= p, axis=1)
    est = dominated.mean()
    assert hv == pytest.approx(est, abs=0.01, rel=0.02)
    assert 0.1 < hv < 1.0


@pytest.mark.parametrize("m", [2, 3])
def test_growth_non_decreasing_and_ends_at_total(m):
    rng = np.random.default_rng(7 + m)
    pts = rng.random((60, m)).tolist()
    for k in (3, 10, 11):
        pts[k] = [float("nan")] * m  # failed trials
    modes = ["max"] + ["min"] * (m - 1)
    ref = default_reference(pts, modes)
    g = hypervolume_growth(pts, modes, reference=ref)
    assert len(g) == len(pts)
    assert all(b >= a - 1e-12 for a, b in zip(g, g[1:]))
    assert g[-1] == pytest.approx(hypervolume(pts, ref, modes))
    assert g[3] == g[2]  # a failed trial adds nothing
    for k in (5, 20, 40):  # every prefix is the HV of the prefix
        assert g[k] == pytest.approx(hypervolume(pts[: k + 1], ref, modes))
    # default reference is applied when none is given and is the same for all prefixes
    assert hypervolume_growth(pts, modes)[-1] == pytest.approx(g[-1])
    assert hypervolume_growth([[None, None]], ["max", "max"]) == [0.0]


def test_default_reference_rule():
    pts = [[0.9, 1000, 5e6], [0.5, 3000, 1e6], [float("nan"), 1e9, 1]]
    modes = ["max", "max", "min"]
    ref = default_reference(pts, modes, ["val/acc", "perf/train_tok_s", "model/params"])
    assert ref[0] == 0.0  # accuracy-like and maximised -> 0
    assert ref[1] == pytest.approx(1000 - 0.01 * 2000)  # worst minus 1% of the range
    assert ref[2] == pytest.approx(5e6 + 0.01 * 4e6)  # minimised: worst plus 1% of the range
    # without names the accuracy rule is off; constant column -> 1% of |value|
    ref2 = default_reference([[0.5, 7.0], [0.9, 7.0]], ["max", "min"])
    assert ref2 == pytest.approx([0.5 - 0.004, 7.07])
    # every valid point is strictly better than the default reference -> all contribute
    assert hypervolume([[0.5, 7.0]], ref2, ["max", "min"]) > 0
    with pytest.raises(ValueError):
        default_reference([[np.nan, 1.0]], ["max", "max"])


# ------------------------------------------------------------------------------------------ objectives


def test_parse_objectives_forms_and_errors():
    want = [Objective("val/acc", "max"), Objective("perf/train_tok_s", "max")]
    assert parse_objectives("val/acc:max,perf/train_tok_s:max") == want
    assert parse_objectives(["val/acc:max", "perf/train_tok_s:MAX"]) == want
    assert parse_objectives([["val/acc", "max"], ["perf/train_tok_s", "max"]]) == want
    assert parse_objectives("val/acc@len40-256:max")[0].metric == "val/acc@len40-256"
    assert objectives_from_tag('[["val/acc","max"],["model/params","min"]]')[1] == Objective("model/params", "min")
    for bad in ["", "val/acc", "val/acc:maximum", ":max", "a:max,a:min", ",,"]:
        with pytest.raises(ObjectiveSpecError):
            parse_objectives(bad)
    with pytest.raises(ObjectiveSpecError, match="hqlt.objectives"):
        objectives_from_tag(None)
    with pytest.raises(ObjectiveSpecError):
        objectives_from_tag('[["val/acc","up"]]')
    with pytest.raises(ObjectiveSpecError, match="mode must be"):
        parse_objectives([Objective("val/acc", "up")])  # the spec's Objective does not check its fields


def test_reports_objective_is_the_specs():
    from hqlt.search_space import Objective as SpecObjective

    assert Objective is SpecObjective and str(Objective("val/acc", "min")) == "val/acc:min"


def test_metric_labels():
    assert metric_label("perf/train_tok_s") == "throughput (tokens/s)"
    assert metric_label("val/acc") == "validation accuracy"
    assert metric_label("model/params") == "parameters"
    assert metric_label("perf/peak_mem_mb") == "peak memory (MB)"
    assert metric_label("val/acc@len40-256") == "validation accuracy @ len40-256"
    assert metric_label("perf/decode_latency_ms") == "decode latency (ms)"
    assert is_accuracy_like("val/acc_scaled") and is_accuracy_like("val/acc@x") and not is_accuracy_like("val/loss")


def test_brute_force_helper_itself():
    # guard the oracle: on a tiny exhaustive grid every point of rank r is dominated by one of rank r-1
    pts = [list(p) for p in itertools.product([0, 1, 2], repeat=2)]
    ranks = _bf_ranks(pts, ["max", "max"])
    assert ranks[pts.index([2, 2])] == 0 and ranks[pts.index([0, 0])] == 4
