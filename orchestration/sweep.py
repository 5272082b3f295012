"""`hqlt sweep`: a validated spec → Ray Tune (OptunaSearch, FIFO or ASHA) → MLflow, resumable.

Sweep folder layout (everything a resume needs):
    sweep.json      name, spec hash, objectives, tracking URI, folder path, wall time of each run
    spec.yaml       the merged spec as run
    optuna.log      Optuna journal (the study)
    mlflow.db       embedded MLflow store (unless --tracking-uri)
    ray/            Ray Tune experiment state (Tuner.restore)
    results/        per trial: the final result (<trial_id>.json) and each completed seed (.seed<i>.json)
    gpu_util.csv    GPU utilization sampled by the driver (gpu_monitor), one segment per run
    cache/          Triton / Inductor compile caches shared by all trials (not needed to resume)
Parent-run metrics: sweep/wall_s (all runs), sweep/run_wall_s, sweep/n_<status>, sweep/trial_overhead_s,
sweep/trial_setup_s, sweep/gpu_busy_frac[_gpu<i>], sweep/gpu_hours, sweep/trials_per_gpu_hour.
Re-running the same command on the same folder resumes; a changed spec is refused unless --fresh.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from hqlt.blocks.configs import ConfigError

from . import gpu_monitor
from .sweep_folder import adopt_moved_folder
from .gpu_monitor import GpuMonitor
from .space_hooks import HOOKS
from .trainable import DONE_KEY, tune_trainable

EXPERIMENT_DIR = "ray"


TRIAL_NUMBER_KEY = "hqlt.optuna_number"
SWEEP_DIR_ENV = "HQLT_SWEEP_DIR"  # the folder of the sweep this driver runs (read when state is restored)


class NumberedSpace:
    """The compiled space, plus the Optuna trial number in each Ray trial's config — how a resume tells
    Optuna trials that Ray knows from orphans of a hard kill."""

    def __init__(self, space_fn):
        self.space_fn = space_fn

    def __call__(self, trial):
        extra = self.space_fn(trial) or {}
        return {**extra, TRIAL_NUMBER_KEY: trial.number}


def _searcher_class():
    """An OptunaSearch subclass (Ray is imported lazily, so `hqlt validate` stays light)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    class _Search(OptunaSearch):
        """Tells Optuna the hqlt status: completed → COMPLETE, stopped by the scheduler → PRUNED (never
        COMPLETE with partial values), failed / oom / nan / infeasible → FAIL with the reason attached."""

        def restore(self, checkpoint_path):
            """Re-point the restored study at the journal of the folder being resumed, which may have been
            copied from another host or path since the state was saved."""
            super().restore(checkpoint_path)
            here = os.environ.get(SWEEP_DIR_ENV)
            if not here:
                return
            import optuna
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            self._storage = JournalStorage(JournalFileBackend(str(Path(here) / "optuna.log")))
            self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage,
                                               sampler=self._sampler, pruner=self._ot_study.pruner)
            self._ot_trials = {tid: optuna.Trial(self._ot_study, t._trial_id) for tid, t in self._ot_trials.items()}

        def on_trial_result(self, trial_id, result):
            try:
                super().on_trial_result(trial_id, result)
            except UpdateFinishedTrialError:
                pass  # a trial Ray's last snapshot saw running, already told to Optuna before a hard kill

        def on_trial_complete(self, trial_id, result=None, error=False):
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            ot_trial = self._ot_trials[trial_id]
            result = result or {}
            status = result.get("trial/status", "failed" if error else "pruned")
            if error:
                status = "failed"
            elif not result.get(DONE_KEY):
                status = "pruned"
            metrics = self.metric if isinstance(self.metric, list) else [self.metric]
            values = [result.get(m) for m in metrics]
            self._completed_trials.add(trial_id)
            try:
                ot_trial.set_user_attr("hqlt.status", status)
                if result.get("trial/reason"):
                    ot_trial.set_user_attr("hqlt.reason", str(result["trial/reason"])[:500])
                if status == "completed" and all(v is not None and v == v for v in values):
                    self._ot_study.tell(ot_trial, values if len(values) > 1 else values[0], state=TrialState.COMPLETE)
                elif status == "pruned":
                    self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
                else:
                    self._ot_study.tell(ot_trial, state=TrialState.FAIL)
            except UpdateFinishedTrialError:
                pass  # see on_trial_result
            except RuntimeError as exc:
                # GridSampler.after_trial calls Study.stop() once the grid is exhausted, which raises outside
                # study.optimize; the trial itself has been told by then.
                if "Study.stop" not in str(exc):
                    raise

    return _Search


