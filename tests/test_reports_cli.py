"""hqlt.reports end to end: an MLflow SQLite store built in the test, `hqlt report` (cli.run), tags,
metrics and artifacts written back; error exits; and the no-torch/no-ray import rule."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

mlflow = pytest.importorskip("mlflow")

from hqlt.cli import report as cli  # noqa: E402
from hqlt.reports import load_sweep, write_report  # noqa: E402
from hqlt.search_space.vocabulary import sqlite_uri, to_mlflow_metric  # noqa: E402

SLICE = "val/acc@len_41-64"

SWEEP = "toy-sweep"
OBJECTIVES = [["val/acc", "max"], ["perf/train_tok_s", "max"]]

# (arch, status, val/acc, tok/s, baseline, seed, params) — expected ranks under (acc max, tok/s max):
#   T .92@500, A .90@1000, B .80@2000 (twice, seeds 0/1), C .70@3000 -> rank 0
#   D .85@900 (< A), DN .60@2500 (< C)                                -> rank 1
#   F .65@800 (< D)                                                   -> rank 2
# the pruned trial would dominate everything if it were (wrongly) ranked.
TRIALS = [
    ("T", "completed", 0.92, 500.0, "transformer", 0, {"model.layers": "KKKK", "model.mixer.kv.window": 0}, 0),
    ("S64-dn2-vec", "completed", 0.90, 1000.0, "", 0, {"model.layers": "HHHH", "model.mixer.kv.window": 64}, 0),
    ("S32-dn2-sum", "completed", 0.80, 2000.0, "", 0, {"model.layers": "HHHH", "model.mixer.kv.window": 32}, 0),
    ("S32-dn2-sum", "completed", 0.80, 2000.0, "", 1, {"model.layers": "HHHH", "model.mixer.kv.window": 32}, 0),
    ("S16-dn2-sum", "completed", 0.70, 3000.0, "", 0, {"model.layers": "HKHK", "model.mixer.kv.window": 16}, 0),
    ("S64-dn1-vec", "completed", 0.85, 900.0, "", 0, {"model.layers": "HHHH", "model.mixer.kv.window": 64}, 1),
    ("dn2", "completed", 0.60, 2500.0, "deltanet", 0, {"model.layers": "FFFF", "model.mixer.kv.window": 0}, 1),
    ("S8-dn1-sum", "completed", 0.65, 800.0, "", 0, {"model.layers": "HKHK", "model.mixer.kv.window": 8}, 2),
    ("S128-dn2-vec", "failed", None, None, "", 0, {"model.layers": "HHHH", "model.mixer.kv.window": 128}, None),
    ("S4-dn1-sum", "pruned", 0.95, 5000.0, "", 0, {"model.layers": "HHHH", "model.mixer.kv.window": 4}, None),
    ("S256-dn2-vec", "infeasible", None, None, "", 0, {"model.layers": "HHHH", "model.mixer.kv.window": 256}, None),
    ("S512-dn2-vec", "oom", None, 100.0, "", 0, {"model.layers": "HHHH", "model.mixer.kv.window": 512}, None),
]
EXPECTED_HV = 2525 * 0.70 + 1525 * 0.10 + 525 * 0.10 + 25 * 0.02  # ref (acc 0, tok/s 475) — see test


def build_store(folder: Path, trials=TRIALS, name: str = SWEEP, write_spec: bool = True,
                template: Path | None = None) -> str:
    """A sweep folder with mlflow.db (parent + child runs following the mlflow_io contract).

    ``template``: an already-initialised empty MLflow DB to copy (skips MLflow's schema migrations).
    """
    from mlflow.entities import Metric, Param

    folder.mkdir(parents=True, exist_ok=True)
    if template is not None:
        shutil.copyfile(template, folder / "mlflow.db")
    uri = sqlite_uri(folder)
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment(name, artifact_location=(folder / "artifacts").resolve().as_uri())
    parent = client.create_run(exp_id, run_name=name, tags={
        "hqlt.role": "sweep", "hqlt.objectives": json.dumps(OBJECTIVES), "hqlt.sweep_name": name})
    pid = parent.info.run_id
    t0 = int(time.time() * 1000)
    for i, (arch, status, acc, tok, baseline, seed, params, _) in enumerate(trials):
        tags = {"mlflow.parentRunId": pid, "hqlt.role": "trial", "status": status, "arch": arch,
                "reason": "CUDA out of memory" if status == "oom" else ("raised" if status == "failed" else ""),
                "trial_id": f"trial_{i:05d}", "config_hash": f"h{i:03d}", "seed": str(seed)}
        if baseline:
            tags["baseline"] = baseline
        run = client.create_run(exp_id, run_name=f"{arch}-{i}", tags=tags, start_time=t0 + 1000 * i)
        rid = run.info.run_id
        metrics = []
        for step in range(3):  # train/loss per step; the latest value counts
            metrics.append(Metric("train/loss", 2.0 - 0.5 * step, t0 + i * 1000 + step, step))
        if acc is not None:
            metrics += [Metric("val/acc", acc - 0.1, t0 + i * 1000, 0), Metric("val/acc", acc, t0 + i * 1000 + 5, 1)]
            # a per-slice accuracy, stored under the name the sweep's tracking gives it (MLflow forbids '@')
            metrics += [Metric(to_mlflow_metric(SLICE), acc / 2, t0 + i * 1000 + 5, 1)]
        if tok is not None:
            metrics.append(Metric("perf/train_tok_s", tok, t0 + i * 1000, 0))
        metrics.append(Metric("model/params", 1e6 + 1e4 * i, t0, 0))
        client.log_batch(rid, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
        client.set_terminated(rid, "FINISHED" if status in ("completed", "pruned", "infeasible") else "FAILED")
    client.set_terminated(pid, "FINISHED")
    if write_spec:
        (folder / "sweep.json").write_text(json.dumps({"name": name, "objectives": OBJECTIVES}))
    return uri


def _run_cli(argv):
    parser = cli.configure_parser(argparse.ArgumentParser(prog="hqlt report"))
    return cli.run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def template_db(tmp_path_factory):
    """An empty, initialised MLflow SQLite DB; copying it is much faster than re-running the migrations."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    mlflow.MlflowClient(sqlite_uri(db.parent)).search_experiments()
    return db


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, template_db):
    folder = tmp_path_factory.mktemp("sweeps") / SWEEP
    uri = build_store(folder, template=template_db)
    return folder, uri


