"""A Ray Tune callback that writes the sweep to MLflow from the driver, resumably.

Unlike Ray's MLflowLoggerCallback (trial → run mapping kept only in memory, FINISHED/FAILED only), runs
are found again by their `trial_id` tag after `Tuner.restore`, steps already logged are not logged
twice, and the hqlt status (completed / failed / oom / nan / pruned / infeasible) becomes a tag.
"""
from __future__ import annotations

import json
import time

from ray.tune import Callback

from hqlt.search_space import labels
from hqlt.search_space.vocabulary import (ARCH_TAG, BASELINE_TAG, COMPLETED, CONFIG_HASH_TAG, FAILED,
                                          OBJECTIVES_TAG, PARENT_TAG, PRUNED, REASON_TAG, ROLE_SWEEP, ROLE_TAG,
                                          RESULT_TAGS, ROLE_TRIAL, RUNNING, SEED_TAG, SPEC_HASH_TAG,
                                          STATUS_TAG, REPLAYED_KEY, SWEEP_ID_TAG,
                                          SWEEP_NAME_TAG, TIME_TRAINABLE, TRIAL_ID_TAG,
                                          CONSTANT_METRIC_PREFIXES)

from . import tracking
from .faults import fault_point
from .sweep_folder import current_tracking_uri
from .trainable import DONE_KEY

TERMINAL = {COMPLETED: "FINISHED", PRUNED: "KILLED"}


def find_or_create_parent(cl, experiment: str, sweep_name: str, objectives: list, spec_hash: str, sweep_id: str,
                          artifact_location: str | None = None, adopt_legacy: bool = False):
    """The parent run (an mlflow Run) of the sweep `sweep_id`, created with its tags when there is none. Never
    found by name or spec hash: two sweeps of one spec on one server are two sweeps. `adopt_legacy` (a folder
    from before sweep ids, with its own store): its parent, found by spec hash, is given the sweep id."""
    exp_id = tracking.ensure_experiment(cl, experiment, artifact_location)
    run = tracking.find_parent(cl, experiment, sweep_id)
    if run is not None:
        return run
    if adopt_legacy:
        for run in cl.search_runs([exp_id], filter_string=tracking.role_filter(ROLE_SWEEP), max_results=10):
            if run.data.tags.get(SPEC_HASH_TAG) == spec_hash and SWEEP_ID_TAG not in run.data.tags:
                cl.set_tag(run.info.run_id, SWEEP_ID_TAG, sweep_id)
                return cl.get_run(run.info.run_id)
    return cl.create_run(exp_id, run_name=sweep_name, tags={
        ROLE_TAG: ROLE_SWEEP, SWEEP_NAME_TAG: sweep_name, SPEC_HASH_TAG: spec_hash, SWEEP_ID_TAG: sweep_id,
        OBJECTIVES_TAG: json.dumps([[m, mode] for m, mode in objectives])})


