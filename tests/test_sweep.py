"""Real local Ray Tune sweeps (CPU): MLflow layout, failure injection, ASHA → PRUNED, SIGKILL + resume.

Each test runs `hqlt sweep` in a subprocess, as a user would, on tiny trials.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

BASE = """
base:
  model: {d_model: 16, n_layers: 1, n_heads: 2, layers: H, mixer: {kv: {name: softmax, window: 4}}}
  task: {name: parity, eval_size: 64, eval_max_len: 64}
  train: {steps: STEPS, batch_size: 16, eval_every: EVAL, eval_batch_size: 64, warmup_steps: 2}
  probe: {warmup_steps: 0, steps: 1, seq_len: 32}
"""


def write_spec(tmp_path: Path, body: str, steps: int = 20, eval_every: int = 10) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(BASE.replace("STEPS", str(steps)).replace("EVAL", str(eval_every)) + textwrap.dedent(body))
    return path


def hqlt(*args, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "hqlt.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def trial_runs(directory: Path, name: str):
    cl = mlflow.MlflowClient(f"sqlite:///{directory / 'mlflow.db'}")
    exp = cl.get_experiment_by_name(name)
    parents = cl.search_runs([exp.experiment_id], "tags.`hqlt.role` = 'sweep'")
    children = cl.search_runs([exp.experiment_id], "tags.`hqlt.role` = 'trial'")
    return cl, parents, children


def study_trials(directory: Path):
    storage = JournalStorage(JournalFileBackend(str(directory / "optuna.log")))
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage).trials


def test_sweep_asha_logs_parent_children_and_prunes(tmp_path):
    spec = write_spec(tmp_path, """
        space:
          train.lr: {choice: [0.02, 1.0e-7]}
          model.mixer.kv.window: {choice: [2, 4]}
        sweep:
          name: asha
          objectives: [{metric: val/loss, mode: min}]
          sampler: grid
          scheduler: asha
          asha: {max_t: 4, grace_period: 1, reduction_factor: 2}
          num_samples: 4
          max_concurrent: 1
          order: as_listed  # lr 0.02 first (both windows), so the later 1e-7 trials fall below the rung cutoff
        """, steps=40, eval_every=10)
    out = hqlt("sweep", spec, "--dir", tmp_path / "sw", "--verbose", "0", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sweep finished: 4 trials" in out.stdout
    cl, parents, children = trial_runs(tmp_path / "sw", "asha")
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert [a.path for a in cl.list_artifacts(parent.info.run_id) if a.path == "spec.yaml"] == ["spec.yaml"]
    for child in children:
        tags = child.data.tags
        assert tags["status"] in ("completed", "pruned")
        assert {"arch", "trial_id"} <= set(tags)
        assert "val/loss" in child.data.metrics and "perf/train_tok_s" in child.data.metrics
        assert child.data.params["train.lr"] in ("0.02", "1e-07")
        assert len(cl.get_metric_history(child.info.run_id, "val/loss")) >= 1
    statuses = [c.data.tags["status"] for c in children]
    states = [t.state for t in study_trials(tmp_path / "sw")]
    assert statuses.count("pruned") >= 1  # the 1e-7 learning rate cannot keep up with 0.02
    assert states.count(TrialState.PRUNED) == statuses.count("pruned")
    assert states.count(TrialState.COMPLETE) == statuses.count("completed")
    for child in children:  # a completed trial reached max_t evaluations; a pruned one did not
        n_evals = len(cl.get_metric_history(child.info.run_id, "val/loss"))
        assert (n_evals == 4) == (child.data.tags["status"] == "completed")
    status = hqlt("status", tmp_path / "sw", cwd=tmp_path)
    assert status.returncode == 0 and "4 trials" in status.stdout


def test_sweep_survives_failing_trials(tmp_path):
    spec = write_spec(tmp_path, """
        space:
          fault: {choice: [null, raise, nan, oom]}
        sweep:
          name: faults
          objectives: [{metric: val/acc, mode: max}, {metric: perf/train_tok_s, mode: max}]
          sampler: grid
          num_samples: 4
          max_concurrent: 2
        """)
    out = hqlt("sweep", spec, "--dir", tmp_path / "sw", "--verbose", "0", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    _, _, children = trial_runs(tmp_path / "sw", "faults")
    by_status = {c.data.tags["status"]: c for c in children}
    assert sorted(by_status) == ["completed", "failed", "nan", "oom"]
    assert "injected failure" in by_status["failed"].data.tags["reason"]
    assert "nan" in by_status["nan"].data.tags["reason"]
    assert "out of memory" in by_status["oom"].data.tags["reason"]
    assert by_status["completed"].data.tags["reason"] == ""
    done = by_status["completed"].data  # how the cost axis was measured, and the test-set score
    assert done.tags["probe.device"] == "cpu" and done.tags["probe.size"] == "own" and done.tags["checkpoint"] == "final"
    assert done.metrics["probe/contended"] == 1.0 and "test/acc" in done.metrics
    assert len(list((tmp_path / "sw" / "probes").glob("*.json"))) == 1  # one architecture, measured once
    states = sorted(t.state.name for t in study_trials(tmp_path / "sw"))
    assert states == ["COMPLETE", "FAIL", "FAIL", "FAIL"]


def _statuses(db: Path) -> list[str]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return [v for (v,) in con.execute("select value from tags where key = 'status'")]
    except sqlite3.Error:
        return []


def test_sigkill_then_rerun_resumes_without_loss_or_duplicates(tmp_path):
    """Kill the whole process group mid-sweep, copy the folder elsewhere (as onto another host), rerun."""
    spec = write_spec(tmp_path, """
        space:
          model.mixer.kv.window: {choice: [2, 4, 8]}
          train.lr: {float: [1.0e-3, 1.0e-2], log: true}
        sweep:
          name: killed
          objectives: [{metric: val/acc, mode: max}]
          num_samples: 6
          max_concurrent: 1
        """, steps=150, eval_every=50)
    sw = tmp_path / "sw"
    cmd = [sys.executable, "-m", "hqlt.cli", "sweep", str(spec), "--dir", str(sw), "--verbose", "0"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    deadline = time.time() + 180
    while time.time() < deadline:  # kill once one trial finished and another is running
        st = _statuses(sw / "mlflow.db")
        if st.count("completed") >= 1 and "running" in st:
            break
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.5)
    else:
        pytest.fail("no trial completed within 180 s")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)
    before = _statuses(sw / "mlflow.db")
    assert before.count("completed") < 6
    moved = tmp_path / "elsewhere" / "sw"
    moved.parent.mkdir()
    sw.rename(moved)
    sw = moved

    again = hqlt("sweep", spec, "--dir", sw, "--verbose", "0", cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    _, _, children = trial_runs(sw, "killed")
    ids = [c.data.tags["trial_id"] for c in children]
    assert len(children) == 6 and len(set(ids)) == 6  # none lost, none repeated, no duplicate runs
    assert all(c.data.tags["status"] == "completed" for c in children)
    for child in children:  # a restarted trial's steps are not logged twice
        steps = [m.step for m in mlflow.MlflowClient(f"sqlite:///{sw / 'mlflow.db'}").get_metric_history(
            child.info.run_id, "val/acc")]
        assert len(steps) == len(set(steps))
    trials = study_trials(sw)
    done = [t for t in trials if not t.user_attrs.get("hqlt.orphaned")]
    assert sum(t.state == TrialState.COMPLETE for t in done) == 6
    assert all(t.state != TrialState.RUNNING for t in trials)
    assert not (tmp_path / "sw").exists()  # nothing written to the old location
    cl = mlflow.MlflowClient(f"sqlite:///{sw / 'mlflow.db'}")
    parent = cl.search_runs([cl.get_experiment_by_name("killed").experiment_id], "tags.`hqlt.role` = 'sweep'")[0]
    assert parent.info.artifact_uri.startswith(sw.as_uri())
    assert "pareto.png" in [a.path for a in cl.list_artifacts(parent.info.run_id)]
    pm = parent.data.metrics
    assert pm["sweep/n_completed"] == 6 and pm["sweep/n_running"] == 0 and pm["sweep/n_failed"] == 0
    assert pm["sweep/wall_s"] >= pm["sweep/run_wall_s"] > 0
    # where the trials' time went: means over the completed trials of their own time/* metrics
    assert pm["sweep/trial_trial_s"] >= pm["sweep/trial_train_s"] > 0 and pm["sweep/trial_build_s"] > 0
    if "sweep/trial_probe_s" in pm:  # the probe's waits are part of its time
        assert pm["sweep/trial_probe_s"] >= pm["sweep/trial_probe_wait_s"] >= 0
    assert "per completed trial, means: task and model build" in again.stdout

    changed = spec.read_text().replace("num_samples: 6", "num_samples: 6\n  seeds: 2")
    spec.write_text(changed)
    refused = hqlt("sweep", spec, "--dir", sw, cwd=tmp_path)
    assert refused.returncode == 2 and "--fresh" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_bad_spec_fails_before_anything_is_created(tmp_path):
    spec = write_spec(tmp_path, """
        space:
          model.mixer.mix: {choice: [sum, vectr]}
        sweep: {name: bad, num_samples: 2}
        """)
    out = hqlt("sweep", spec, cwd=tmp_path)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "spec.yaml" in line and "model.mixer.mix" in line and "vector" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_cluster_mode_requires_a_tracking_server(tmp_path):
    spec = write_spec(tmp_path, """
        space:
          model.mixer.kv.window: {choice: [2, 4]}
        sweep: {name: cluster, num_samples: 2}
        """)
    out = hqlt("sweep", spec, "--address", "127.0.0.1:1", cwd=tmp_path)
    assert out.returncode == 2
    assert "--tracking-uri" in out.stderr and "server" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]



def test_wall_time_adds_up_over_the_runs_of_a_resumed_sweep(tmp_path):
    from hqlt.orchestration.sweep_folder import RunClock

    (tmp_path / "sweep.json").write_text(json.dumps({"name": "x"}))
    for _ in range(2):
        clock = RunClock(tmp_path, period=60)
        time.sleep(0.3)
        total = clock.stop()
    meta = json.loads((tmp_path / "sweep.json").read_text())
    assert meta["name"] == "x" and len(meta["runs"]) == 2 and all(r["wall_s"] >= 0.3 for r in meta["runs"])
    assert total == meta["wall_s"] == pytest.approx(sum(r["wall_s"] for r in meta["runs"]))
