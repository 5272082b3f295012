"""What a sweep is and what a resume may touch, without running one (except the last test): a sweep is its
sweep id (two sweeps of one name and spec on one store never touch each other's runs), a resumed trial logs
nothing twice, a killed run's wall time counts, a kill's leftovers (a journal cut mid-line, a stale lock, a Ray
snapshot cut mid-copy) are repaired, only --address joins a Ray cluster, a server that is down is one line."""
from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from hqlt.blocks.validation import ConfigError
from hqlt.orchestration import sweep_folder, tracking
from hqlt.search_space.vocabulary import PARENT_TAG, ROLE_TAG, ROLE_TRIAL, STATUS_TAG, TRIAL_ID_TAG, sqlite_uri

BASE = """
base:
  model: {d_model: 16, n_layers: 1, n_heads: 2, layers: H, mixer: {kv: {name: softmax, window: 4}}}
  task: {name: parity, eval_size: 64, eval_max_len: 64}
  train: {steps: 10, batch_size: 16, eval_every: 5, eval_batch_size: 64, warmup_steps: 2}
  probe: {warmup_steps: 0, steps: 1, seq_len: 32}
"""


def hqlt(*args, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "hqlt.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An MLflow SQLite store made by tracking.ensure_store (aside, then renamed: a stale attempt is cleared)."""
    folder = tmp_path_factory.mktemp("store")
    (folder / ".mlflow.db.1234.tmp").write_text("left by a kill during an earlier attempt")
    uri = sqlite_uri(folder)
    tracking.ensure_store(uri)
    assert (folder / "mlflow.db").is_file() and not list(folder.glob(".mlflow.db.*"))
    return uri


def _trial_run(cl, exp_id: str, parent_id: str, trial_id: str) -> str:
    return cl.create_run(exp_id, tags={PARENT_TAG: parent_id, ROLE_TAG: ROLE_TRIAL, TRIAL_ID_TAG: trial_id,
                                       STATUS_TAG: "completed"}).info.run_id


def test_two_sweeps_of_one_name_and_spec_on_one_store_stay_apart(store):
    """Issue #13.2: the second sweep attached to the first one's parent run (found by name + spec hash), and the
    orphan clean-up of its resume deleted the first sweep's runs."""
    import optuna

    from hqlt.orchestration.mlflow_callback import find_or_create_parent
    from hqlt.orchestration.sweep import _reconcile_orphans, summarize
    from hqlt.reports.mlflow_io import load_sweep

    cl = tracking.client(store)
    objectives = [("val/acc", "max")]
    a = find_or_create_parent(cl, "twin", "twin", objectives, "hash0", "sweep-a")
    b = find_or_create_parent(cl, "twin", "twin", objectives, "hash0", "sweep-b")
    assert a.info.run_id != b.info.run_id
    assert find_or_create_parent(cl, "twin", "twin", objectives, "hash0", "sweep-a").info.run_id == a.info.run_id
    exp_id = a.info.experiment_id
    mine = [_trial_run(cl, exp_id, a.info.run_id, f"t{i}") for i in range(3)]
    for i in range(4):
        _trial_run(cl, exp_id, b.info.run_id, f"t{i}")  # same trial ids as the first sweep's
    # the second sweep resumes from a snapshot that knows none of its trials: only its own runs go
    study = optuna.create_study(storage=None)
    _reconcile_orphans(study, cl, b.info.run_id, known={})
    left = cl.search_runs([exp_id], tracking.role_filter(ROLE_TRIAL))
    assert sorted(r.info.run_id for r in left) == sorted(mine)
    assert summarize(cl, "twin", objectives, a.info.run_id)["n"] == 3
    assert summarize(cl, "twin", objectives, b.info.run_id)["n"] == 0
    _trial_run(cl, exp_id, b.info.run_id, "t9")
    for i in range(5):  # the report of sweep b is sweep b's, though sweep a has more trials
        _trial_run(cl, exp_id, a.info.run_id, f"u{i}")
    parent, trials = load_sweep(store, "twin", sweep_id="sweep-b")
    assert parent.run_id == b.info.run_id and list(trials["trial_id"]) == ["t9"]


class _Trial(SimpleNamespace):
    pass


def test_a_trial_that_ends_again_after_a_resume_logs_its_timing_once(store):
    """Issue #13.3: a trial finished right at the kill replays its saved result on resume; its trial/wall_s and
    trial/overhead_s were logged again at the same step (26.64 s, then 0.218 s)."""
    pytest.importorskip("ray")
    from hqlt.orchestration.mlflow_callback import MlflowSweepCallback, find_or_create_parent
    from hqlt.search_space.vocabulary import REPLAYED_KEY

    cl = tracking.client(store)
    parent = find_or_create_parent(cl, "replay", "replay", [("val/acc", "max")], "h", "sweep-r").info.run_id
    last = {"step": 20, "val/acc": 0.5, "time/trainable_s": 3.0, "trial/done": 1.0, "trial/status": "completed",
            "trial/arch": "S4", "trial/node": "host:abcdef12"}
    trial = _Trial(trial_id="abc_00001", config={"train.lr": 0.01}, last_result=last)
    first = MlflowSweepCallback(store, "replay", parent)
    first.on_trial_start(0, [], trial)
    first.on_trial_result(0, [], trial, last)
    first.on_trial_complete(0, [], trial)
    # the resumed driver (a fresh callback): Ray restarts the trial, which replays its results/<id>.json
    replayed = {**last, "time/trainable_s": 0.01, REPLAYED_KEY: 1.0}
    again = MlflowSweepCallback(store, "replay", parent)
    trial.last_result = replayed
    again.on_trial_start(0, [], trial)
    again.on_trial_result(0, [], trial, replayed)
    again.on_trial_complete(0, [], trial)
    # and one that restarts without a saved result, ending at the same step: not logged twice either
    trial.last_result = last
    third = MlflowSweepCallback(store, "replay", parent)
    third.on_trial_start(0, [], trial)
    third.on_trial_complete(0, [], trial)
    (run,) = cl.search_runs([cl.get_experiment_by_name("replay").experiment_id], tracking.role_filter(ROLE_TRIAL))
    for key in ("trial/wall_s", "trial/overhead_s", "val/acc"):
        assert len(cl.get_metric_history(run.info.run_id, key)) == 1, key
    assert run.data.tags["node"] == "host:abcdef12"


def test_a_killed_runs_wall_time_counts(tmp_path):
    """Issue #13.3: sweep.json's wall_s left out killed runs (written only at the end of a run)."""
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "x", "wall_s": 10.0, "runs": [{"wall_s": 10.0}]}))
    code = ("import sys, time; from hqlt.orchestration.sweep_folder import RunClock; "
            "RunClock(sys.argv[1], period=0.1); print('on', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "on"
    time.sleep(1.5)
    proc.kill()
    proc.wait()
    meta = json.loads((tmp_path / "sweep.json").read_text())
    assert len(meta["runs"]) == 2 and meta["runs"][1]["wall_s"] >= 1.0 and "ended" not in meta["runs"][1]
    assert meta["wall_s"] == pytest.approx(10.0 + meta["runs"][1]["wall_s"])
    clock = sweep_folder.RunClock(tmp_path, period=60)
    assert clock.stop() == pytest.approx(meta["wall_s"], abs=0.2)
    assert "ended" in json.loads((tmp_path / "sweep.json").read_text())["runs"][2]


def test_one_driver_per_folder(tmp_path):
    held = sweep_folder.hold_folder(tmp_path)
    assert f"pid {os.getpid()}" in sweep_folder.folder_in_use(tmp_path)
    with pytest.raises(ConfigError, match="in use by a running sweep"):
        sweep_folder.hold_folder(tmp_path)
    held.close()
    assert sweep_folder.folder_in_use(tmp_path) is None


def test_a_journal_cut_by_a_kill_is_repaired(tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = tmp_path / "optuna.log"
    study = optuna.create_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(journal))))
    study.enqueue_trial({"x": 1.0})
    with open(journal, "a") as f:
        f.write('{"op_code": 5, "worker_id": "w", "study_id"')  # a write cut off mid-line
    os.symlink(journal, tmp_path / "optuna.log.lock")  # optuna's writer lock, never released
    sweep_folder.repair_journal(journal)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    again = optuna.load_study(study_name="s", storage=storage)
    again.ask()
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 1
    assert not (tmp_path / "optuna.log.lock").exists()