@pytest.fixture(scope="module")
def reported(sweep):
    """Run `hqlt report DIR` once; later tests inspect what it wrote."""
    import contextlib
    import io

    folder, uri = sweep
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = _run_cli([str(folder)])
    return rc, out.getvalue(), err.getvalue()


def test_load_sweep_contract(sweep):
    folder, uri = sweep
    parent, trials = load_sweep(uri, SWEEP)
    assert parent.tags["hqlt.role"] == "sweep"
    assert len(trials) == len(TRIALS)
    assert trials["arch"].tolist() == [t[0] for t in TRIALS]  # start order
    assert trials["status"].value_counts()["completed"] == 8
    # latest value of per-step metrics
    assert trials["metrics.train/loss"].eq(1.0).all()
    assert trials.loc[1, "metrics.val/acc"] == pytest.approx(0.90)
    assert trials.loc[1, "params.model.mixer.kv.window"] == 64  # numeric params are coerced
    assert trials.loc[0, "baseline"] == "transformer"


def test_slice_metric_objective_is_found(sweep, tmp_path):
    """A `val/acc@<slice>` objective names the metric the trials logged as `val/acc_at_<slice>`."""
    folder, uri = sweep
    assert to_mlflow_metric(SLICE) == "val/acc_at_len_41-64"
    _, trials = load_sweep(uri, SWEEP)
    assert trials.loc[1, f"metrics.{SLICE}"] == pytest.approx(0.45)
    assert f"metrics.{to_mlflow_metric(SLICE)}" not in trials.columns
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    res = write_report(sqlite_uri(copy), SWEEP, objectives=f"{SLICE}:max,perf/train_tok_s:max",
                       out_dir=tmp_path / "rep")
    ranked = res.trials[res.trials["pareto_rank"].notna()]
    assert len(ranked) >= 2 and ranked["pareto_rank"].min() == 0


