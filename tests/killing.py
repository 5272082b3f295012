"""Killing a whole `hqlt sweep` run, as a crash or `kill -9` of everything would (tests/test_sweep_kill.py,
tests/test_sweep_cluster.py): every process group below the command, then every process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def run_env(**extra) -> dict:
    """The environment of a `hqlt` command in the tests: no Ray token auth, no inherited fault point or cluster."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **extra}
    for key in ("HQLT_FAULT_AT", "HQLT_FAULT_FILE", "RAY_ADDRESS"):
        if key not in extra:
            env.pop(key, None)
    return env


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (from /proc: a local Ray's processes are children of the driver, the
    trial workers children of the raylet)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def kill_everything(proc: subprocess.Popen) -> None:
    """SIGKILL every process group of the run, then every process of it (one that left its group)."""
    pids = descendants(proc.pid)
    groups = set()
    for p in pids:
        try:
            groups.add(os.getpgid(p))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgrp())  # never the test's own group
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def start(args: list, cwd: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hqlt.cli", *map(str, args)], cwd=cwd, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=run_env(**env))


def wait_for(marker: Path, proc: subprocess.Popen, what: str, timeout: float) -> dict:
    """The fault point's marker file, once `proc` (still running) has written it."""
    deadline = time.time() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s")
        time.sleep(0.2)
    time.sleep(0.1)
    return json.loads(marker.read_text())


def run_until(args: list, cwd: Path, point: str, marker: Path, timeout: float = 150.0) -> dict:
    """Start `hqlt ARGS`, wait until it reaches fault point `point`, kill the whole run there; the marker's data."""
    marker.unlink(missing_ok=True)
    proc = start(args, cwd, HQLT_FAULT_AT=point, HQLT_FAULT_FILE=str(marker))
    try:
        return wait_for(marker, proc, f"fault point {point}", timeout)
    finally:
        kill_everything(proc)


def hqlt(*args, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hqlt.cli", *map(str, args)], cwd=cwd, env=run_env(),
                          capture_output=True, text=True, timeout=timeout)
