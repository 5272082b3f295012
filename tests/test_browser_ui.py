"""`hqlt ui` in a real browser: headless Chromium (Debian's `chromium`) over the DevTools protocol.

A small sweep store is written by the code under test (the sweep's MLflow callback, then `hqlt report`), `hqlt ui`
serves it, and the browser checks what a person sees: the printed deep link opens the runs table filtered to the
front of each task, with accuracy and throughput columns; the sweep's run shows the front table in its
description and the Pareto image; the image opens in the artifact view.

Screenshots of the three views: `python tests/test_browser_ui.py SWEEP_DIR OUT_DIR` runs the same checks on a copy
of a real sweep folder (reports/results/screenshots/ were made from reports/results/paper_expressivity).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cdp import Chromium, chromium_binary  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(170)]

OBJECTIVES = [["val/acc", "max"], ["perf/train_tok_s", "max"]]
ARMS = [{"layers": "H", "mixer": {"kv": {"window": 8}, "blend": "sync"}},
        {"layers": "H", "mixer": {"kv": {"window": 8}, "blend": "delayed_chunk"}},
        {"layers": "F", "mixer": {"kv": {"window": 8}, "blend": "sync"}}]
# (task, arm, arch, val/acc, tok/s): per task S8 and dn are on the front, C8 is dominated by S8
TRIALS = [("parity", 0, "S8-dn2-vec", 0.9961, 2_560_000.0), ("parity", 1, "C8-dn2-vec", 0.5012, 2_100_000.0),
          ("parity", 2, "dn2", 0.9844, 5_440_000.0), ("mod_arith", 0, "S8-dn2-vec", 0.8325, 2_590_000.0),
          ("mod_arith", 1, "C8-dn2-vec", 0.2771, 2_050_000.0), ("mod_arith", 2, "dn2", 0.5334, 3_230_000.0)]


def build_sweep(folder: Path) -> None:
    """A finished sweep's folder, written the way `hqlt sweep` writes it: parent run, the callback's child runs
    (names, flat params, metrics per evaluation), sweep.json; then `hqlt report DIR`."""
    from hqlt.orchestration.mlflow_callback import MlflowSweepCallback, find_or_create_parent
    from hqlt.orchestration.sweep_folder import write_meta
    from hqlt.orchestration.tracking import client
    from hqlt.search_space.spec import label
    from hqlt.search_space.vocabulary import sqlite_uri

    folder.mkdir(parents=True)
    uri = sqlite_uri(folder)
    cl = client(uri)
    parent = find_or_create_parent(cl, "browse-demo", "browse-demo", [tuple(o) for o in OBJECTIVES], "0" * 16,
                                   sweep_id="browse-demo-0",
                                   artifact_location=(folder / "artifacts").resolve().as_uri()).info.run_id
    callback = MlflowSweepCallback(uri, "browse-demo", parent, arms={"model": [label(a) for a in ARMS]})
    for i, (task, arm, arch, acc, tok) in enumerate(TRIALS):
        trial = SimpleNamespace(trial_id=f"t{i:04d}", config={"task.name": task, "model": label(ARMS[arm]),
                                                               "hqlt.optuna_number": i}, last_result=None)
        callback.on_trial_start(0, [], trial)
        for step, value in ((10, acc / 2), (20, acc)):
            result = {"step": step, "val/acc": value, "perf/train_tok_s": tok, "model/params": 15_000.0 + i,
                      "train/loss": 1.0 / step, "trial/arch": arch, "trial/done": float(step == 20)}
            if step == 20:
                result.update({"trial/status": "completed", "trial/config_hash": f"h{i}", "trial/seeds": "0"})
            callback.on_trial_result(0, [], trial, result)
            trial.last_result = result
        callback.on_trial_complete(0, [], trial)
    cl.set_terminated(parent, "FINISHED")
    write_meta(folder, {"name": "browse-demo", "objectives": OBJECTIVES, "tracking_uri": None,
                        "path": str(folder.resolve())})
    done = subprocess.run([sys.executable, "-m", "hqlt.cli", "report", str(folder)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UiServer:
    """`hqlt ui DIR --port P` as a person runs it; its printed links, and a clean stop of it and its server."""

    def __init__(self, folder: Path, timeout: float = 120.0):
        self.proc = subprocess.Popen([sys.executable, "-m", "hqlt.cli", "ui", str(folder), "--port", str(free_port())],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        deadline = time.time() + timeout
        while not any("Pareto front:" in line for line in self.lines):
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise AssertionError("hqlt ui printed no link:\n" + "".join(self.lines))
            self.lines.append(line)
        self.lines.append(self.proc.stdout.readline())  # the sweep run's link follows the front's
        self.links = {line.split(":", 1)[0].strip(): line.split()[-1] for line in self.lines if "http://" in line}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own session: hqlt ui and the MLflow server it started
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def check_ui(folder: Path, front: list[tuple[str, str, str]], dominated: list[str], shots: Path | None) -> dict:
    """Run `hqlt ui` on `folder` and check, in Chromium, the front's runs table, the sweep run's description and
    the Pareto image; `front` = (run name, accuracy text, throughput text) of each front run."""
    from hqlt.reports.browse import run_url

    server = UiServer(folder)
    try:
        url, parent_url = server.links["Pareto front"], server.links["sweep run (front table, plots)"]
        assert "viewStateShareKey=" in url and "workflowType=machine_learning" in url, url
        with Chromium(width=1600, height=1000) as browser:
            browser.goto(url.split("#")[0])  # MLflow's assistant panel opens on a first visit: not for the shots
            browser.evaluate("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                             "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true')")
            # 1. the deep link: only the front's runs, with accuracy and throughput columns, in the runs view
            browser.goto(url)
            text = browser.wait_for_text(*[name for name, _, _ in front], "val/acc", "perf/train_tok_s", timeout=90)
            assert "Training runs" in text or "Runs" in text
            for name, acc, tok in front:
                assert acc in text and tok in text, (name, acc, tok)
            for name in dominated:
                assert name not in text, name
            assert f"{len(front)} matching runs" in text
            if shots:
                browser.screenshot(shots / "mlflow_front_runs.png")
            # 2. the sweep's run: the description holds the front table and shows the Pareto image
            browser.goto(parent_url)
            browser.wait_for_text("Description", "Pareto front", timeout=60)
            browser.evaluate("(() => { const e = [...document.querySelectorAll('button, a, span')]"
                             ".find(e => e.innerText === 'Show more'); if (e) e.click(); return !!e; })()")
            width = browser.wait_for("(() => { const i = [...document.images].find(i => i.src.includes("
                                     "'get-artifact?path=pareto.png')); return i && i.complete && i.naturalWidth; })()",
                                     timeout=60)
            assert width > 600
            text = browser.text()
            for name, acc, _ in front:
                assert name.split(" ·")[0] in text and acc in text
            if shots:
                browser.screenshot(shots / "mlflow_sweep_run_description.png")
            # 3. the Pareto image in the artifact view of the sweep's run
            experiment_id, run_id = parent_url.split("/experiments/")[1].split("?")[0].split("/runs/")
            browser.goto(run_url(server.links["Pareto front"].split("/#/")[0], experiment_id, run_id, "pareto.png"))
            browser.wait_for("[...document.images].some(i => i.complete && i.naturalWidth > 600)", timeout=60)
            if shots:
                browser.screenshot(shots / "mlflow_pareto_png.png")
        return server.links
    finally:
        server.stop()


@pytest.mark.skipif(chromium_binary() is None, reason="no chromium (apt-get install chromium)")
def test_ui_lands_on_the_front_in_chromium(tmp_path):
    pytest.importorskip("websocket")
    started = time.time()
    folder = tmp_path / "browse-demo"
    build_sweep(folder)
    front = [("S8-dn2-vec · parity", "0.9961", "2560000"), ("dn2 · parity", "0.9844", "5440000"),
             ("S8-dn2-vec · mod_arith", "0.8325", "2590000"), ("dn2 · mod_arith", "0.5334", "3230000")]
    check_ui(folder, front, dominated=["C8-dn2-vec"], shots=Path(os.environ["HQLT_SHOTS"]) if
             os.environ.get("HQLT_SHOTS") else None)
    assert time.time() - started < 160


def main(argv: list[str]) -> int:
    """Screenshots of a real sweep: copy SWEEP_DIR, `hqlt report` it, check the UI, keep the shots in OUT_DIR."""
    import mlflow

    source, out = Path(argv[0]), Path(argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / source.name
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns("report"))
        subprocess.run([sys.executable, "-m", "hqlt.cli", "report", str(folder)], check=True, stdout=subprocess.DEVNULL)
        meta = json.loads((folder / "sweep.json").read_text())
        cl = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
        exp = cl.get_experiment_by_name(meta["name"])
        runs = cl.search_runs([exp.experiment_id], filter_string="tags.pareto_rank = '0'")
        front = [(r.info.run_name, "", "") for r in runs]
        check_ui(folder, front, dominated=[], shots=out)
    print(f"screenshots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