def test_a_ray_snapshot_cut_mid_copy_falls_back_to_the_one_before(tmp_path, capsys):
    from hqlt.orchestration.sweep import _extend, _usable_ray_state

    exp = tmp_path / "ray"
    exp.mkdir()
    assert not _usable_ray_state(exp)
    (exp / "tuner.pkl").write_bytes(pickle.dumps({}))

    def snapshot(session: str, total: int) -> None:
        (exp / f"experiment_state-{session}.json").write_text(json.dumps({"trial_data": []}))
        (exp / f"search_gen_state-{session}.json").write_bytes(pickle.dumps({"total_samples": total,
                                                                             "finished": False, "counter": total}))
        (exp / f"searcher-state-{session}.pkl").write_bytes(pickle.dumps({}))

    snapshot("2026-01-01_00-00-00", 4)
    snapshot("2026-01-02_00-00-00", 4)
    (exp / "searcher-state-2026-01-02_00-00-00.pkl").write_bytes(b"\x80\x04\x95")  # cut off by the kill
    assert _usable_ray_state(exp)
    assert "incomplete" in capsys.readouterr().err
    assert sorted(p.name for p in exp.glob("*state-*")) == [
        "experiment_state-2026-01-01_00-00-00.json", "search_gen_state-2026-01-01_00-00-00.json",
        "searcher-state-2026-01-01_00-00-00.pkl"]
    _extend(exp, 6)  # a larger sweep.num_samples: the restored sample count grows
    assert pickle.loads((exp / "search_gen_state-2026-01-01_00-00-00.json").read_bytes())["total_samples"] == 6
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_da')
    assert not _usable_ray_state(exp)  # the only snapshot is cut: nothing to restore, the sweep starts over


