"""Seed snapshots: a running seed's training state, saved at evaluation points, so that a sweep stopped mid-seed
(a kill, the end of a GPU allocation) resumes that seed where its last snapshot left it.

A snapshot holds everything the rest of the seed depends on: the weights, the optimizer state, the step, the data
stream's position (its Generator's state and the task's own stream state, `Task.stream_state`), the loss tail and last
evaluation the next report averages and carries, the checkpoint selection's state (`selection.Checkpoints`), torch's
random states and the training time so far. A resumed seed ends with the parameters an uninterrupted run ends with
(tests/test_seed_snapshot.py checks it bit for bit on CPU, for the eager and the static engine).

    results/<trial_id>.seed<i>.snapshot.pt   beside the seed records (trainable.SeedRecords)

`sweep.snapshot_minutes` sets the interval (an operational key: it can change between runs of one sweep). A snapshot
is written aside and renamed, so a kill leaves the previous one or the new one, never half of one; it names the
seed config it was made for and is ignored for any other; it is deleted once the seed's record is written, when
the trial ends otherwise (completed, stopped by the scheduler: `SnapshotCleanup`, in the driver), when a resumed
sweep finds it belongs to a trial Ray no longer knows, and when the sweep finishes. A trial that errored keeps its
snapshot: a resumed sweep runs it again (`resume_errored`). Loading
uses `torch.load(weights_only=True)`: a snapshot is data, never code.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

FORMAT = 1


def _saveable(value: Any) -> Any:
    """numpy arrays become tensors (weights_only loading reads tensors and plain containers, not numpy)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, dict):
        return {k: _saveable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_saveable(v) for v in value)
    return value


class SeedSnapshot:
    """The snapshot file of one seed: `path`; `minutes` between snapshots (0: every evaluation); `identity`: the
    hash of the seed's config (a snapshot made for another config is not used)."""

    def __init__(self, path: Path, minutes: float, identity: str):
        self.path, self.minutes, self.identity = Path(path), float(minutes), identity
        self._last = time.monotonic()

    def load(self) -> Optional[dict]:
        """The saved state, or None: no snapshot, one of another config or format, or an unreadable file (a warning)."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 — a damaged snapshot costs the seed its progress, not the sweep
            print(f"warning: seed snapshot {self.path} is unreadable ({type(exc).__name__}); the seed starts over",
                  file=sys.stderr)
            return None
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("identity") != self.identity:
            return None
        return state

    def due(self) -> bool:
        return self.minutes == 0 or time.monotonic() - self._last >= 60.0 * self.minutes

    def save(self, state: dict) -> None:
        # a temporary name of this process (a worker Ray has already replaced may still be writing), on disk
        # before the rename (a machine that goes down right after keeps the old snapshot or the new one)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(_saveable({**state, "format": FORMAT, "identity": self.identity}), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._last = time.monotonic()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        for tmp in self.path.parent.glob(f"{self.path.name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def remove_snapshots(results: Path, trial_id: str = "*") -> int:
    """Delete the seed snapshots (and half-written ones) of one trial, or of every trial; returns how many."""
    paths = list(Path(results).glob(f"{trial_id}.seed*.snapshot.pt*"))  # .pt and .pt.<pid>.tmp
    for path in paths:
        path.unlink(missing_ok=True)
    return len(paths)


def remove_unknown_snapshots(results: Path, known: set) -> int:
    """Delete the seed snapshots of trials not in `known` (trial ids Ray's restored state holds: the trials a hard
    kill orphaned are sampled again under new ids, so theirs would never be read); returns how many."""
    stale = {p.name.partition(".seed")[0] for p in Path(results).glob("*.seed*.snapshot.pt*")} - set(known)
    return sum(remove_snapshots(results, trial) for trial in stale)


def snapshots_in(results: Path) -> list[tuple[str, int, int]]:
    """(trial id, seed index, step) of each seed snapshot in a sweep folder's results/ (memory-mapped: the weights
    are not read), sorted; an unreadable file is left out."""
    out = []
    for path in sorted(Path(results).glob("*.seed*.snapshot.pt")):
        trial, _, rest = path.name.partition(".seed")
        try:
            step = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
            out.append((trial, int(rest.split(".")[0]), step))
        except Exception:  # noqa: BLE001
            continue
    return out


def rng_state(device: torch.device) -> dict:
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


__all__ = ["FORMAT", "SeedSnapshot", "remove_snapshots", "remove_unknown_snapshots", "rng_state", "set_rng_state",
           "snapshots_in"]
