"""Browsing a sweep: readable labels, one front per task, what the sweep and the report write for MLflow's UI
(run names, flat params, constants logged once, numeric rank, the runs view and the parent's description), the
Optuna study's metric names and `hqlt dashboard`. The real-browser check is tests/test_browser_ui.py."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest

from hqlt.search_space import labels
from hqlt.search_space.spec import label

ARM = {"d_model": 64, "layers": "H", "mixer": {"kv": {"window": 8}, "blend": "sync"}}


def test_labels_are_short_and_carry_the_task():
    config = {"task.name": "mod_arith", "model": label(ARM), "train.lr": 0.0031, "model.mixer.kv.window": 16,
              "hqlt.optuna_number": 3}
    assert labels.run_name("S16-dn2-vec", config) == "S16-dn2-vec lr=0.0031 · mod_arith"
    flat = labels.flat_params(config, {"model": ["x", label(ARM)]})
    assert flat["model"] == "arm1" and flat["model.d_model"] == 64 and flat["model.mixer.blend"] == "sync"
    assert flat["model.mixer.kv.window"] == 16  # the sampled key wins over the arm's value
    assert flat["hqlt.optuna_number"] == 3 and flat["task.name"] == "mod_arith"
    assert labels.flat_params({"model": label(ARM)})["model"].startswith("arm-")
    assert labels.task_label({"task.name": "parity", "task.eval_max_len": 128}) == "parity eval_max_len=128"
    assert labels.task_label({"task": json.dumps({"name": "parity", "eval_size": 8})}) == "parity"
    assert labels.format_metric("perf/train_tok_s", 2_556_000.0) == "2.56M tok/s"
    assert labels.format_metric("val/acc", 0.97312) == "0.9731"
    assert labels.format_metric("model/params", 15_232) == "15.2k"
    assert labels.format_metric("perf/peak_mem_mb", 512.25) == "512.2 MB"
    assert labels.format_metric("val/acc", None) == "n/a"


def _trials() -> pd.DataFrame:
    rows = []
    for task, acc, tok in (("parity", 0.99, 2e6), ("parity", 0.5, 1e6), ("mod_arith", 0.8, 3e6),
                           ("mod_arith", 0.2, 4e6), ("mod_arith", 0.1, 1e6)):
        rows.append({"run_id": f"r{len(rows)}", "trial_id": f"t{len(rows)}", "arch": "S8", "status": "completed",
                     "start_time": pd.Timestamp(len(rows)), "metrics.val/acc": acc, "metrics.perf/train_tok_s": tok,
                     "params.task.name": task, "params.model": "arm0"})
    return pd.DataFrame(rows)


def test_fronts_are_ranked_per_task():
    from hqlt.reports.groups import group_keys
    from hqlt.reports.mlflow_io import ReportError
    from hqlt.reports.objectives import parse_objectives
    from hqlt.reports.report import rank_trials

    trials, objs = _trials(), parse_objectives("val/acc:max,perf/train_tok_s:max")
    assert group_keys(trials) == ["task.name"]
    ranked = rank_trials(trials, objs, ["task.name"])
    assert ranked["group"].tolist() == ["parity", "parity", "mod_arith", "mod_arith", "mod_arith"]
    assert ranked["pareto_rank"].tolist() == [0, 1, 0, 0, 1]  # 0.8@3e6 would dominate parity's 0.5@1e6 if mixed
    together = rank_trials(trials, objs, group_keys(trials, "none"))
    assert together["pareto_rank"].tolist() == [0, 1, 0, 0, 2]
    with pytest.raises(ReportError, match="no trial has a param 'nope'"):
        group_keys(trials, "nope")


def test_report_writes_the_front_for_the_ui(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from test_browser_ui import build_sweep

    from hqlt.reports.browse import front_url
    from hqlt.search_space.vocabulary import (EXPERIMENT_KIND_RUNS, EXPERIMENT_KIND_TAG, FRONT_VIEW_KEY, NOTE_TAG,
                                              SHARED_VIEW_TAG_PREFIX, sqlite_uri)

    folder = tmp_path / "s"
    build_sweep(folder)  # the sweep callback's runs, then `hqlt report`
    cl = mlflow.MlflowClient(sqlite_uri(folder))
    exp = cl.get_experiment_by_name("browse-demo")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND_RUNS
    view = json.loads(exp.tags[SHARED_VIEW_TAG_PREFIX + FRONT_VIEW_KEY])
    assert view["searchFilter"] == "tags.pareto_rank = '0'" and view["orderByKey"] == "metrics.`val/acc`"
    assert {"metrics.`val/acc`", "metrics.`perf/train_tok_s`", "params.`task.name`"} <= set(view["selectedColumns"])
    runs = {r.info.run_name: r for r in cl.search_runs([exp.experiment_id], "tags.`hqlt.role` = 'trial'")}
    assert set(runs) == {"S8-dn2-vec · parity", "C8-dn2-vec · parity", "dn2 · parity", "S8-dn2-vec · mod_arith",
                         "C8-dn2-vec · mod_arith", "dn2 · mod_arith"}
    front = runs["dn2 · parity"]
    assert front.data.tags["pareto_rank"] == "0" and front.data.metrics["pareto_rank"] == 0.0
    assert front.data.tags["pareto_group"] == "parity"
    assert front.data.params["model"] == "arm2" and front.data.params["model.layers"] == "F"
    assert runs["C8-dn2-vec · parity"].data.metrics["pareto_rank"] == 1.0
    # constants (model/, perf/) once; what changes (val/acc) at every evaluation
    rid = front.info.run_id
    assert len(cl.get_metric_history(rid, "model/params")) == 1
    assert len(cl.get_metric_history(rid, "perf/train_tok_s")) == 1
    assert len(cl.get_metric_history(rid, "val/acc")) == 2
    parent = cl.search_runs([exp.experiment_id], "tags.`hqlt.role` = 'sweep'")[0]
    note = parent.data.tags[NOTE_TAG]
    assert "**parity**" in note and "**mod_arith**" in note and "dn2" in note and "0.9844" in note
    assert f"get-artifact?path=pareto.png&run_uuid={parent.info.run_id}" in note
    assert parent.data.metrics["report/front_size/parity"] == 2
    report = (folder / "report" / "pareto.html").read_text()
    assert "&quot;" not in report.split("<script")[0] and "task: parity" in report
    assert front_url("http://h:1", exp.experiment_id).endswith(
        f"/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={FRONT_VIEW_KEY}")


def test_status_shows_the_best_of_each_task(tmp_path, capsys):
    pytest.importorskip("ray")
    from test_browser_ui import build_sweep

    from hqlt.cli import main

    build_sweep(tmp_path / "s")
    assert main(["status", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "6 trials (6 completed)" in out
    assert "S8-dn2-vec  parity     val/acc 0.9961  perf/train_tok_s 2.56M tok/s" in out
    assert "dn2         mod_arith  val/acc 0.5334  perf/train_tok_s 3.23M tok/s" in out


def test_study_names_its_metrics_and_dashboard(tmp_path, capsys, monkeypatch):
    optuna = pytest.importorskip("optuna")
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from hqlt.cli import browse, main
    from hqlt.orchestration.sweep_folder import write_meta

    journal = tmp_path / "optuna.log"
    storage = JournalStorage(JournalFileBackend(str(journal)))
    optuna.create_study(study_name="old", storage=storage, directions=["maximize", "maximize"])
    write_meta(tmp_path, {"name": "s", "objectives": [["val/acc", "max"], ["perf/train_tok_s", "max"]]})
    assert browse.name_metrics(journal, ["val/acc", "perf/train_tok_s"]) == ["old"]
    study = optuna.load_study(study_name="old", storage=JournalStorage(JournalFileBackend(str(journal))))
    assert study.metric_names == ["val/acc", "perf/train_tok_s"]
    assert browse.name_metrics(journal, ["val/acc", "perf/train_tok_s"]) == []  # named once
    real = browse.importlib.util.find_spec
    monkeypatch.setattr(browse.importlib.util, "find_spec",
                        lambda name, *a: None if name == "optuna_dashboard" else real(name, *a))
    capsys.readouterr()
    assert main(["dashboard", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'hqlt[dashboard]'" in err


def test_searcher_names_the_study_metrics(tmp_path):
    pytest.importorskip("ray")
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from hqlt.orchestration.sweep import _searcher_class

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.log")))
    searcher = _searcher_class()(space=lambda trial: {"x": trial.suggest_float("x", 0, 1)},
                                 metric=["val/acc", "perf/train_tok_s"], mode=["max", "max"], study_name="s",
                                 storage=storage)
    assert searcher is not None
    assert optuna.load_study(study_name="s", storage=storage).metric_names == ["val/acc", "perf/train_tok_s"]


def test_callback_renames_once_and_skips_repeated_constants():
    pytest.importorskip("ray")
    from hqlt.orchestration.mlflow_callback import MlflowSweepCallback

    cb = MlflowSweepCallback("sqlite:///unused", "e", "p")
    calls = []
    cb._cl = SimpleNamespace(update_run=lambda rid, name: calls.append(name))
    assert cb._changed({"model/params": 1.0, "val/acc": 0.5, "step": 1}, "t") == {"model/params": 1.0, "val/acc": 0.5,
                                                                                  "step": 1}
    assert cb._changed({"model/params": 1.0, "val/acc": 0.5, "step": 2}, "t") == {"val/acc": 0.5, "step": 2}
    assert cb._changed({"perf/train_tok_s": 2.0}, "t") == {"perf/train_tok_s": 2.0}
    trial = SimpleNamespace(trial_id="t", config={"task.name": "parity"})
    cb._name_run(trial, "r", "S8")
    cb._name_run(trial, "r", "S8")
    assert calls == ["S8 · parity"]


def test_a_trial_names_its_phases_for_the_progress_bar():
    from test_trial import merged

    from hqlt.orchestration.trial import run_trial
    from hqlt.search_space.vocabulary import PHASE_PROBE, PHASE_TEST, PHASE_TRAIN

    phases = []
    result = run_trial(merged(train__steps=2, train__eval_every=2), phase=phases.append)
    assert result.status == "completed" and phases == [PHASE_PROBE, PHASE_TRAIN, PHASE_TEST]