def test_only_an_address_joins_a_ray_cluster(tmp_path, monkeypatch):
    """Issue #13.6: without --address, Ray's auto-detection joined a cluster running on the machine."""
    ray = pytest.importorskip("ray")
    from hqlt.orchestration.sweep import _init_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    settings = SimpleNamespace(resources=SimpleNamespace(cpu=1))
    _init_ray(settings, tmp_path, None, 1)
    _init_ray(settings, tmp_path, "10.0.0.1:6379", 1)
    assert [c["address"] for c in calls] == ["local", "10.0.0.1:6379"]


def test_a_tracking_server_that_is_down_is_one_line_within_seconds(tmp_path):
    """Issue #13.5: a stopped server hung the sweep 255 s, then three chained tracebacks."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(BASE + "space:\n  model.mixer.kv.window: {choice: [2, 4]}\nsweep: {name: down, num_samples: 2}\n")
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.time()
    out = hqlt("sweep", spec, "--dir", tmp_path / "sw", "--tracking-uri", uri, cwd=tmp_path, timeout=120)
    took = time.time() - started
    (line,) = out.stderr.strip().splitlines()
    assert out.returncode == 2 and uri in line and "does not answer" in line, out.stderr
    assert not (tmp_path / "sw").exists()  # refused before anything was written
    assert took < 60, took  # mostly the interpreter's start-up on a loaded machine; no client retries
    with pytest.raises(ConfigError, match="does not answer"):
        tracking.check_server(uri, timeout=1)


def test_the_browse_hint_of_a_server_backed_sweep_names_the_server(tmp_path, capsys):
    """Issue #13.7: the end-of-sweep hint said `mlflow ui --backend-store-uri http://…`."""
    from hqlt.orchestration.sweep import print_summary

    summary = {"counts": {"completed": 1}, "n": 1, "best": [], "overhead_s": None}
    print_summary(summary, [("val/acc", "max")], tmp_path, "http://mlflow.internal:5000")
    out = capsys.readouterr().out
    assert "--backend-store-uri http" not in out and "http://mlflow.internal:5000" in out
    print_summary(summary, [("val/acc", "max")], tmp_path, sqlite_uri(tmp_path))
    assert "mlflow ui --backend-store-uri sqlite" in capsys.readouterr().out


@pytest.mark.slow
def test_a_sweep_whose_trials_all_failed_exits_nonzero(tmp_path):
    """Issue #13.8: 'sweep finished: 2 trials (2 failed)' and exit status 0."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(BASE + textwrap.dedent("""
        space:
          fault: {choice: [raise]}
        sweep: {name: doomed, num_samples: 2, max_concurrent: 2, resources: {cpu: 1, gpu: 0}}
        """))
    out = hqlt("sweep", spec, "--dir", tmp_path / "sw", "--verbose", "0", cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "2 trials (2 failed)" in out.stdout and "no trial completed" in out.stderr