def test_cli_end_to_end(sweep, reported):
    folder, uri = sweep
    rc, out, err = reported
    assert rc == 0, err
    # the table: front rows with arch ids, status counts including the excluded trials
    assert "Pareto front over val/acc:max, perf/train_tok_s:max" in out
    for arch in ("T", "S64-dn2-vec", "S32-dn2-sum", "S16-dn2-sum"):
        assert arch in out
    assert "S64-dn1-vec" not in out.split("hypervolume:")[0].split("\n12 trials")[0]  # rank 1: not in the front table
    assert "12 trials: 8 completed (8 ranked, front 5), 1 failed, 1 oom, 1 pruned, 1 infeasible" in out
    assert "4 excluded from the ranking" in out
    assert "pareto.png" in out and "local copies" in out

    client = mlflow.MlflowClient(uri)
    parent, trials = load_sweep(uri, SWEEP)
    by_arch_seed = {}
    for _, r in trials.iterrows():
        by_arch_seed[(r["arch"], r["seed"])] = client.get_run(r["run_id"]).data.tags
    for arch, status, _acc, _tok, _b, seed, _p, rank in TRIALS:
        tags = by_arch_seed[(arch, str(seed))]
        assert tags["pareto_rank"] == ("none" if rank is None else str(rank)), arch
        assert tags["pareto_objectives"] == "val/acc:max,perf/train_tok_s:max"
    assert by_arch_seed[("S8-dn1-sum", "0")]["dominated_by"] == "5"  # A, B (two seeds), C, D
    assert by_arch_seed[("S4-dn1-sum", "0")]["dominated_by"] == "none"

    pm = client.get_run(parent.run_id).data.metrics
    assert pm["report/n_completed"] == 8
    assert pm["report/front_size"] == 5
    assert pm["report/n_trials"] == 12
    assert pm["report/n_failed"] == 1 and pm["report/n_pruned"] == 1 and pm["report/n_infeasible"] == 1
    assert pm["report/hypervolume"] == pytest.approx(EXPECTED_HV)
    assert json.loads(client.get_run(parent.run_id).data.tags["report.reference_point"]) == pytest.approx([0.0, 475.0])

    names = {a.path for a in client.list_artifacts(parent.run_id)}
    assert {"pareto.png", "pareto.html", "hypervolume.png", "front.md", "front.csv"} <= names
    local = Path(client.download_artifacts(parent.run_id, "front.csv", str(folder / "dl")))
    csv = local.read_text()
    assert csv.splitlines()[0].startswith("pareto_rank,arch,baseline,trial_id")
    assert len(csv.strip().splitlines()) == 1 + 5
    report = json.loads((folder / "report" / "report.json").read_text())
    assert report["counts"] == {"completed": 8, "failed": 1, "oom": 1, "pruned": 1, "infeasible": 1}
    assert len(report["hypervolume_growth"]) == 12
    assert report["hypervolume_growth"][-1] == pytest.approx(EXPECTED_HV)


def test_plots_from_store_decode(reported, sweep):
    import matplotlib.image as mpimg

    folder, _ = sweep
    for name in ("pareto.png", "hypervolume.png"):
        img = mpimg.imread(folder / "report" / name)
        assert img.ndim == 3 and img.shape[0] > 400 and img.shape[1] > 600 and img.shape[2] in (3, 4)
        assert img[..., :3].std() > 0.05  # not blank
    html = (folder / "report" / "pareto.html").read_text()
    assert "S64-dn2-vec" in html and "model.mixer.kv.window = 64" in html and "DeltaNet baseline" in html


