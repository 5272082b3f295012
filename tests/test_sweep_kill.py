"""Kill anywhere: a sweep SIGKILLed (every process group of the run: the driver, Ray's processes, the trial
workers) at precise points — during Ray start-up, while trials run, right after a trial's result is written,
during the end-of-sweep report — and then run again with the same command ends exactly as an uninterrupted one
would: num_samples trial runs, no (run, metric, step) logged twice, every Optuna trial told, the report there.

The points are hit through the fault-injection hook (`hqlt.orchestration.faults`): the process that reaches one
writes a marker file and waits; the test then kills the whole run. Timing-based kills would miss short windows.
"""
from __future__ import annotations

import json
import os
import sqlite3
import textwrap
import time
from pathlib import Path

import pytest
from killing import hqlt, kill_everything, run_until

BASE = """
base:
  model: {d_model: 16, n_layers: 1, n_heads: 2, layers: H, mixer: {kv: {name: softmax, window: 4}}}
  task: {name: parity, eval_size: 64, eval_max_len: 64}
  train: {steps: 30, batch_size: 16, eval_every: 10, eval_batch_size: 64, warmup_steps: 2}
  probe: {warmup_steps: 0, steps: 1, seq_len: 32}
"""


def duplicate_rows(db: Path) -> list:
    with sqlite3.connect(db) as con:
        return con.execute("select run_uuid, key, step, count(*) from metrics group by run_uuid, key, step "
                           "having count(*) > 1").fetchall()


def n_metric_rows(db: Path) -> int:
    with sqlite3.connect(db) as con:
        return con.execute("select count(*) from metrics").fetchone()[0]


