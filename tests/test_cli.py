"""The `hqlt` command (`hqlt.cli`, the top layer; the import direction itself is tests/test_layout.py): every
command is wired, `hqlt --help` stays light, and the sweep folder a driver runs is found from the environment,
not from pickled state."""
from __future__ import annotations

import pickle
import subprocess
import sys

import pytest


def test_help_imports_neither_ray_nor_mlflow():
    code = ("import sys, hqlt.cli; hqlt.cli.build_parser(hqlt.cli._commands()); "
            "print([m for m in ('ray', 'optuna', 'mlflow', 'hqlt.reports') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_help_loads_no_command():
    """`hqlt --help` lists every command without importing one (torch, ray, mlflow stay out: it is fast)."""
    code = ("import sys, hqlt.cli\ntry:\n    hqlt.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print([m for m in ('torch', 'ray', 'mlflow', 'hqlt.cli.sweep', 'hqlt.benchmarks.cli') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr
    assert "dashboard" in proc.stdout and "report" in proc.stdout


def test_every_command_is_wired():
    import hqlt.cli

    cmds = hqlt.cli._commands()
    assert list(cmds) == ["info", "train", "validate", "sweep", "status", "ui", "dashboard", "report", "bench"]
    assert all(callable(c.configure_parser) and callable(c.run) for c in cmds.values())


def test_callback_finds_the_folder_it_runs_in_after_unpickling(tmp_path, monkeypatch):
    """A sweep folder copied elsewhere keeps writing into its own mlflow.db: the embedded store is located
    when the unpickled callback first needs it, from the folder the driver runs."""
    pytest.importorskip("ray")
    from hqlt.orchestration import sweep_folder, tracking
    from hqlt.orchestration.mlflow_callback import MlflowSweepCallback

    monkeypatch.delenv(sweep_folder.SWEEP_DIR_ENV, raising=False)
    monkeypatch.setattr(tracking, "client", lambda uri: uri)  # the "client" is the URI it was made for
    saved = pickle.dumps(MlflowSweepCallback(None, "exp", "parent"))
    for where in (tmp_path / "first", tmp_path / "copied"):
        sweep_folder.use_sweep_dir(where)
        assert sweep_folder.current_sweep_dir() == where.resolve()
        assert pickle.loads(saved).cl == f"sqlite:///{where.resolve() / 'mlflow.db'}"
    assert pickle.loads(pickle.dumps(MlflowSweepCallback("http://server:5000", "exp", "p"))).cl == "http://server:5000"


@pytest.mark.parametrize("command", ["status", "report"])
def test_a_database_from_another_mlflow_version_is_one_line(tmp_path, command):
    """A sweep folder whose mlflow.db has a schema this MLflow does not know (here: a made-up revision, as a
    database from a newer MLflow on a GPU host has): one error line naming the versions, exit 2, no traceback."""
    import shutil
    import sqlite3
    from pathlib import Path

    src = Path(__file__).resolve().parent.parent / "reports" / "results" / "paper_expressivity"
    folder = tmp_path / "sweep"
    folder.mkdir()
    for name in ("mlflow.db", "spec.yaml", "sweep.json"):
        shutil.copy(src / name, folder / name)
    with sqlite3.connect(folder / "mlflow.db") as db:
        db.execute("update alembic_version set version_num = 'ffffffffffff'")
    args = [command, str(folder)] + (["--no-log"] if command == "report" else [])
    proc = subprocess.run([sys.executable, "-m", "hqlt.cli", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"hqlt {command}: error: MLflow ") and "schema ffffffffffff" in lines[0]
