"""The driver's Ray callback that deletes a trial's seed snapshots (orchestration/seed_snapshot.py) once the trial has
ended for good: completed, or stopped by the scheduler (ASHA: never resumed). A trial that errored keeps them (a
resumed sweep runs it again: `Tuner.restore(resume_errored=True)`), and so does one a driver interrupt left
unfinished: Ray calls `on_trial_complete` for neither."""
from __future__ import annotations

from ray.tune import Callback

from hqlt.search_space.vocabulary import RESULTS_DIR

from .seed_snapshot import remove_snapshots
from .sweep_folder import current_sweep_dir


class SnapshotCleanup(Callback):
    # The folder comes from the driver's environment, not from pickled state: Ray pickles callbacks into the
    # experiment, and a folder copied elsewhere must clean its own results/.
    def _clean(self, trial) -> None:
        folder = current_sweep_dir()
        if folder is not None:
            remove_snapshots(folder / RESULTS_DIR, trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._clean(trial)


__all__ = ["SnapshotCleanup"]