def embedded_uri(directory: Path) -> str:
    return f"sqlite:///{(directory / 'mlflow.db').resolve()}"


def current_tracking_uri() -> str:
    """The embedded store of the sweep this driver runs (see SWEEP_DIR_ENV)."""
    return embedded_uri(Path(os.environ[SWEEP_DIR_ENV]))


def sweep_dir_for(spec, given: Optional[str]) -> Path:
    return Path(given) if given else Path("sweeps") / spec.name


def prepare_dir(directory: Path, spec, fresh: bool) -> bool:
    """Returns True when resuming. Refuses a changed spec unless fresh."""
    meta = directory / "sweep.json"
    if meta.exists() and not fresh:
        old = json.loads(meta.read_text())
        if old.get("spec_hash") != spec.hash:
            raise ConfigError("", f"{directory}: holds a sweep of a different spec (hash {old.get('spec_hash')} ≠ "
                                  f"{spec.hash}); rerun with --fresh to discard it, or use another --dir")
        return True
    if fresh and directory.exists():
        shutil.rmtree(directory)
    return False


def _check_cluster(directory: Path, tracking_uri: str) -> None:
    """With a Ray cluster the sweep folder must be visible on every node and MLflow must be a server."""
    import ray

    if not tracking_uri.startswith(("http://", "https://", "postgresql", "mysql", "databricks")):
        raise ConfigError("--tracking-uri", f"got {tracking_uri!r}; on a Ray cluster use an MLflow server "
                                            "(http://host:5000 or postgresql://...)")
    marker = directory / f".shared-check-{os.getpid()}"
    marker.write_text("hqlt")

    @ray.remote(num_cpus=0)
    def visible(path: str) -> tuple[str, bool]:
        import socket

        return socket.gethostname(), os.path.exists(path)

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    checks = ray.get([visible.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                      .remote(str(marker.resolve())) for n in nodes])
    marker.unlink()
    missing = [host for host, ok in checks if not ok]
    if missing:
        raise ConfigError("--dir", f"{directory} is not visible on nodes {', '.join(missing)}; "
                                   "put the sweep folder on storage shared by all nodes")


def _reconcile_orphans(study, cl, experiment: str, known: dict) -> None:
    """After a hard kill, Optuna may hold RUNNING trials and MLflow child runs that Ray's last snapshot
    never recorded; Ray samples those again as new trials, so the orphans are closed (Optuna FAIL with
    `hqlt.orphaned`) and their MLflow runs deleted — no duplicates, none lost."""
    from optuna.trial import TrialState

    tracked = {cfg.get(TRIAL_NUMBER_KEY) for cfg in known.values()}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number not in tracked:
            study._storage.set_trial_user_attr(t._trial_id, "hqlt.orphaned", True)
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    exp = cl.get_experiment_by_name(experiment)
    if exp is None:
        return
    for run in cl.search_runs([exp.experiment_id], filter_string="tags.`hqlt.role` = 'trial'", max_results=50000):
        if run.data.tags.get("trial_id") not in known:
            cl.delete_run(run.info.run_id)


