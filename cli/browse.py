"""`hqlt ui DIR` (MLflow, opened on the Pareto front) and `hqlt dashboard DIR` (optuna-dashboard, live).

Both start their server as a child process, poll it until it answers, and only then print the link (and open it
with `--open`), so the link printed works at once. Ctrl-C (or SIGTERM) stops the server.
"""
from __future__ import annotations

import importlib.util
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from hqlt.blocks.validation import ConfigError

START_TIMEOUT_S = 180.0


def _sweep(directory: str) -> dict:
    from .sweep import _sweep_meta

    return _sweep_meta(directory)


def _check_port(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ConfigError("--port", f"127.0.0.1:{port} is in use; pick another with --port") from None


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status < 500
    except Exception:  # noqa: BLE001 — not up yet
        return False


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path(sys.executable).with_name(name))


def serve(cmd: list[str], probe_url: str, what: str, links: list[tuple[str, str]], open_link: bool) -> int:
    """Start `cmd`, wait until `probe_url` answers, print `links` ((label, url), the first one is opened with
    `open_link`), then wait for the server; Ctrl-C / SIGTERM stop it."""
    print(f"starting {what} …", flush=True)
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stop(signum, frame):  # SIGTERM as Ctrl-C: the server goes down with us
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while not _answers(probe_url):
            if proc.poll() is not None:
                err = (proc.stderr.read() or "").strip().splitlines()
                raise ConfigError("", f"{what} exited with {proc.returncode}: {err[-1] if err else 'no output'}")
            if time.time() - started > START_TIMEOUT_S:
                raise ConfigError("", f"{what} did not answer on {probe_url} within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.25)
        width = max(len(label) for label, _ in links)
        print(f"{what} is up ({time.time() - started:.0f} s); Ctrl-C to stop", flush=True)
        for label, url in links:
            print(f"  {label:<{width}}  {url}", flush=True)
        if open_link:
            import webbrowser

            if not webbrowser.open(links[0][1]):
                print("  (no browser found here: open the link above by hand)", flush=True)
        proc.stderr.close()  # the server's log is not needed any more (and must not fill the pipe)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


class ui:  # noqa: N801 — a subcommand namespace
    @staticmethod
    def configure_parser(p) -> None:
        p.add_argument("dir", help="sweep folder")
        p.add_argument("--port", type=int, default=5000)
        p.add_argument("--open", action="store_true", help="open the link to the front in a web browser")

    @staticmethod
    def run(args) -> int:
        """MLflow's UI on the sweep's store, linked to the runs of the Pareto front with the objective columns."""
        import logging

        from hqlt.orchestration.sweep_folder import adopt_moved_folder
        from hqlt.reports.browse import ensure_browsable, front_url, run_url
        from hqlt.reports.mlflow_io import client_for
        from hqlt.search_space.vocabulary import (REPORT_OBJECTIVES_TAG, ROLE_SWEEP, ROLE_TAG, SWEEP_ID_TAG,
                                                  sqlite_uri)

        for noisy in ("alembic", "mlflow.store.db.utils"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        meta = _sweep(args.dir)
        uri = meta["tracking_uri"]
        remote = uri.startswith(("http://", "https://"))
        if remote:
            from hqlt.orchestration.tracking import check_server

            check_server(uri)  # down: one line now, not minutes of client retries
        if uri == sqlite_uri(args.dir):
            adopt_moved_folder(Path(args.dir))  # artifacts (the plots) are found where the folder is now
        cl = client_for(uri)
        exp = cl.get_experiment_by_name(meta["name"])
        if exp is None:
            raise ConfigError("DIR", f"{args.dir}: no MLflow experiment '{meta['name']}' in {uri} yet")
        ensure_browsable(cl, exp.experiment_id)  # the runs view (MLflow 3) and the front's shared view
        mine = f" and tags.`{SWEEP_ID_TAG}` = '{meta['sweep_id']}'" if meta.get("sweep_id") else ""  # not a namesake's
        parents = cl.search_runs([exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_SWEEP}'{mine}",
                                 max_results=1)
        reported = bool(parents) and REPORT_OBJECTIVES_TAG in parents[0].data.tags
        base = uri.rstrip("/") if remote else f"http://127.0.0.1:{args.port}"
        links = [("Pareto front:", front_url(base, exp.experiment_id))]
        if parents:
            links.append(("sweep run (front table, plots):", run_url(base, exp.experiment_id, parents[0].info.run_id)))
        if not reported:
            print(f"no report yet: the front's runs carry no pareto_rank (run: hqlt report {args.dir})")
        if remote:  # the server has its UI already: its links, no local server
            for label, url in links:
                print(f"{label} {url}")
            if args.open:
                import webbrowser

                webbrowser.open(links[0][1])
            return 0
        _check_port(args.port)
        cmd = [_exe("mlflow"), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port),
               "--workers", "1"]
        return serve(cmd, f"{base}/health", f"MLflow UI for sweep '{meta['name']}'", links, args.open)


class dashboard:  # noqa: N801
    @staticmethod
    def configure_parser(p) -> None:
        p.add_argument("dir", help="sweep folder (its optuna.log: the study, live while the sweep runs)")
        p.add_argument("--port", type=int, default=8080)
        p.add_argument("--open", action="store_true", help="open the dashboard in a web browser")

    @staticmethod
    def run(args) -> int:
        """optuna-dashboard on the sweep's Optuna journal: trials, Pareto front and history, updated as trials end."""
        from hqlt.search_space.vocabulary import OPTUNA_LOG

        if importlib.util.find_spec("optuna_dashboard") is None:
            raise ConfigError("", "optuna-dashboard is not installed: pip install 'hqlt[dashboard]'")
        meta = _sweep(args.dir)
        journal = Path(args.dir) / OPTUNA_LOG
        if not journal.is_file():
            raise ConfigError("DIR", f"{args.dir}: no {OPTUNA_LOG} (the sweep has not started its study yet)")
        named = name_metrics(journal, [m for m, _ in meta.get("objectives", [])])
        if named:
            print(f"named the objectives of {', '.join(named)} in {journal} (sweeps before hqlt named them)")
        _check_port(args.port)
        base = f"http://127.0.0.1:{args.port}"
        cmd = [_exe("optuna-dashboard"), str(journal.resolve()), "--host", "127.0.0.1", "--port", str(args.port)]
        return serve(cmd, f"{base}/api/meta", f"optuna-dashboard for sweep '{meta['name']}'",
                     [("dashboard:", f"{base}/dashboard/")], args.open)


def name_metrics(journal: Path, metrics: list[str]) -> list[str]:
    """Name the objectives of the journal's studies that have none yet; returns the studies named."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from hqlt.orchestration.sweep import name_study_metrics

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    named = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        if study.metric_names is None and metrics and len(study.directions) == len(metrics):
            name_study_metrics(study, metrics)
            named.append(summary.study_name)
    return named


COMMANDS = {"ui": ui, "dashboard": dashboard}
