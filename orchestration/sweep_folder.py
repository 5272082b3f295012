"""A sweep folder: its sweep.json, where its MLflow store is, and a folder moved after it was made (copied
to another host, committed to a repository).

Kept free of torch and Ray: ``hqlt report DIR``, ``hqlt status`` and the MLflow callback use it too.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from hqlt.blocks.validation import ConfigError
from hqlt.search_space.vocabulary import DRIVER_LOCK, MLFLOW_DB, SWEEP_JSON, sqlite_uri

SWEEP_DIR_ENV = "HQLT_SWEEP_DIR"  # the folder of the sweep this driver runs (read when state is restored)


def read_meta(directory: Path) -> Optional[dict]:
    """The sweep.json of a sweep folder ({} if it holds no mapping); None when the folder has none.
    Raises ConfigError when it cannot be read."""
    path = Path(directory) / SWEEP_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError("", f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def write_meta(directory: Path, meta: dict) -> None:
    """Write sweep.json whole or not at all (aside, then renamed): a kill never leaves half a file."""
    path = Path(directory) / SWEEP_JSON
    tmp = path.with_name(f".{SWEEP_JSON}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(path)


_META_LOCK = threading.Lock()  # the driver's threads (the run clock, the main thread) share sweep.json


def update_meta(directory: Path, change: Callable[[dict], None]) -> dict:
    """Read sweep.json, apply `change` to it in place, write it back (atomically); returns it."""
    with _META_LOCK:
        meta = read_meta(directory) or {}
        change(meta)
        write_meta(directory, meta)
        return meta


def new_sweep_id() -> str:
    """A sweep's identity (sweep.json `sweep_id`, the parent run's `hqlt.sweep_id` tag): never its name or spec."""
    return uuid.uuid4().hex


def hold_folder(directory: Path):
    """Take the folder's driver lock (an flock on DRIVER_LOCK, released by the kernel when the process dies,
    however it dies); refuses a second driver on the same folder. Returns the open lock file: keep it."""
    import fcntl

    handle = open(Path(directory) / DRIVER_LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError("--dir", f"{directory} is in use by a running sweep ({holder}); wait for it to end, "
                                   "or stop it first") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    return handle


def folder_in_use(directory: Path) -> Optional[str]:
    """Who holds the folder's driver lock (`pid N on HOST`), or None when no driver runs the sweep now."""
    import fcntl

    path = Path(directory) / DRIVER_LOCK
    if not path.is_file():
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return handle.read().strip() or "another process"
    return None


def repair_journal(path: Path) -> None:
    """An Optuna journal after a hard kill, with this driver holding the folder (hold_folder): drop a stale
    writer lock (Optuna would wait 30 s for it) and a last line cut off mid-write (a later append would
    otherwise glue onto it and make the journal unreadable)."""
    lock = path.with_name(path.name + ".lock")  # optuna's JournalFileSymlinkLock; released by rename + unlink
    for stale in (lock, *path.parent.glob(f"{lock.name}*.rename")):
        if stale.is_symlink() or stale.exists():
            stale.unlink()
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


class RunClock:
    """This run's wall time in sweep.json (`runs[-1].wall_s`, and `wall_s`: the total over runs), brought up
    to date every `period` seconds while the run lasts, so that a run killed at any moment still counts (up to
    its last update)."""

    def __init__(self, directory: Path, period: float = 2.0):
        self.directory, self.period, self.started = Path(directory), period, time.time()
        self._stop = threading.Event()

        def begin(meta: dict) -> None:
            meta.setdefault("runs", []).append({"host": socket.gethostname(), "started": _now(), "wall_s": 0.0})
            self.index = len(meta["runs"])

        update_meta(self.directory, begin)
        self._thread = threading.Thread(target=self._beat, name="hqlt-run-clock", daemon=True)
        self._thread.start()

    def update(self, ended: bool = False) -> dict:
        """sweep.json with this run's wall time so far (and the total over runs) written into it."""
        wall = time.time() - self.started

        def change(meta: dict) -> None:
            runs = meta.setdefault("runs", [])
            if len(runs) >= self.index:
                runs[self.index - 1]["wall_s"] = round(wall, 1)
                if ended:
                    runs[self.index - 1]["ended"] = _now()
            meta["wall_s"] = round(sum(float(r.get("wall_s") or 0.0) for r in runs), 1)

        return update_meta(self.directory, change)

    def _beat(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.update()
            except Exception:  # noqa: BLE001 — a clock update never stops the sweep
                pass

    @property
    def wall_s(self) -> float:
        """This run's wall time so far."""
        return time.time() - self.started

    def stop(self) -> float:
        """The last update (this run ended); returns the sweep's total wall time over all its runs."""
        self._stop.set()
        self._thread.join(timeout=10)
        return float(self.update(ended=True)["wall_s"])


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def tracking_uri(directory: Path, meta: Optional[dict]) -> str:
    """Where a sweep folder logs: the tracking server its sweep.json names, else its own mlflow.db."""
    return (meta or {}).get("tracking_uri") or sqlite_uri(directory)


def use_sweep_dir(directory: Path) -> None:
    """Make `directory` the folder of the sweep this driver runs (see current_sweep_dir)."""
    os.environ[SWEEP_DIR_ENV] = str(Path(directory).resolve())


def current_sweep_dir() -> Optional[Path]:
    """The folder of the sweep this driver runs. Read from the environment, not from pickled state: Ray
    unpickles the searcher and callbacks of a resumed sweep, and a folder copied elsewhere must keep
    writing into its own optuna.log and mlflow.db."""
    here = os.environ.get(SWEEP_DIR_ENV)
    return Path(here) if here else None


def current_tracking_uri() -> str:
    """The embedded store of the sweep this driver runs (see SWEEP_DIR_ENV)."""
    return sqlite_uri(os.environ[SWEEP_DIR_ENV])


def relocate_embedded_store(directory: Path, old_path: str) -> None:
    """A sweep folder copied to another path or host: MLflow stored absolute artifact locations in its
    SQLite file, and has no API to change them; rewrite the old folder prefix to the new one."""
    import sqlite3

    old, new = Path(old_path).as_uri(), directory.resolve().as_uri()
    with sqlite3.connect(directory / MLFLOW_DB) as con:
        con.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
        con.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))


def adopt_moved_folder(directory: Path) -> bool:
    """A sweep folder with its embedded store, opened at another path than it was made at (copied to
    another host, or committed to a repository): point the store's artifact locations here and record the
    new path in sweep.json. True when something was moved."""
    meta = read_meta(directory) or {}
    here = str(directory.resolve())
    if meta.get("tracking_uri") or not meta.get("path") or meta["path"] == here:
        return False
    relocate_embedded_store(directory, meta["path"])
    meta["path"] = here
    write_meta(directory, meta)
    return True
