"""Seed statistics (hqlt.reports.seed_stats): the spread of an objective over each arm's seeds, the ordering
statements ("separated" only when every seed of one arm beats every seed of the other), the scored checkpoint
and per-length accuracy — on frames built by hand and end to end through `hqlt report DIR --seed-stats` on an
MLflow SQLite store built in the test."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import time
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from hqlt.reports.objectives import Objective  # noqa: E402
from hqlt.reports.seed_stats import (NOT_RECORDED, SEED_STATS_MD, compare, ordering, seed_stats,  # noqa: E402
                                     seed_stats_markdown)
from hqlt.search_space.vocabulary import (ARCH_TAG, CHECKPOINT_TAG, COMPLETED, FAILED, OBJECTIVES_TAG,  # noqa: E402
                                          PARENT_TAG, ROLE_SWEEP, ROLE_TAG, ROLE_TRIAL, SEED_TAG, SELECTED_SEED,
                                          SELECTED_STEP, STATUS_TAG, SWEEP_NAME_TAG, TEST_ACC_SCALED,
                                          TEST_SLICE_METRIC_PREFIX, TRIAL_ID_TAG, seed_metric, seed_stat_metric,
                                          sqlite_uri, to_mlflow_metric)

ACC = Objective(TEST_ACC_SCALED, "max")
BPB = Objective("test/bpb", "min")


# ------------------------------------------------------------------------------------------ frames by hand
def _row(name: str, values, *, metric: str = TEST_ACC_SCALED, group: str = "all", status: str = COMPLETED,
         recorded: dict | None = None, checkpoint: str | None = None, extra: dict | None = None) -> dict:
    row = {"run_id": f"run-{name}", "run_name": name, "trial_id": f"t-{name}", "arch": name, "status": status,
           "seed": ",".join(str(i) for i in range(len(values))), "group": group}
    for i, v in enumerate(values):
        row[f"metrics.{seed_metric(i, metric)}"] = v
    for stat, v in (recorded or {}).items():
        row[f"metrics.{seed_stat_metric(stat, metric)}"] = v
    if checkpoint is not None:
        row[f"tags.{CHECKPOINT_TAG}"] = checkpoint
    row.update(extra or {})
    return row


def _frame(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


def _arms(df: pd.DataFrame, objective: Objective = ACC, group: str = "all") -> dict:
    return {a.label: a for a in seed_stats(df, objective)[group]}


def test_statistics_of_known_seed_values():
    df = _frame(_row("A", [0.5, 0.9, 0.7]), _row("B", [0.2, 0.1, 0.4, 0.3]))
    arms = _arms(df)
    a, b = arms["A"], arms["B"]
    assert (a.n, a.best, a.median, a.lo, a.hi) == (3, 0.9, 0.7, 0.5, 0.9)
    assert a.values == [0.5, 0.9, 0.7] and a.seed_indices == [0, 1, 2]
    assert (b.n, b.best, b.median, b.lo, b.hi) == (4, 0.4, pytest.approx(0.25), 0.1, 0.4)  # even count: mean of mid
    assert not a.recorded_stats
    assert [x.label for x in seed_stats(df, ACC)["all"]] == ["A", "B"]  # best median first
    # a min objective: best is the lowest seed, order is lowest median first
    lo = _arms(_frame(_row("A", [1.5, 1.1, 1.3], metric=BPB.metric), _row("B", [1.0, 1.2, 1.4], metric=BPB.metric)), BPB)
    assert lo["A"].best == 1.1 and lo["B"].best == 1.0
    assert [x.label for x in seed_stats(_frame(_row("A", [1.5, 1.1, 1.3], metric=BPB.metric),
                                               _row("B", [1.0, 1.2, 1.4], metric=BPB.metric)), BPB)["all"]] == ["B", "A"]


def test_recorded_seed_statistics_win_and_failed_seeds_are_counted():
    """The trial's own seeds_min|median|max (over its completed seeds) are used when logged; a seed without a
    value (failed before the test set) shows as `2 of 3`."""
    row = _row("A", [0.5, 0.9], recorded={"min": 0.5, "median": 0.7, "max": 0.9})
    row["seed"] = "0,1,2"
    arms = _arms(_frame(row))
    a = arms["A"]
    assert a.recorded_stats and a.median == 0.7 and a.n == 2 and a.n_run == 3
    assert "| 2 of 3 |" in seed_stats_markdown(_frame(row), ACC)


def test_not_completed_and_missing_values_are_left_out():
    df = _frame(_row("A", [0.5, 0.6]), _row("F", [0.9, 0.95], status=FAILED), _row("N", [math.nan, math.nan]))
    assert list(_arms(df)) == ["A"]


@pytest.mark.parametrize("mode", ["max", "min"])
def test_separation_rule_and_its_mirror(mode):
    sign = 1.0 if mode == "max" else -1.0  # the min case is the max case mirrored

    def arm(name, values):
        return _row(name, [sign * v for v in values])

    obj = Objective(TEST_ACC_SCALED, mode)
    arms = _arms(_frame(arm("hi", [0.8, 0.9, 0.85]), arm("mid", [0.5, 0.7, 0.6]), arm("tie", [0.3, 0.5, 0.4]),
                        arm("low", [0.1, 0.2, 0.15])), obj)
    assert compare(arms["hi"], arms["mid"], mode) == 1       # worst of hi 0.8 beats best of mid 0.7
    assert compare(arms["mid"], arms["hi"], mode) == -1
    assert compare(arms["mid"], arms["tie"], mode) == 0      # touching: 0.5 is both mid's worst and tie's best
    assert compare(arms["tie"], arms["low"], mode) == 1
    lines = ordering(list(arms.values()), obj)
    better = ">" if mode == "max" else "<"
    assert lines[0].startswith(f"`hi` {better} `mid` — separated")
    assert any(s.startswith("`mid` ≈ `tie` — not separated") for s in lines)
    assert sum("— separated (" in s for s in lines) == 5 and sum("— not separated (" in s for s in lines) == 1
    assert len(lines) == 6  # every pair once


def test_overlap_with_a_better_median_is_not_separated():
    arms = _arms(_frame(_row("A", [0.95, 0.2, 0.9]), _row("B", [0.3, 0.25, 0.35])))
    assert arms["A"].median > arms["B"].hi
    assert compare(arms["A"], arms["B"], "max") == 0  # A's worst seed 0.2 is below B's best 0.35
    assert ordering(list(arms.values()), ACC) == [
        "`A` ≈ `B` — not separated (seed ranges [0.2000, 0.9500] and [0.2500, 0.3500] overlap)"]


def test_identical_values_tie():
    arms = _arms(_frame(_row("A", [0.5, 0.5]), _row("B", [0.5, 0.5])))
    assert compare(arms["A"], arms["B"], "max") == 0 and compare(arms["A"], arms["B"], "min") == 0


def test_single_seed_arm_is_not_tested():
    arms = _arms(_frame(_row("A", [0.9, 0.95]), _row("one", [0.1])))
    assert arms["one"].n == 1 and compare(arms["A"], arms["one"], "max") is None
    lines = ordering(list(arms.values()), ACC)
    assert lines == ["single seed, not tested (not ordered against any arm): `one` 0.1000"]
    md = seed_stats_markdown(_frame(_row("A", [0.9, 0.95]), _row("one", [0.1])), ACC)
    assert "single seed, not tested" in md and "`one` > " not in md and "`A` > `one`" not in md


def test_arm_names_that_collide_show_what_differs():
    def row(tid, d_model):
        r = _row("T", [0.5, 0.6], extra={"params.model.d_model": d_model, "params.hqlt.optuna_number": tid})
        r.update(trial_id=tid, run_id=f"run-{tid}")
        return r

    labels = sorted(_arms(_frame(row("a", 64), row("b", 128))))
    assert labels == ["T d_model=128", "T d_model=64"]


def test_groups_are_apart():
    df = _frame(_row("A", [0.9, 0.95], group="parity"), _row("B", [0.1, 0.2], group="mod_arith"))
    stats = seed_stats(df, ACC)
    assert list(stats) == ["mod_arith", "parity"] and len(stats["parity"]) == 1
    md = seed_stats_markdown(df, ACC)
    assert "### parity" in md and "### mod_arith" in md and "`A` > `B`" not in md  # never across tasks


# ------------------------------------------------------------------------------------------ end to end
mlflow = pytest.importorskip("mlflow")
from hqlt.cli import report as cli  # noqa: E402

SWEEP = "seed-sweep"
OBJECTIVES = [[TEST_ACC_SCALED, "max"], ["model/params", "min"]]
SLICES = ("len_3-40", "len_41-64", "len_129-256")
# (arch, task, per-seed accuracies, checkpoint tag, selected step, selected seed, params per seed)
TRIALS = [
    ("S8-dn2-vec", "parity", [0.94, 0.99, 0.98], "best_val", 1200, 1, [1000, 1000, 1000]),
    ("dn2", "parity", [0.30, 0.95, 0.90], "final", 2000, 1, [900, 900, 900]),
    ("T", "parity", [0.05, 0.10, 0.02], None, None, 1, [800, 800, 800]),  # an older run: no checkpoint tag
    ("dn1", "parity", [0.40], "final", 2000, 0, [700]),  # one seed
    ("T", "mod_arith", [0.2, 0.3, 0.25], "final", 2000, 1, [800, 800, 800]),
]


def build_store(folder: Path) -> str:
    from mlflow.entities import Metric, Param

    folder.mkdir(parents=True, exist_ok=True)
    uri = sqlite_uri(folder)
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment(SWEEP, artifact_location=(folder / "artifacts").resolve().as_uri())
    parent = client.create_run(exp, run_name=SWEEP, tags={ROLE_TAG: ROLE_SWEEP, SWEEP_NAME_TAG: SWEEP,
                                                          OBJECTIVES_TAG: json.dumps(OBJECTIVES)})
    t0 = int(time.time() * 1000)
    for i, (arch, task, accs, ckpt, step, sel, params) in enumerate(TRIALS):
        tags = {PARENT_TAG: parent.info.run_id, ROLE_TAG: ROLE_TRIAL, STATUS_TAG: COMPLETED, ARCH_TAG: arch,
                TRIAL_ID_TAG: f"trial_{i:05d}", SEED_TAG: ",".join(str(s) for s in range(len(accs)))}
        if ckpt:
            tags[CHECKPOINT_TAG] = ckpt
        rid = client.create_run(exp, run_name=f"{arch} · {task}", tags=tags, start_time=t0 + i).info.run_id
        values = {TEST_ACC_SCALED: max(accs), "model/params": min(params), SELECTED_SEED: sel}
        for obj, per in ((TEST_ACC_SCALED, accs), ("model/params", params)):
            values.update({seed_metric(s, obj): v for s, v in enumerate(per)})
            ordered = sorted(per)
            values.update({seed_stat_metric("min", obj): ordered[0], seed_stat_metric("max", obj): ordered[-1],
                           seed_stat_metric("median", obj): ordered[len(ordered) // 2]})
        if step is not None:
            values[SELECTED_STEP] = step
        for k, label in enumerate(SLICES):  # the selected seed's per-length accuracy, stored as MLflow names it
            values[to_mlflow_metric(TEST_SLICE_METRIC_PREFIX + label)] = round(accs[sel] - 0.1 * k, 4)
        client.log_batch(rid, metrics=[Metric(k, float(v), t0, 0) for k, v in values.items()],
                         params=[Param("task.name", task), Param("model.layers", arch)])
        client.set_terminated(rid, "FINISHED")
    client.set_terminated(parent.info.run_id, "FINISHED")
    (folder / "sweep.json").write_text(json.dumps({"name": SWEEP, "objectives": OBJECTIVES}))
    return uri


def _cli(argv) -> tuple[int, str, str]:
    parser = cli.configure_parser(argparse.ArgumentParser(prog="hqlt report"))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.run(parser.parse_args(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seeds") / SWEEP
    build_store(folder)
    return folder


@pytest.fixture(scope="module")
def reported(sweep):
    return _cli([str(sweep), "--seed-stats", "--no-log"])


def _section(out: str, group: str) -> str:
    return out.split(f"### {group}")[1].split("### ")[0]


def test_cli_prints_the_seed_statistics(reported):
    rc, out, err = reported
    assert rc == 0, err
    assert f"## Seed statistics: {TEST_ACC_SCALED} (max)" in out  # the sweep's first objective by default
    parity = _section(out, "parity")
    rows = [line for line in parity.splitlines() if line.startswith("| ") and "trial_" in line]
    assert [r.split(" | ")[0] for r in rows[:4]] == ["| S8-dn2-vec", "| dn2", "| dn1", "| T"]  # median order
    assert rows[0].startswith("| S8-dn2-vec | trial_00000 | 3 | 0.9900 | 0.9800 | 0.9400 | 0.9900 | "
                              "0.9400 / 0.9900 / 0.9800 | best_val (step 1200) |")
    assert "| dn2 | trial_00001 | 3 | 0.9500 | 0.9000 | 0.3000 | 0.9500 | 0.3000 / 0.9500 / 0.9000 | final (step 2000) |" \
        in parity
    assert f"| T | trial_00002 | 3 | 0.1000 | 0.0500 | 0.0200 | 0.1000 | 0.0500 / 0.1000 / 0.0200 | {NOT_RECORDED} |" \
        in parity
    assert "| dn1 | trial_00003 | 1 | 0.4000 |" in parity
    # orderings: S8 vs dn2 overlap (S8's 0.94 seed < dn2's 0.95), both above T; dn1 has one seed
    assert "- `S8-dn2-vec` ≈ `dn2` — not separated" in parity
    assert "- `S8-dn2-vec` > `T` — separated (S8-dn2-vec's worst seed 0.9400 > T's best seed 0.1000)" in parity
    assert "- `dn2` > `T` — separated" in parity
    assert "single seed, not tested (not ordered against any arm): `dn1` 0.4000" in parity
    assert "`dn1` >" not in parity and "> `dn1`" not in parity
    # per-length accuracy of the record (the selected seed), one column per bucket, buckets in length order
    assert "| arm | record | len_3-40 | len_41-64 | len_129-256 |" in parity
    assert "| S8-dn2-vec | seed 1 | 0.9900 | 0.8900 | 0.7900 |" in parity
    assert "| dn1 | seed 0 | 0.4000 | 0.3000 | 0.2000 |" in parity
    # the other task is a table of its own, and never compared with parity
    assert "| T | trial_00004 | 3 | 0.3000 | 0.2500 |" in _section(out, "mod_arith")


def test_report_files_hold_the_section(sweep, reported):
    rc, _, _ = reported
    assert rc == 0
    report = sweep / "report"
    text = (report / SEED_STATS_MD).read_text()
    assert text.startswith(f"## Seed statistics: {TEST_ACC_SCALED} (max)")
    assert text in (report / "front.md").read_text()
    data = json.loads((report / "report.json").read_text())["seed_stats"]
    assert data["objective"] == [TEST_ACC_SCALED, "max"]
    parity = {a["label"]: a for a in data["groups"]["parity"]["arms"]}
    assert parity["S8-dn2-vec"]["checkpoint"] == "best_val" and parity["T"]["checkpoint"] == NOT_RECORDED
    assert parity["dn2"]["values"] == [0.30, 0.95, 0.90] and parity["dn1"]["n"] == 1


def test_seed_metric_picks_another_objective_and_mirrors_the_rule(sweep, tmp_path):
    rc, out, err = _cli([str(sweep), "--seed-stats", "--no-log", "--out", str(tmp_path), "--seed-metric",
                         "model/params"])
    assert rc == 0, err
    assert "## Seed statistics: model/params (min)" in out  # the mode is the sweep's for that objective
    parity = _section(out, "parity")
    assert "- `T` < `dn2` — separated (T's worst seed 800 < dn2's best seed 900)" in parity
    rc, out, err = _cli([str(sweep), "--no-log", "--out", str(tmp_path), "--seed-metric", "test/acc"])
    assert rc == 2 and "give its mode" in err


def test_without_the_flag_nothing_is_printed_but_the_file_is_written(sweep, tmp_path):
    rc, out, err = _cli([str(sweep), "--no-log", "--out", str(tmp_path)])
    assert rc == 0, err
    assert "Seed statistics" not in out
    assert (tmp_path / SEED_STATS_MD).is_file()
