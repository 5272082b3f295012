"""hqlt.reports plots and tables on synthetic trial frames (no MLflow store needed)."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from hqlt.reports.objectives import parse_objectives
from hqlt.reports.plots import hypervolume_png, pareto_html, pareto_png, staircase
from hqlt.reports.report import rank_trials
from hqlt.reports.tables import front_csv, front_markdown, front_table, select_key_params, status_counts


def _frame(n=30, seed=0, three=False):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        status = "completed"
        if i % 10 == 7:
            status = "failed"
        elif i % 10 == 8:
            status = "pruned"
        elif i == 9:
            status = "infeasible"
        acc = float(rng.uniform(0.4, 0.95))
        row = {
            "run_id": f"run{i:03d}",
            "trial_id": f"t{i:03d}",
            "arch": f"S{2 ** (i % 6 + 2)}-dn{i % 2 + 1}-{'vec' if i % 3 else 'sum'}",
            "status": status,
            "baseline": "",
            "start_time": pd.Timestamp("2026-01-01") + pd.Timedelta(seconds=i),
            "metrics.val/acc": acc if status != "failed" else np.nan,
            "metrics.perf/train_tok_s": float(rng.uniform(1e4, 2e5)) if status != "failed" else np.nan,
            "metrics.model/params": float(rng.uniform(1e6, 5e7)),
            "params.model.mixer.kv.window": int(2 ** (i % 6 + 2)),
            "params.model.mixer.mix": "vector" if i % 3 else "sum",
            "params.train.lr": 1e-3,
            "params.train.seed": i,
        }
        rows.append(row)
    rows[0].update(arch="T", baseline="transformer")
    rows[1].update(arch="dn2", baseline="deltanet")
    objs = parse_objectives(
        "val/acc:max,perf/train_tok_s:max" + (",model/params:min" if three else "")
    )
    return rank_trials(pd.DataFrame(rows), objs), objs


def test_rank_trials_excludes_non_completed():
    df, objs = _frame()
    excluded = df[df["status"] != "completed"]
    assert excluded["pareto_rank"].isna().all() and len(excluded) > 0
    assert df.loc[df["status"] == "completed", "pareto_rank"].notna().all()
    # pruned trials have metrics but are still excluded
    assert df.loc[df["status"] == "pruned", "metrics.val/acc"].notna().all()
    assert status_counts(df) == {"completed": 23, "failed": 3, "pruned": 3, "infeasible": 1}


def test_rank_trials_supersedes_duplicate_trial_ids():
    df, objs = _frame(6)
    dup = df.iloc[[2]].copy()
    dup["run_id"] = "run-dup"
    dup["status"] = "failed"
    dup["start_time"] = dup["start_time"] + pd.Timedelta(hours=1)
    both = pd.concat([df.drop(columns=["pareto_rank", "dominated_by"]), dup], ignore_index=True)
    ranked = rank_trials(both, objs)
    assert ranked.loc[ranked["run_id"] == "run-dup", "status"].item() == "superseded"
    assert ranked.loc[ranked["run_id"] == "run002", "pareto_rank"].notna().item()


def test_staircase_inner_corners_and_modes():
    # max/max: from the highest-y point down, then right
    sx, sy = staircase([1, 2, 3], [3, 2, 1], "max", "max")
    assert sx.tolist() == [1, 1, 2, 2, 3] and sy.tolist() == [3, 2, 2, 1, 1]
    # x minimised (e.g. params), y maximised: the front rises with x
    sx, sy = staircase([1, 2], [0.5, 0.9], "min", "max")
    assert sx.tolist() == [2, 2, 1] and sy.tolist() == [0.9, 0.5, 0.5]


@pytest.mark.parametrize("three", [False, True])
def test_pareto_png_and_html(tmp_path, three):
    import matplotlib.image as mpimg

    df, objs = _frame(three=three)
    png = pareto_png(df, objs, tmp_path / "p.png", title="unit-sweep")
    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] > 500 and img.shape[1] > 800
    assert img[..., :3].std() > 0.05
    # the front colour (orange, #ff7f0e) is present
    rgb = img[..., :3]
    orange = (np.abs(rgb[..., 0] - 1.0) < 0.05) & (np.abs(rgb[..., 1] - 0.5) < 0.06) & (rgb[..., 2] < 0.15)
    assert orange.sum() > 200

    path = pareto_html(df, objs, tmp_path / "p.html", title="unit-sweep")
    text = path.read_text()
    assert "<script" in text and len(text) > 1_000_000  # plotly.js inlined -> works offline
    assert "cdn.plot.ly" not in text.split("</script>")[-1]
    front = df[df["pareto_rank"] == 0]
    for arch in front["arch"]:
        assert arch in text
    # hover text carries objectives and config params (plotly escapes '/' and '<' in its JSON);
    # x/y values are plain JSON numbers
    text = text.replace("\\u002f", "/").replace("\\u003c", "<").replace("\\u003e", ">")
    assert "model.mixer.kv.window = " in text and "val/acc (max)" in text
    assert "Transformer baseline" in text and "DeltaNet baseline" in text
    x0 = float(front["metrics.perf/train_tok_s"].iloc[0])
    assert re.search(re.escape(json.dumps(x0)), text)
    if three:
        assert "Viridis" in text


def test_single_objective_plots(tmp_path):
    import matplotlib.image as mpimg

    df, _ = _frame(12)
    objs = parse_objectives("val/acc:max")
    df = rank_trials(df.drop(columns=["pareto_rank", "dominated_by"]), objs)
    assert int((df["pareto_rank"] == 0).sum()) == 1
    assert mpimg.imread(pareto_png(df, objs, tmp_path / "one.png")).shape[0] > 400
    assert "ranked trial (start order)" in pareto_html(df, objs, tmp_path / "one.html").read_text()


def test_hypervolume_png(tmp_path):
    import matplotlib.image as mpimg

    g = [0.0, 0.5, 0.5, 0.7, 0.7, 1.0]
    p = hypervolume_png(g, tmp_path / "hv.png", objectives=parse_objectives("a:max,b:min"), reference=[0, 1])
    img = mpimg.imread(p)
    assert img.shape[0] > 300 and img.shape[1] > 500 and img[..., :3].std() > 0.02
    assert mpimg.imread(hypervolume_png([], tmp_path / "empty.png")).shape[0] > 100


def test_tables(tmp_path):
    df, objs = _frame()
    text = front_table(df, objs, title="unit")
    lines = text.splitlines()
    assert lines[0] == "unit" and lines[1].split()[:2] == ["rank", "arch"]
    n_front = int((df["pareto_rank"] == 0).sum())
    assert len(lines) == 1 + 2 + n_front + 1
    assert lines[-1].startswith(f"30 trials: 23 completed (23 ranked, front {n_front}), 3 failed, 3 pruned, 1 infeasible")
    assert lines[-1].endswith("; 7 excluded from the ranking")
    assert "kv.window" in lines[1] and "seed" not in lines[1] and "lr" not in lines[1]  # constant/bookkeeping out
    assert select_key_params(df[df["status"] == "completed"]) == [
        "params.model.mixer.kv.window", "params.model.mixer.mix"]
    md = front_markdown(df, objs, max_rank=1)
    assert sum(line.startswith("| ") for line in md.splitlines()) == 1 + int((df["pareto_rank"] <= 1).sum())
    csv = front_csv(df, objs)
    back = pd.read_csv(pd.io.common.StringIO(csv))
    assert len(back) == n_front and set(back["pareto_rank"]) == {0}
    assert "val/acc" in back.columns and "model.mixer.kv.window" in back.columns