def run_sweep(spec, *, directory: Path, tracking_uri: Optional[str], address: Optional[str], fresh: bool,
              verbose: int = 1) -> int:
    import optuna
    import ray
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from ray import tune
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig, Tuner

    from hqlt.search_space import compile_space, make_sampler, study_name

    from . import tracking
    from .mlflow_callback import MlflowSweepCallback, find_or_create_parent

    s = spec.sweep
    name = spec.name
    resuming = prepare_dir(directory, spec, fresh)
    address = address or os.environ.get("RAY_ADDRESS")
    meta = json.loads((directory / "sweep.json").read_text()) if resuming else {}
    if resuming and not tracking_uri:  # a resumed sweep keeps writing to the server it started with
        tracking_uri = meta.get("tracking_uri")
    embedded = not tracking_uri
    if resuming and embedded:
        adopt_moved_folder(directory)
    tracking_uri = tracking_uri or embedded_uri(directory)
    if address and not tracking_uri.startswith(("http://", "https://", "postgresql", "mysql", "databricks")):
        raise ConfigError("--tracking-uri", f"got {tracking_uri!r}; on a Ray cluster (--address / RAY_ADDRESS) "
                                            "use an MLflow server (http://host:5000 or postgresql://...)")
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[SWEEP_DIR_ENV] = str(directory.resolve())
    cache = (directory / "cache").resolve()
    objectives = [(o.metric, o.mode) for o in s.objectives]
    if not resuming:
        (directory / "spec.yaml").write_text(spec.text)
        (directory / "sweep.json").write_text(json.dumps({
            "name": name, "spec_hash": spec.hash, "objectives": objectives, "path": str(directory.resolve()),
            "tracking_uri": None if embedded else tracking_uri,  # null: mlflow.db in this folder, wherever it moves
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))

    threads = max(1, int(s.resources.cpu))
    env = {"TRITON_CACHE_DIR": str(cache / "triton"), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
           "HQLT_TRIAL_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # small window between a trial start and its snapshot
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's status table as the live view
    if not ray.is_initialized():
        ray.init(address=address, runtime_env={"env_vars": env}, include_dashboard=False,
                 log_to_driver=verbose > 1, configure_logging=True, logging_level="WARNING")
    try:
        if address:
            _check_cluster(directory, tracking_uri)
        cl = tracking.client(tracking_uri)
        parent_id = find_or_create_parent(cl, name, name, objectives, spec.hash,
                                          (directory / "artifacts").resolve().as_uri())
        if not resuming:
            cl.log_text(parent_id, spec.text, "spec.yaml")
            tracking.log_params(cl, parent_id, {"sweep": json.loads(json.dumps(asdict(s), default=str))})

        storage = JournalStorage(JournalFileBackend(str((directory / "optuna.log").resolve())))
        study = study_name(spec)
        metrics, modes = [m for m, _ in objectives], [mode for _, mode in objectives]
        single = len(objectives) == 1
        space_fn = NumberedSpace(compile_space(spec, HOOKS))
        searcher = _searcher_class()(
            space=space_fn, metric=metrics[0] if single else metrics, mode=modes[0] if single else modes,
            sampler=make_sampler(s, spec.params), study_name=study, storage=storage)
        scheduler = None
        if s.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(metric=metrics[0], mode=modes[0], time_attr="training_iteration",
                                      max_t=s.asha.max_t, grace_period=s.asha.grace_period,
                                      reduction_factor=s.asha.reduction_factor)
        trainable = tune.with_resources(
            tune.with_parameters(tune_trainable, spec=spec, objectives=objectives, seeds=s.seeds,
                                 seed_aggregate=s.seed_aggregate, results_dir=str((directory / "results").resolve())),
            {"cpu": s.resources.cpu, "gpu": s.resources.gpu})
        callback = MlflowSweepCallback(None if embedded else tracking_uri, name, parent_id)
        exp_path = str((directory / EXPERIMENT_DIR).resolve())
        run_config = RunConfig(name=EXPERIMENT_DIR, storage_path=str(directory.resolve()), callbacks=[callback],
                               failure_config=FailureConfig(max_failures=2),
                               checkpoint_config=CheckpointConfig(num_to_keep=1), verbose=verbose)
        if resuming and Tuner.can_restore(exp_path):
            tuner = Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
            known = _restored_trials(exp_path)
            if known is not None:  # never delete runs on the strength of a snapshot we could not read
                _reconcile_orphans(optuna.load_study(study_name=study, storage=storage), cl, name, known)
            print(f"resuming sweep '{name}' in {directory} ({len(known or {})} trials known)", file=sys.stderr)
        else:
            if resuming:  # killed before Ray wrote its first snapshot: nothing ran; start clean
                _reset_partial(cl, name, storage, study)
            tuner = Tuner(trainable, tune_config=TuneConfig(
                search_alg=searcher, scheduler=scheduler, num_samples=s.num_samples,
                max_concurrent_trials=s.max_concurrent, reuse_actors=True), run_config=run_config)
        started = time.time()
        with GpuMonitor(directory):
            tuner.fit()
        wall = time.time() - started
        total_wall = record_wall_time(directory, wall)
        summary = summarize(cl, name, objectives)
        summary["gpu"] = gpu_monitor.summarize(directory)
        # every status is logged (0 when none), so a resumed sweep overwrites the counts of the last run
        from hqlt.reports.mlflow_io import TRIAL_STATUSES

        counts = {f"sweep/n_{k}": summary["counts"].get(k, 0) for k in (*TRIAL_STATUSES, *summary["counts"])}
        tracking.log_metrics(cl, parent_id, {
            "sweep/wall_s": total_wall, "sweep/run_wall_s": wall, "sweep/n_trials": summary["n"],
            "sweep/trial_overhead_s": summary["overhead_s"], "sweep/trial_setup_s": summary["setup_s"], **counts,
            **gpu_metrics(summary)}, step=0)
        if summary["gpu"]:
            cl.log_artifact(parent_id, str(directory / gpu_monitor.FILE))
        _final_report(tracking_uri, name, directory)
        cl.set_terminated(parent_id, "FINISHED")
        print_summary(summary, objectives, directory, tracking_uri)
        return 0
    finally:
        ray.shutdown()


def _restored_trials(exp_path: str) -> Optional[dict]:
    """trial_id -> config of the trials in Ray's last experiment snapshot; None if it cannot be read."""
    import logging

    from ray.tune import ExperimentAnalysis

    # Only trial ids and configs are needed; the analysis also tries to load every trial's metrics and
    # warns about trials that never wrote any (those a kill interrupted, or any after a move).
    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return {t.trial_id: t.config for t in ExperimentAnalysis(exp_path).trials}
    except Exception as exc:  # noqa: BLE001
        print(f"warning: cannot read Ray's experiment state ({type(exc).__name__}); orphaned trials of a hard "
              "kill are left as they are", file=sys.stderr)
        return None
    finally:
        quiet.setLevel(level)


def _reset_partial(cl, experiment: str, storage, study: str) -> None:
    import optuna

    try:
        optuna.delete_study(study_name=study, storage=storage)
    except KeyError:
        pass
    exp = cl.get_experiment_by_name(experiment)
    if exp is not None:
        for run in cl.search_runs([exp.experiment_id], filter_string="tags.`hqlt.role` = 'trial'"):
            cl.delete_run(run.info.run_id)


def summarize(cl, experiment: str, objectives: list) -> dict:
    exp = cl.get_experiment_by_name(experiment)
    runs = cl.search_runs([exp.experiment_id], filter_string="tags.`hqlt.role` = 'trial'", max_results=50000) if exp else []
    counts: dict = {}
    rows, overheads, setups = [], [], []
    for run in runs:
        if "trial/overhead_s" in run.data.metrics:
            overheads.append(run.data.metrics["trial/overhead_s"])
        if "time/setup_s" in run.data.metrics:
            setups.append(run.data.metrics["time/setup_s"] + run.data.metrics.get("time/probe_s", 0.0))
        status = run.data.tags.get("status", "running")
        counts[status] = counts.get(status, 0) + 1
        if status == "completed":
            rows.append({"arch": run.data.tags.get("arch", "?"), "trial_id": run.data.tags.get("trial_id"),
                         **{m: run.data.metrics.get(m) for m, _ in objectives}})
    metric, mode = objectives[0]
    rows.sort(key=lambda r: (r[metric] is None, -(r[metric] or 0) if mode == "max" else (r[metric] or 0)))
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"counts": counts, "n": len(runs), "best": rows[:5], "overhead_s": mean(overheads),
            "setup_s": mean(setups)}


def record_wall_time(directory: Path, wall: float) -> float:
    """Add this run's wall time to the sweep's total in sweep.json (a resumed sweep runs in several
    parts, perhaps on several hosts); returns the total."""
    meta_path = directory / "sweep.json"
    meta = json.loads(meta_path.read_text())
    meta["wall_s"] = float(meta.get("wall_s", 0.0)) + wall
    meta.setdefault("runs", []).append({"wall_s": round(wall, 1), "host": socket.gethostname(),
                                        "ended": time.strftime("%Y-%m-%d %H:%M:%S")})
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta["wall_s"]


def gpu_metrics(summary: dict) -> dict:
    """sweep/gpu_* metrics: busy fraction (all GPUs and each), GPU-hours and completed trials per GPU-hour,
    over every segment of the sweep (a resumed sweep adds its segment to the earlier ones)."""
    gpu = summary.get("gpu")
    if not gpu:
        return {}
    done = summary["counts"].get("completed", 0)
    return {"sweep/gpu_busy_frac": gpu["busy_frac"], "sweep/gpu_hours": gpu["gpu_hours"],
            "sweep/n_gpus": gpu["n_gpus"], "sweep/trials_per_gpu_hour": done / gpu["gpu_hours"],
            **{f"sweep/gpu_busy_frac_gpu{g}": v for g, v in gpu["per_gpu"].items()}}


def print_summary(summary: dict, objectives: list, directory: Path, tracking_uri: str) -> None:
    counts = ", ".join(f"{v} {k}" for k, v in sorted(summary["counts"].items()))
    print(f"\nsweep finished: {summary['n']} trials ({counts})")
    m = gpu_metrics(summary)
    if m:
        per = " ".join(f"{v:.0%}" for k, v in m.items() if k.startswith("sweep/gpu_busy_frac_gpu"))
        print(f"GPUs: {m['sweep/n_gpus']} busy {m['sweep/gpu_busy_frac']:.1%} of the sampled time (per GPU: {per}); "
              f"{m['sweep/gpu_hours']:.3f} GPU-hours, {m['sweep/trials_per_gpu_hour']:.1f} completed trials per "
              f"GPU-hour ({directory / gpu_monitor.FILE})")
    if summary.get("overhead_s") is not None:
        print(f"per-trial start-up: {summary['overhead_s']:.2f} s outside the trial function (Ray scheduling, "
              f"process start/reuse) + {summary['setup_s'] or 0:.2f} s inside (build model, throughput probe "
              f"incl. compilation), means over trials")
    if summary["best"]:
        names = [m for m, _ in objectives]
        print("best trials by " + names[0] + ":")
        for row in summary["best"]:
            print("  " + f"{row['arch']:<22}" + "  ".join(
                f"{m}={row[m]:.4g}" if row[m] is not None else f"{m}=n/a" for m in names))
    print(f"browse: hqlt ui {directory}    (or: mlflow ui --backend-store-uri {tracking_uri})")
    print(f"report: hqlt report {directory}")


def _final_report(tracking_uri: str, experiment: str, directory: Path) -> None:
    """Pareto fronts, hypervolume and plots on the parent run; a failing report never fails the sweep."""
    try:
        from hqlt.reports.report import write_report
    except ImportError:
        return
    try:
        result = write_report(tracking_uri, experiment, out_dir=str(directory / "report"))
        text = getattr(result, "table", None)
        if text:
            print(text)
    except Exception as exc:  # noqa: BLE001
        import traceback

        where = "; ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_tb(exc.__traceback__)[-3:])
        print(f"report skipped: {type(exc).__name__}: {exc} (at {where}); rerun: hqlt report {directory}", file=sys.stderr)