@pytest.mark.slow
def test_kill_anywhere_then_rerun_ends_like_an_uninterrupted_sweep(tmp_path):
    import mlflow
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    started = time.time()
    n = 4
    spec = tmp_path / "spec.yaml"
    spec.write_text(BASE + textwrap.dedent(f"""
        space:
          model.mixer.kv.window: {{choice: [2, 4, 8]}}
          train.lr: {{float: [1.0e-3, 1.0e-2], log: true}}
        sweep:
          name: killed
          objectives: [{{metric: val/acc, mode: max}}]
          num_samples: {n}
          max_concurrent: 2
          resources: {{cpu: 1, gpu: 0}}
        """))
    sw, marker = tmp_path / "sw", tmp_path / "fault.json"
    args = ["sweep", spec, "--dir", sw, "--verbose", "0"]

    # 1. during Ray start-up: sweep.json is all there is (no store, no study, no Ray state)
    run_until(args, tmp_path, "ray-start", marker)
    assert (sw / "sweep.json").is_file() and not (sw / "mlflow.db").exists() and not (sw / "optuna.log").exists()
    # 2. while trials run: the 4th report a trial worker makes (its second trial, two evaluations in)
    run_until(args, tmp_path, "trial-report@4", marker)
    # 3. right after a trial's final result is written to results/, before Ray (or Optuna, or MLflow) hears of it
    hit = run_until(args, tmp_path, "result-written", marker)
    assert (sw / "results" / f"{hit['trial_id']}.json").is_file()
    # 4. during the end-of-sweep report: the runs tagged, the report's metrics on the parent, no artifacts yet
    run_until(args, tmp_path, "report", marker)
    status = hqlt("status", sw, cwd=tmp_path)
    assert status.returncode == 0 and "not finished" in status.stdout and "no report yet" in status.stdout, status.stdout
    # 5. the same command again: it ends
    done = hqlt(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"sweep finished: {n} trials ({n} completed)" in done.stdout, done.stdout + done.stderr[-3000:]

    db = sw / "mlflow.db"
    cl = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = cl.get_experiment_by_name("killed")
    (parent,) = cl.search_runs([exp.experiment_id], "tags.`hqlt.role` = 'sweep'")
    children = cl.search_runs([exp.experiment_id], "tags.`hqlt.role` = 'trial'")
    ids = [c.data.tags["trial_id"] for c in children]
    assert len(children) == n and len(set(ids)) == n
    assert all(c.data.tags["status"] == "completed" and c.info.status == "FINISHED" for c in children)
    assert hit["trial_id"] in ids  # the trial killed right after its result was written: its result replayed
    assert duplicate_rows(db) == []
    for c in children:  # each trial's start-up overhead logged once, never the replay's
        assert len(cl.get_metric_history(c.info.run_id, "trial/wall_s")) <= 1
    storage = JournalStorage(JournalFileBackend(str(sw / "optuna.log")))
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    live = [t for t in trials if not t.user_attrs.get("hqlt.orphaned")]
    assert sum(t.state == TrialState.COMPLETE for t in live) == n
    assert all(t.state != TrialState.RUNNING for t in trials)
    parent = cl.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and "report.objectives" in parent.data.tags
    assert {"pareto.png", "front.md"} <= {a.path for a in cl.list_artifacts(parent.info.run_id)}
    assert (sw / "report" / "front.md").is_file()
    meta = json.loads((sw / "sweep.json").read_text())
    assert len(meta["runs"]) == 5 and meta["finished"]["num_samples"] == n
    assert meta["wall_s"] == pytest.approx(sum(r["wall_s"] for r in meta["runs"]), abs=0.5)
    assert all(r["wall_s"] > 2 for r in meta["runs"][1:])  # the killed runs count too (up to their last update)
    status = hqlt("status", sw, cwd=tmp_path)
    assert "not finished" not in status.stdout and "no report" not in status.stdout and f"{n} of {n}" in status.stdout

    # 6. the same command on the finished sweep: a summary, nothing run or logged again
    rows = n_metric_rows(db)
    again = hqlt(*args, cwd=tmp_path)
    assert again.returncode == 0 and "is finished" in again.stdout, again.stderr[-2000:]
    assert n_metric_rows(db) == rows and len(json.loads((sw / "sweep.json").read_text())["runs"]) == 5

    # 7. a larger sweep.num_samples extends the finished sweep; a smaller one is refused in one line
    more = hqlt(*args, "sweep.num_samples=5", cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    assert len(cl.search_runs([exp.experiment_id], "tags.`hqlt.role` = 'trial'")) == 5
    assert duplicate_rows(db) == []
    fewer = hqlt(*args, "sweep.num_samples=3", cwd=tmp_path)
    assert fewer.returncode == 2 and "sweep.num_samples" in fewer.stderr
    assert len(fewer.stderr.strip().splitlines()) == 1
    print(f"kill-anywhere test: {time.time() - started:.0f} s")


@pytest.mark.slow
def test_ctrl_c_while_trials_run_leaves_the_sweep_open_and_a_rerun_ends_it(tmp_path):
    """SIGINT to the driver (Ctrl-C, `timeout -s INT`): Tune catches it and returns from fit() as if done. The sweep
    must not be marked finished then (it was, on an H200: `timeout -s INT` left "sweep finished: 2 trials (2
    running)", and a rerun would have run nothing); the same command again resumes it to the end. With seed snapshots
    on (`sweep.snapshot_minutes: 0`), the interrupted seed goes on from its last snapshot, not from step 0."""
    import signal

    from killing import start, wait_for  # noqa: I001

    n = 3
    spec = tmp_path / "spec.yaml"
    spec.write_text(BASE + textwrap.dedent(f"""
        space:
          model.mixer.kv.window: {{choice: [2, 4, 8]}}
        sweep:
          name: ctrlc
          objectives: [{{metric: val/acc, mode: max}}]
          sampler: grid
          num_samples: {n}
          max_concurrent: 1
          resources: {{cpu: 1, gpu: 0}}
          snapshot_minutes: 0
        """))
    sw, marker = tmp_path / "sw", tmp_path / "fault.json"
    args = ["sweep", spec, "--dir", sw, "--verbose", "0"]
    proc = start(args, tmp_path, HQLT_FAULT_AT="trial-report@2", HQLT_FAULT_FILE=str(marker))
    try:
        wait_for(marker, proc, "a trial's second report", 150)
        os.kill(proc.pid, signal.SIGINT)  # the driver only, as `timeout -s INT` does
        rc = proc.wait(timeout=120)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            kill_everything(proc)
    assert rc == 130 and "interrupted with 1 trial(s) unfinished" in err, (rc, err[-3000:])
    assert "finished" not in json.loads((sw / "sweep.json").read_text())
    status = hqlt("status", sw, cwd=tmp_path)
    assert "not finished" in status.stdout, status.stdout
    assert "seed 0: resumes at step 20 (seed snapshot)" in status.stdout, status.stdout
    done = hqlt(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"sweep finished: {n} trials ({n} completed)" in done.stdout, done.stdout + done.stderr[-3000:]
    assert json.loads((sw / "sweep.json").read_text())["finished"]["num_samples"] == n
    assert duplicate_rows(sw / "mlflow.db") == []
    # Reports reach Ray one evaluation late: the second (step 20's) came at step 30, after step 20's snapshot.
    resumed = sorted(json.loads(p.read_text())["result"]["metrics"]["train/resumed_step"]
                     for p in (sw / "results").glob("*.seed0.json"))
    assert resumed == [0.0] * (n - 1) + [20.0], resumed
    assert not list((sw / "results").glob("*.snapshot.pt*"))