def test_objectives_override_and_rerun(sweep, reported, tmp_path):
    folder, uri = sweep
    # minimise params instead of maximising tok/s; the rank tags are rewritten
    res = write_report(uri, SWEEP, objectives="val/acc:max,model/params:min", out_dir=tmp_path / "o")
    assert [str(o) for o in res.objectives] == ["val/acc:max", "model/params:min"]
    # params grow with the trial index and T (index 0) has the best completed accuracy -> T dominates all
    assert res.front_size == 1 and res.front.iloc[0]["arch"] == "T"
    client = mlflow.MlflowClient(uri)
    t_run = res.trials.loc[res.trials["arch"] == "T", "run_id"].iloc[0]
    assert client.get_run(t_run).data.tags["pareto_objectives"] == "val/acc:max,model/params:min"
    # restore the sweep's own objectives for the other tests
    res2 = write_report(uri, SWEEP)  # no out_dir: artifacts only in MLflow, no local files kept
    assert res2.front_size == 5 and res2.counts["pruned"] == 1 and res2.files == {}
    assert set(res2.artifacts) >= {"pareto.png", "pareto.html", "hypervolume.png", "front.md", "front.csv"}
    assert client.get_run(t_run).data.tags["pareto_objectives"] == "val/acc:max,perf/train_tok_s:max"


def test_cli_errors(sweep, tmp_path, capsys):
    folder, uri = sweep
    assert _run_cli(["--tracking-uri", uri, "--experiment", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown experiment 'nope'" in err and SWEEP in err
    assert _run_cli([str(folder), "--objectives", "val/acc:up"]) == 2
    assert "mode must be 'max' or 'min'" in capsys.readouterr().err
    assert _run_cli([str(folder), "--objectives", "val/acx:max", "--no-log"]) == 2
    assert "unknown metric 'val/acx'" in capsys.readouterr().err
    assert _run_cli([str(tmp_path / "missing")]) == 2
    assert "no such sweep folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _run_cli([str(tmp_path / "empty")]) == 2
    assert "no mlflow.db" in capsys.readouterr().err


def test_cli_no_completed_trials_and_experiment_fallback(tmp_path, capsys, template_db):
    # no sweep.json: the experiment is the only one in the DB besides Default
    trials = [t for t in TRIALS if t[1] != "completed"]
    folder = tmp_path / "bad-sweep"
    build_store(folder, trials, name="all-failed", write_spec=False, template=template_db)
    rc = _run_cli([str(folder), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc == 1
    assert "all-failed" in captured.err and "no completed trials" in captured.err
    assert "1 failed" in captured.err and "1 pruned" in captured.err


def test_reports_do_not_import_torch_or_ray():
    code = (
        "import sys, hqlt.reports, hqlt.cli.report, hqlt.reports.plots, hqlt.reports.report, hqlt.reports.tables;"
        "bad = [m for m in ('torch', 'ray') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_report_without_plotly_writes_everything_but_the_html(sweep, tmp_path, monkeypatch):
    """GPU images may lack plotly: the report still ranks, draws the png plots and logs what it drew."""
    import importlib.util as ilu

    folder, uri = sweep
    real = ilu.find_spec
    monkeypatch.setattr(ilu, "find_spec", lambda name, *a: None if name == "plotly" else real(name, *a))
    res = write_report(uri, SWEEP, out_dir=tmp_path / "np")
    assert res.front_size == 5
    assert "pareto.html" not in res.artifacts and not (tmp_path / "np" / "pareto.html").exists()
    assert {"pareto.png", "hypervolume.png", "front.md", "front.csv", "trials.csv"} <= set(res.artifacts)


def test_report_on_a_moved_folder_writes_artifacts_into_it(tmp_path, template_db):
    """A sweep folder copied off the GPU host (or committed): its store named the old path; the report
    must not write artifacts there."""
    first = tmp_path / "gpu-host" / SWEEP
    build_store(first, template=template_db)
    meta = json.loads((first / "sweep.json").read_text())
    (first / "sweep.json").write_text(json.dumps({**meta, "path": str(first.resolve())}))
    moved = tmp_path / "repo" / SWEEP
    moved.parent.mkdir()
    first.rename(moved)
    assert _run_cli([str(moved)]) == 0
    assert not first.exists()
    written = {p.name for p in (moved / "artifacts").rglob("*") if p.is_file()}
    assert {"pareto.png", "front.md"} <= written
    assert json.loads((moved / "sweep.json").read_text())["path"] == str(moved.resolve())
