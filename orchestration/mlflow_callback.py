"""A Ray Tune callback that writes the sweep to MLflow from the driver, resumably.

Unlike Ray's MLflowLoggerCallback (trial → run mapping kept only in memory, FINISHED/FAILED only), runs
are found again by their `trial_id` tag after `Tuner.restore`, steps already logged are not logged
twice, and the hqlt status (completed / failed / oom / nan / pruned / infeasible) becomes a tag.
"""
from __future__ import annotations

import json
import time

from ray.tune import Callback

from . import tracking
from .trainable import DONE_KEY

TERMINAL = {"completed": "FINISHED", "pruned": "KILLED"}


def find_or_create_parent(cl, experiment: str, sweep_name: str, objectives: list, spec_hash: str,
                          artifact_location: str | None = None) -> str:
    exp_id = tracking.ensure_experiment(cl, experiment, artifact_location)
    runs = cl.search_runs([exp_id], filter_string="tags.`hqlt.role` = 'sweep'", max_results=10)
    for run in runs:
        if run.data.tags.get("hqlt.spec_hash") == spec_hash:
            return run.info.run_id
    run = cl.create_run(exp_id, run_name=sweep_name, tags={
        "hqlt.role": "sweep", "hqlt.sweep_name": sweep_name, "hqlt.spec_hash": spec_hash,
        "hqlt.objectives": json.dumps([[m, mode] for m, mode in objectives])})
    return run.info.run_id


class MlflowSweepCallback(Callback):
    def __init__(self, tracking_uri: str | None, experiment: str, parent_run_id: str):
        # None: the sweep folder's own mlflow.db, located when used — Ray pickles this callback with the
        # experiment, and a folder copied elsewhere must keep writing into its own copy.
        self.tracking_uri, self.experiment, self.parent_run_id = tracking_uri, experiment, parent_run_id
        self._cl = None
        self._runs: dict[str, str] = {}  # trial_id -> run_id
        self._last_step: dict[str, int] = {}
        self._started: dict[str, float] = {}  # trial_id -> driver time at start

    # Ray pickles callbacks into the experiment state; the MLflow client is rebuilt lazily.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cl"] = None
        return state

    @property
    def cl(self):
        if self._cl is None:
            from .sweep import current_tracking_uri

            self._cl = tracking.client(self.tracking_uri or current_tracking_uri())
        return self._cl

    def _run_for(self, trial) -> str:
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        exp_id = tracking.ensure_experiment(self.cl, self.experiment)
        found = self.cl.search_runs([exp_id], filter_string=f"tags.trial_id = '{tid}'", max_results=5)
        if found:
            rid = found[0].info.run_id
            history = self.cl.get_metric_history(rid, "step")
            self._last_step[tid] = int(max((m.value for m in history), default=0))
        else:
            run = self.cl.create_run(exp_id, run_name=f"trial-{tid}", tags={
                "mlflow.parentRunId": self.parent_run_id, "hqlt.role": "trial", "trial_id": tid,
                "status": "running"})
            rid = run.info.run_id
            tracking.log_params(self.cl, rid, {k: v for k, v in trial.config.items()})
            self._last_step[tid] = 0
        self._runs[tid] = rid
        return rid

    def on_trial_start(self, iteration, trials, trial, **info):
        self._started[trial.trial_id] = time.time()
        self._run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        rid = self._run_for(trial)
        step = int(result.get("step") or result.get("training_iteration", 0))
        if step <= self._last_step.get(trial.trial_id, 0):
            return  # already logged before a restart of this trial
        self._last_step[trial.trial_id] = max(step, self._last_step.get(trial.trial_id, 0))
        tracking.log_metrics(self.cl, rid, {k: v for k, v in result.items() if "/" in k or k == "step"}, step)

    def _finish(self, trial, status: str, reason: str) -> None:
        rid = self._run_for(trial)
        last = trial.last_result or {}
        tags = {"status": status, "reason": reason[:4000]}
        for key, tag in (("trial/arch", "arch"), ("trial/config_hash", "config_hash"), ("trial/seeds", "seed")):
            if last.get(key) is not None:
                tags[tag] = last[key]
        if last.get("baseline"):
            tags["baseline"] = last["baseline"]
        tracking.set_tags(self.cl, rid, tags)
        if trial.trial_id in self._started and last.get("time/trainable_s") is not None:
            # Start-up overhead as the driver sees it: scheduling, process start / reuse, result delivery.
            wall = time.time() - self._started[trial.trial_id]
            tracking.log_metrics(self.cl, rid, {"trial/wall_s": wall,
                                                "trial/overhead_s": max(0.0, wall - last["time/trainable_s"])},
                                 step=int(last.get("step", 0) or 0))
        self.cl.set_terminated(rid, TERMINAL.get(status, "FAILED"), end_time=int(time.time() * 1000))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        if not last.get(DONE_KEY):
            self._finish(trial, "pruned", "stopped early by the scheduler")
        else:
            self._finish(trial, str(last.get("trial/status", "completed")), str(last.get("trial/reason", "")))

    def on_trial_error(self, iteration, trials, trial, **info):
        err = getattr(trial, "error_file", None) or ""
        self._finish(trial, "failed", f"trial process errored ({err})" if err else "trial process errored")