class MlflowSweepCallback(Callback):
    arms: dict = {}  # {key: the JSON labels of its whole-arm choices}: arm ids (`arm2`) in the params

    def __init__(self, tracking_uri: str | None, experiment: str, parent_run_id: str, arms: dict | None = None):
        # None: the sweep folder's own mlflow.db, located when used — Ray pickles this callback with the
        # experiment, and a folder copied elsewhere must keep writing into its own copy.
        self.tracking_uri, self.experiment, self.parent_run_id = tracking_uri, experiment, parent_run_id
        self.arms = dict(arms or {})
        self._logged_constants: dict[str, dict] = {}  # trial_id -> {constant metric: value last logged}
        self._named: set[str] = set()  # trial_ids whose run name carries the architecture id
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
            self._cl = tracking.client(self.tracking_uri or current_tracking_uri())
        return self._cl

    def _run_for(self, trial) -> str:
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        exp_id = tracking.ensure_experiment(self.cl, self.experiment)
        # this sweep's run of the trial (its parent run): never another sweep's run of a same-named trial
        found = self.cl.search_runs([exp_id], max_results=5, filter_string=(
            f"tags.{TRIAL_ID_TAG} = '{tid}' and tags.`{PARENT_TAG}` = '{self.parent_run_id}'"))
        if found:
            rid = found[0].info.run_id
            history = self.cl.get_metric_history(rid, "step")
            self._last_step[tid] = int(max((m.value for m in history), default=0))
            if not found[0].data.params:  # a kill between the run's creation and its params
                tracking.log_params(self.cl, rid, labels.flat_params(trial.config, self.arms))
        else:
            run = self.cl.create_run(exp_id, run_name=labels.run_name(f"trial-{tid}", trial.config), tags={
                PARENT_TAG: self.parent_run_id, ROLE_TAG: ROLE_TRIAL, TRIAL_ID_TAG: tid, STATUS_TAG: RUNNING})
            rid = run.info.run_id
            tracking.log_params(self.cl, rid, labels.flat_params(trial.config, self.arms))
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
        tracking.log_metrics(self.cl, rid, self._changed({k: v for k, v in result.items() if "/" in k or k == "step"},
                                                         trial.trial_id), step)
        self._name_run(trial, rid, result.get("trial/arch"))

    def _changed(self, metrics: dict, tid: str) -> dict:
        """`metrics` less the constant ones (sizes, throughput probe) already logged with the same value."""
        seen = self.__dict__.setdefault("_logged_constants", {}).setdefault(tid, {})
        out = {}
        for key, value in metrics.items():
            if key.startswith(CONSTANT_METRIC_PREFIXES):
                if seen.get(key) == value:
                    continue
                seen[key] = value
            out[key] = value
        return out

    def _name_run(self, trial, rid: str, arch) -> None:
        """Once the architecture id is known (every report carries it), it leads the run name."""
        named = self.__dict__.setdefault("_named", set())
        if arch and trial.trial_id not in named:
            named.add(trial.trial_id)
            self.cl.update_run(rid, name=labels.run_name(str(arch), trial.config))

    def _finish(self, trial, status: str, reason: str) -> None:
        rid = self._run_for(trial)
        last = trial.last_result or {}
        tags = {STATUS_TAG: status, REASON_TAG: reason[:4000]}
        for key, tag in (("trial/arch", ARCH_TAG), ("trial/config_hash", CONFIG_HASH_TAG), ("trial/seeds", SEED_TAG),
                         *RESULT_TAGS.items()):
            if last.get(key) is not None:
                tags[tag] = last[key]
        if last.get("baseline"):
            tags[BASELINE_TAG] = last["baseline"]
        tracking.set_tags(self.cl, rid, tags)
        step = int(last.get("step", 0) or 0)
        # Start-up overhead as the driver sees it: scheduling, process start / reuse, result delivery. Not for a
        # result replayed from results/ by a restarted trial (its time is the replay's), and never twice at a step
        # (a trial that ended just before a kill ends again on resume).
        if (trial.trial_id in self._started and last.get(TIME_TRAINABLE) is not None
                and not last.get(REPLAYED_KEY) and not tracking.metric_logged(self.cl, rid, "trial/wall_s", step)):
            wall = time.time() - self._started[trial.trial_id]
            tracking.log_metrics(self.cl, rid, {"trial/wall_s": wall,
                                                "trial/overhead_s": max(0.0, wall - last[TIME_TRAINABLE])},
                                 step=step)
        self.cl.set_terminated(rid, TERMINAL.get(status, "FAILED"), end_time=int(time.time() * 1000))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        if not last.get(DONE_KEY):
            self._finish(trial, PRUNED, "stopped early by the scheduler")
        else:
            self._finish(trial, str(last.get("trial/status", COMPLETED)), str(last.get("trial/reason", "")))
        fault_point("trial-complete", trial_id=trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        err = getattr(trial, "error_file", None) or ""
        self._finish(trial, FAILED, f"trial process errored ({err})" if err else "trial process errored")
