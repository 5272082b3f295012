"""Fault injection for the kill-anywhere tests: stop a sweep at a precise point, so that a test can SIGKILL
every process of the run there (a timing-based kill misses the short windows that matter).

`HQLT_FAULT_AT=<point>[@<n>]` makes the process that reaches `point` for the n-th time (default: the first;
counted per process) write `HQLT_FAULT_FILE` (JSON: the point, its pid and process group, and what the caller
passed) and then wait to be killed. Unset, `fault_point` does nothing. Worker processes of a local Ray inherit
the driver's environment; on a cluster a node's raylet passes its own (`ray start` / `Cluster.add_node(env_vars=)`).

Points: `ray-start` (driver: sweep.json written, nothing else; Ray about to start), `before-fit` (driver: the
parent run, the study and the Tuner exist, no trial has started), `trial-report` (worker: a trial's intermediate
report, before Ray hears of it), `result-written` (worker: a trial's final result saved in results/, before Ray
hears of it), `trial-complete` (driver: a trial's end logged to MLflow), `report` (driver: in the end-of-sweep
report, the runs tagged and the parent's report metrics logged, before the artifacts).
"""
from __future__ import annotations

import json
import os
import time

FAULT_AT_ENV = "HQLT_FAULT_AT"
FAULT_FILE_ENV = "HQLT_FAULT_FILE"
POINTS = ("ray-start", "before-fit", "trial-report", "result-written", "trial-complete", "report")
WAIT_S = 600.0  # a point waits this long for its kill, then the process exits (a test that forgot never hangs)

_hits: dict[str, int] = {}


def fault_point(point: str, **info) -> None:
    """Stop here (see the module docstring) when HQLT_FAULT_AT names this point and hit."""
    wanted = os.environ.get(FAULT_AT_ENV)
    if not wanted:
        return
    name, _, nth = wanted.partition("@")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] != int(nth or 1):
        return
    path = os.environ.get(FAULT_FILE_ENV)
    if path:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"point": point, "pid": os.getpid(), "pgid": os.getpgrp(), **info}, f, default=str)
        os.replace(tmp, path)
    time.sleep(WAIT_S)
    os._exit(99)
