"""`hqlt sweep`: a validated spec → Ray Tune (OptunaSearch, FIFO or ASHA) → MLflow, resumable.

Sweep folder layout (everything a resume needs):
    sweep.json      sweep id, name, spec hash, objectives, num_samples, tracking URI, folder path, wall time of
                    each run (kept up to date while it runs), `finished` once a run ended the sweep
    spec.yaml       the merged spec as run
    optuna.log      Optuna journal (the study)
    mlflow.db       embedded MLflow store (unless --tracking-uri)
    ray/            Ray Tune experiment state (Tuner.restore)
    results/        per trial: the final result (<trial_id>.json), each completed seed (.seed<i>.json) and, with
                    sweep.snapshot_minutes, the running seed's snapshot (.seed<i>.snapshot.pt, seed_snapshot.py)
    gpu_util.csv    GPU utilization sampled by the driver (gpu_monitor), one segment per run
    cache/          Triton / Inductor compile caches shared by all trials (not needed to resume)
Parent-run metrics (step k: the k-th run of the sweep): sweep/wall_s (all runs), sweep/run_wall_s, sweep/n_<status>,
sweep/trial_overhead_s, sweep/trial_setup_s, sweep/trial_{build,probe,train,trial}_s (means over completed trials,
TRIAL_PHASES), sweep/gpu_busy_frac[_gpu<i>], sweep/gpu_hours, sweep/trials_per_gpu_hour.
Re-running the same command on the same folder resumes, from a kill at any point; a changed spec is refused
unless --fresh; a larger sweep.num_samples extends the sweep; a finished sweep is only summarised again.
A sweep is its sweep id (sweep.json, and the `hqlt.sweep_id` tag of its parent run): two sweeps of one name
on one tracking server never touch each other's runs.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from hqlt.blocks.validation import ConfigError
from hqlt.search_space.vocabulary import (ARCH_TAG, ARTIFACTS_DIR, CACHE_DIR, COMPLETED, FAILED, GPU_UTIL_CSV,
                                          OPTUNA_LOG, OPTUNA_ORPHANED_ATTR, OPTUNA_REASON_ATTR, OPTUNA_STATUS_ATTR,
                                          PROBES_DIR, PRUNED, RAY_DIR, RESULTS_DIR, ROLE_TRIAL, RUNNING, SPEC_YAML, STATUS_TAG, SWEEP_JSON,
                                          TIME_GATE_WAIT, TIME_PROBE, TIME_PROBE_WAIT, TIME_SETUP, TIME_TRAIN,
                                          TIME_TRAINABLE, TRIAL_ID_TAG, TRIAL_STATUSES, sqlite_uri)

from hqlt.search_space import labels

from . import gpu_monitor, tracking
from .gpu_monitor import GpuMonitor
from .startup import grid_cost, trial_resources, warm_sweep
from .space_hooks import HOOKS
from .faults import fault_point
from .sweep_folder import (RunClock, adopt_moved_folder, current_sweep_dir, hold_folder, new_sweep_id, read_meta,
                           repair_journal, update_meta, use_sweep_dir, write_meta)
from .tracking import SERVER_URIS
from .seed_snapshot import remove_snapshots, remove_unknown_snapshots
from .trainable import DONE_KEY, finished_configs, tune_trainable

TRIAL_NUMBER_KEY = "hqlt.optuna_number"

# The report run at the end of a sweep: (tracking_uri, experiment, sweep folder) -> None. Passed in by the
# caller (the `hqlt sweep` command), so that orchestration never imports the reports built on top of it.
FinalReport = Callable[[str, str, Path], None]


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
        COMPLETE with partial values), failed / oom / nan / infeasible → FAIL with the reason attached.

        The only code that touches OptunaSearch's private attributes (_storage, _ot_study, _ot_trials,
        _study_name, _sampler, _completed_trials): OptunaSearch has no public way to re-point a restored
        study at another journal, nor to tell Optuna a state other than the one it derives from the result
        itself. Keep every such access in this class, so that a Ray upgrade has one place to check."""

        def _setup_study(self, mode):
            """The study names its objectives (optuna-dashboard's axes read "val/acc", not "0")."""
            super()._setup_study(mode)
            name_study_metrics(self._ot_study, self._metric)

        def restore(self, checkpoint_path):
            """Re-point the restored study at the journal of the folder being resumed, which may have been
            copied from another host or path since the state was saved."""
            super().restore(checkpoint_path)
            here = current_sweep_dir()
            if here is None:
                return
            import optuna
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            self._storage = JournalStorage(JournalFileBackend(str(here / OPTUNA_LOG)))
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
            status = result.get("trial/status", FAILED if error else PRUNED)
            if error:
                status = FAILED
            elif not result.get(DONE_KEY):
                status = PRUNED
            metrics = self.metric if isinstance(self.metric, list) else [self.metric]
            values = [result.get(m) for m in metrics]
            self._completed_trials.add(trial_id)
            try:
                ot_trial.set_user_attr(OPTUNA_STATUS_ATTR, status)
                if result.get("trial/reason"):
                    ot_trial.set_user_attr(OPTUNA_REASON_ATTR, str(result["trial/reason"])[:500])
                if status == COMPLETED and all(v is not None and v == v for v in values):
                    self._ot_study.tell(ot_trial, values if len(values) > 1 else values[0], state=TrialState.COMPLETE)
                elif status == PRUNED:
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


def name_study_metrics(study, metrics) -> None:
    """Set the study's metric names (`study.set_metric_names`) to the objectives, unless already set."""
    import warnings

    names = list(metrics) if isinstance(metrics, (list, tuple)) else [metrics]
    if study is None or None in names or study.metric_names is not None:
        return
    with warnings.catch_warnings():  # set_metric_names is marked experimental
        warnings.simplefilter("ignore")
        study.set_metric_names(names)


def arm_choices(spec) -> dict:
    """{key: the JSON labels of its choices} of the space's whole-arm choices (arm ids in the MLflow params)."""
    return {p.path: p.optuna_choices() for p in spec.params if p.encoded}


def sweep_dir_for(spec, given: Optional[str]) -> Path:
    return Path(given) if given else Path("sweeps") / spec.name


def prepare_dir(directory: Path, spec, fresh: bool) -> bool:
    """Returns True when resuming. Refuses a changed spec unless fresh."""
    old = None if fresh else read_meta(directory)
    if old is not None:
        if old.get("spec_hash") != spec.hash:
            raise ConfigError("", f"{directory}: holds a sweep of a different spec (hash {old.get('spec_hash')} ≠ "
                                  f"{spec.hash}); rerun with --fresh to discard it, or use another --dir")
        return True
    if fresh and directory.exists():
        shutil.rmtree(directory)
    return False


@dataclass
class SweepFolder:
    """A sweep folder made ready to run in: where it is, whether it resumes, where it logs."""
    directory: Path
    resuming: bool
    tracking_uri: str
    embedded: bool  # the folder's own mlflow.db, wherever the folder moves
    objectives: list  # [(metric, mode), ...]
    sweep_id: str = ""  # sweep.json's `sweep_id`: the parent run's `hqlt.sweep_id` tag
    num_samples: int = 0  # the sweep's size now (a resume with a larger sweep.num_samples extends it)
    finished: bool = False  # an earlier run ended this sweep at this size: nothing left to run
    legacy: bool = False  # made before sweep ids: its parent run is adopted by spec hash (embedded store only)
    lock: object = None  # the open driver lock (sweep_folder.hold_folder), held while this process lives


def prepare_folder(spec, directory: Path, tracking_uri: Optional[str], address: Optional[str],
                   fresh: bool) -> SweepFolder:
    """Step 1: check the folder against the spec, adopt a moved folder, decide where MLflow is (and that its
    server answers), take the folder's driver lock, and (for a new sweep) write spec.yaml and then sweep.json —
    the folder's commit point, with the new sweep id. Refuses, before anything is written, what cannot work."""
    lock = hold_folder(directory) if (directory / SWEEP_JSON).is_file() else None  # before --fresh deletes it
    resuming = prepare_dir(directory, spec, fresh)
    meta = (read_meta(directory) or {}) if resuming else {}
    recorded = meta.get("tracking_uri")
    if resuming and tracking_uri and tracking_uri != (recorded or sqlite_uri(directory)):
        raise ConfigError("--tracking-uri", f"{directory} logs to {recorded or 'its own mlflow.db'}; a sweep "
                                            "resumes where it started (leave --tracking-uri out)")
    if resuming and not tracking_uri:  # a resumed sweep keeps writing to the server it started with
        tracking_uri = recorded
    embedded = not tracking_uri or tracking_uri == sqlite_uri(directory)
    tracking_uri = tracking_uri or sqlite_uri(directory)
    if address and not tracking_uri.startswith(SERVER_URIS):
        raise ConfigError("--tracking-uri", f"got {tracking_uri!r}; on a Ray cluster (--address / RAY_ADDRESS) "
                                            "use an MLflow server (http://host:5000 or postgresql://...)")
    if not embedded:
        tracking.check_server(tracking_uri)  # seconds, not minutes of retries, when it is down
    samples, before = spec.sweep.num_samples, meta.get("num_samples")
    if before is not None and samples < before:
        raise ConfigError("sweep.num_samples", f"{samples} is less than the {before} trials of the sweep in "
                                               f"{directory}: a sweep can grow, not shrink (use --fresh or another --dir)")
    directory.mkdir(parents=True, exist_ok=True)
    if lock is None or not resuming:  # a new folder, or --fresh removed the one locked above
        lock = hold_folder(directory)
    if resuming and embedded:
        adopt_moved_folder(directory)
    use_sweep_dir(directory)
    objectives = [(o.metric, o.mode) for o in spec.sweep.objectives]
    folder = SweepFolder(directory, resuming, tracking_uri, embedded, objectives, num_samples=samples, lock=lock)
    if not resuming:
        (directory / SPEC_YAML).write_text(spec.text)
        folder.sweep_id = new_sweep_id()
        write_meta(directory, {
            "sweep_id": folder.sweep_id, "name": spec.name, "spec_hash": spec.hash, "objectives": objectives,
            "num_samples": samples, "path": str(directory.resolve()),
            "tracking_uri": None if embedded else tracking_uri,  # null: mlflow.db in this folder, wherever it moves
            "created": time.strftime("%Y-%m-%d %H:%M:%S")})
        return folder
    folder.legacy = not meta.get("sweep_id")
    folder.finished = bool(meta.get("finished")) and samples == before
    if folder.legacy or samples != before:
        def change(m: dict) -> None:
            m.setdefault("sweep_id", new_sweep_id())
            m["num_samples"] = samples
            if before is not None and samples > before:
                m.pop("finished", None)  # extended: the sweep is open again until a run ends it

        meta = update_meta(directory, change)
    folder.sweep_id = meta["sweep_id"]
    return folder


def compile_cache_env(directory: Path) -> dict:
    """Where trials keep Triton's and Inductor's compile caches: the sweep folder's `cache/` (shared by all its
    trials, on every node of a cluster), unless the driver's environment names a cache itself, as Triton and
    torch users do to share one cache between sweeps and benchmarks (fla autotunes each new shape for minutes)."""
    cache = (directory / CACHE_DIR).resolve()
    return {name: os.environ.get(name) or str(cache / sub)
            for name, sub in (("TRITON_CACHE_DIR", "triton"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"))}


def _init_ray(s, directory: Path, address: Optional[str], verbose: int) -> None:
    """Start (or join) Ray with the environment every trial worker gets: shared compile caches, threads."""
    import ray

    threads = max(1, int(s.resources.cpu))
    env = {**compile_cache_env(directory),
           "HQLT_TRIAL_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
           "TRITON_CACHE_AUTOTUNING": "1"}  # Triton >= 3.4: autotuning results in the cache too (startup.warm_sweep)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # small window between a trial start and its snapshot
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's status table as the live view
    if not ray.is_initialized():
        # Only --address / RAY_ADDRESS join a cluster: without them a Ray of our own, never one that happens to
        # run on this machine (Ray's auto-detection), whose checks (server, common storage) would be skipped.
        ray.init(address=address or "local", runtime_env={"env_vars": env}, include_dashboard=False,
                 log_to_driver=verbose > 1, configure_logging=True, logging_level="WARNING")


def _check_cluster(directory: Path, tracking_uri: str) -> None:
    """With a Ray cluster the sweep folder must be visible on every node and MLflow must be a server."""
    import ray

    if not tracking_uri.startswith(SERVER_URIS):
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
    pending = [visible.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
               .remote(str(marker.resolve())) for n in nodes]
    checks = []
    for node, ref in zip(nodes, pending):
        try:
            checks.append(ray.get(ref, timeout=120))
        except (ray.exceptions.TaskUnschedulableError, ray.exceptions.NodeDiedError,
                ray.exceptions.WorkerCrashedError):  # a node lost a moment ago, not yet marked dead: not a node
            print(f"warning: node {node.get('NodeManagerHostname', '?')} ({node['NodeID'][:8]}) is gone; the sweep "
                  "runs on the others", file=sys.stderr)
    marker.unlink()
    missing = [host for host, ok in checks if not ok]
    if missing:
        raise ConfigError("--dir", f"{directory} is not visible on nodes {', '.join(missing)}; "
                                   "put the sweep folder on storage shared by all nodes")


def _open_parent_run(cl, spec, folder: SweepFolder) -> str:
    """The sweep's MLflow parent run, found again by its sweep id (created, with the spec and the settings, when
    there is none yet — also after a kill before it was made, or before it got them); RUNNING while a run lasts."""
    from .mlflow_callback import find_or_create_parent

    if folder.embedded:
        tracking.ensure_store(folder.tracking_uri)  # made whole or not at all: a kill never leaves half a store
    # Artifacts: beside an embedded store in the folder; with a server, in the server's artifact store (its
    # default location; `mlflow server --serve-artifacts` takes them through the client).
    artifacts = (folder.directory / ARTIFACTS_DIR).resolve().as_uri() if folder.embedded else None
    parent = find_or_create_parent(cl, spec.name, spec.name, folder.objectives, spec.hash, folder.sweep_id,
                                   artifacts, adopt_legacy=folder.legacy and folder.embedded)
    parent_id = parent.info.run_id
    if not parent.data.params:  # a new parent, or one a kill left without them: they are logged once, here
        cl.log_text(parent_id, spec.text, SPEC_YAML)
        tracking.log_params(cl, parent_id, {"sweep": json.loads(json.dumps(asdict(spec.sweep), default=str))})
    if parent.info.status != "RUNNING":  # a finished sweep extended
        cl.update_run(parent_id, status="RUNNING")
    return parent_id


def build_searcher(spec, objectives: list, storage):
    """Step 2: the Optuna searcher over the compiled space, its study in the folder's journal."""
    from hqlt.search_space import compile_space, study_name

    metrics, modes = [m for m, _ in objectives], [mode for _, mode in objectives]
    single = len(objectives) == 1
    return _searcher_class()(
        space=NumberedSpace(compile_space(spec, HOOKS)), metric=metrics[0] if single else metrics,
        mode=modes[0] if single else modes, sampler=ordered_sampler(spec), study_name=study_name(spec), storage=storage)


def ordered_sampler(spec):
    """The spec's Optuna sampler; a grid's points start in `sweep.order` — longest_first (the default) by the
    predicted training FLOPs of each point (startup.grid_cost), said in one line. Other samplers choose each
    trial from the results so far: their order is theirs (search_space/grid.py)."""
    from hqlt.search_space import make_sampler

    order = spec.sweep.grid_order
    if order != "longest_first":
        return make_sampler(spec.sweep, spec.params)
    cost, seen = grid_cost(spec), []

    def recorded(sampled: dict) -> float:
        seen.append(cost(sampled))
        return seen[-1]

    started = time.time()
    sampler = make_sampler(spec.sweep, spec.params, cost=recorded)
    if seen:
        print(f"grid order: longest first, by predicted training FLOPs ({max(seen):.3g} down to {min(seen):.3g}; "
              f"{len(seen)} distinct configs ranked in {time.time() - started:.1f}s)",
              file=sys.stderr)
    return sampler


def build_tuner(spec, folder: SweepFolder, cl, parent_id: str, verbose: int, gpu_mem_bytes: Optional[float] = None):
    """Step 3: the Tuner — restored from the folder's Ray state when resuming (orphans of a hard kill closed),
    else new, with the searcher, the scheduler, the trainable and the MLflow callback."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from ray import tune
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig, Tuner

    from hqlt.search_space import study_name

    from .mlflow_callback import MlflowSweepCallback
    from .snapshot_cleanup import SnapshotCleanup

    s, name, directory, objectives = spec.sweep, spec.name, folder.directory, folder.objectives
    exp_path = str((directory / RAY_DIR).resolve())
    restorable = folder.resuming and _usable_ray_state(Path(exp_path))
    if folder.resuming and not restorable:
        # Killed before Ray kept a snapshot it can restore (during start-up, or before the first one was whole):
        # no trial is known to Ray, so whatever else the kill left (a study, trial runs, results) goes; the
        # folder, its sweep id, spec check and parent run stay. Before the searcher makes its study again.
        _reset_partial(cl, parent_id, directory)
    repair_journal(directory / OPTUNA_LOG)
    storage = JournalStorage(JournalFileBackend(str((directory / OPTUNA_LOG).resolve())))
    study = study_name(spec)
    scheduler = None
    if s.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(metric=objectives[0][0], mode=objectives[0][1], time_attr="training_iteration",
                                  max_t=s.asha.max_t, grace_period=s.asha.grace_period,
                                  reduction_factor=s.asha.reduction_factor)
    trainable = tune.with_resources(
        tune.with_parameters(tune_trainable, spec=spec, objectives=objectives, seeds=s.seeds,
                             seed_aggregate=s.seed_aggregate, results_dir=str((directory / RESULTS_DIR).resolve())),
        trial_resources(spec, gpu_mem_bytes))  # resources.gpu auto: a fraction per trial (startup.py)
    callback = MlflowSweepCallback(None if folder.embedded else folder.tracking_uri, name, parent_id,
                                   arms=arm_choices(spec))
    run_config = RunConfig(name=RAY_DIR, storage_path=str(directory.resolve()), callbacks=[callback, SnapshotCleanup()],
                           failure_config=FailureConfig(max_failures=2),
                           checkpoint_config=CheckpointConfig(num_to_keep=1), verbose=verbose)
    if restorable:
        _extend(Path(exp_path), folder.num_samples)
        tuner = Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        known = _restored_trials(exp_path)
        if known is not None:  # never delete runs on the strength of a snapshot we could not read
            _reconcile_orphans(optuna.load_study(study_name=study, storage=storage), cl, parent_id, known)
            remove_unknown_snapshots(directory / RESULTS_DIR, set(known))
        print(f"resuming sweep '{name}' in {directory} ({len(known or {})} trials known)", file=sys.stderr)
        return tuner
    searcher = build_searcher(spec, objectives, storage)
    return Tuner(trainable, tune_config=TuneConfig(
        search_alg=searcher, scheduler=scheduler, num_samples=s.num_samples,
        max_concurrent_trials=s.max_concurrent, reuse_actors=True), run_config=run_config)


def _reconcile_orphans(study, cl, parent_id: str, known: dict) -> None:
    """After a hard kill, Optuna may hold RUNNING trials and MLflow child runs that Ray's last snapshot
    never recorded; Ray samples those again as new trials, so the orphans are closed (Optuna FAIL with
    `hqlt.orphaned`) and their MLflow runs deleted — no duplicates, none lost. Only this sweep's runs (those
    under its parent run) are ever looked at."""
    from optuna.trial import TrialState

    tracked = {cfg.get(TRIAL_NUMBER_KEY) for cfg in known.values()}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number not in tracked:
            # Optuna's storage API is addressed by the storage's trial id, which a FrozenTrial keeps private.
            study._storage.set_trial_user_attr(t._trial_id, OPTUNA_ORPHANED_ATTR, True)
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    for run in _trial_runs(cl, parent_id):
        if run.data.tags.get(TRIAL_ID_TAG) not in known:
            cl.delete_run(run.info.run_id)


def _trial_runs(cl, parent_id: str) -> list:
    """The (not deleted) trial runs of the sweep whose parent run is `parent_id`."""
    exp_id = cl.get_run(parent_id).info.experiment_id
    return list(cl.search_runs([exp_id], filter_string=tracking.trials_filter(parent_id), max_results=50000))


def run_sweep(spec, *, directory: Path, tracking_uri: Optional[str], address: Optional[str], fresh: bool,
              verbose: int = 1, report: Optional[FinalReport] = None) -> int:
    """Run (or resume) the sweep of a validated spec in `directory`; `report` (if given) runs after the
    trials, before the parent run is closed, and must not raise: a failing report never fails the sweep."""
    import ray

    # A server that stops answering: a few retries (about half a minute), then one line — not minutes of them.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "4")
    address = address or os.environ.get("RAY_ADDRESS") or None
    folder = prepare_folder(spec, directory, tracking_uri, address, fresh)
    if folder.finished:
        return show_finished(spec, folder)
    clock = RunClock(directory)  # this run's wall time in sweep.json, a killed run's too
    try:
        fault_point("ray-start")
        _init_ray(spec.sweep, directory, address, verbose)
        if address:
            _check_cluster(directory, folder.tracking_uri)
        cl = tracking.client(folder.tracking_uri)
        parent_id = _open_parent_run(cl, spec, folder)
        # GPU sweeps: compile/tune each kernel shape once, and measure the probes, before the trials fan out
        # (a resumed sweep: the shapes of the trials still to run)
        finished = finished_configs(directory / RESULTS_DIR) if folder.resuming else set()
        warm = warm_sweep(spec, probe_dir=(directory / PROBES_DIR).resolve(), finished=finished)
        tuner = build_tuner(spec, folder, cl, parent_id, verbose, gpu_mem_bytes=warm.get("gpu_mem_bytes"))
        fault_point("before-fit")
        fit(tuner, directory)
        summary = summarize(cl, spec.name, folder.objectives, parent_id)
        left = summary["counts"].get(RUNNING, 0)
        # Trials still `running` after fit(): interrupted. Tune catches SIGINT (Ctrl-C, `timeout -s INT`) and SIGUSR1
        # itself, saves its state and returns as if done, the trials it ran stopped (Ray calls them terminated) but
        # never finished; the next run resumes them. A run that ended has written every trial's final status
        # (orphans of a hard kill are deleted at the resume). A signal in the instant between one trial's end and
        # the next one's start leaves no such trial: the sweep then counts as finished with fewer trials.
        if left:
            print(f"hqlt sweep: interrupted with {left} trial(s) unfinished; run the same command (same spec, same "
                  "--dir) to resume", file=sys.stderr)
            return 130
        return finish(spec, folder, cl, parent_id, clock, report, summary)
    except Exception:
        if not folder.embedded:
            tracking.check_server(folder.tracking_uri)  # the server went away: one line, not three tracebacks
        raise
    finally:
        clock.stop()
        ray.shutdown()


def fit(tuner, directory: Path) -> None:
    """Step 4: run the trials, sampling the GPUs meanwhile."""
    with GpuMonitor(directory):
        tuner.fit()


def show_finished(spec, folder: SweepFolder) -> int:
    """A sweep an earlier run finished, at the same num_samples: its summary again; nothing is run or logged."""
    cl = tracking.client(folder.tracking_uri)
    parent = tracking.find_parent(cl, spec.name, folder.sweep_id)
    summary = summarize(cl, spec.name, folder.objectives, parent.info.run_id if parent else None)
    print(f"sweep '{spec.name}' in {folder.directory} is finished ({folder.num_samples} trials); raise "
          "sweep.num_samples to extend it")
    print_summary(summary, folder.objectives, folder.directory, folder.tracking_uri)
    return exit_code(summary)


def exit_code(summary: dict) -> int:
    """0 when at least one trial completed; 1 (with a line on stderr saying so) when none did."""
    if summary["counts"].get(COMPLETED, 0):
        return 0
    counts = ", ".join(f"{v} {k}" for k, v in sorted(summary["counts"].items())) or "no trials"
    print(f"hqlt sweep: no trial completed ({counts}); the reasons: hqlt status and the runs' `reason` tags",
          file=sys.stderr)
    return 1


def finish(spec, folder: SweepFolder, cl, parent_id: str, clock: RunClock, report: Optional[FinalReport],
           summary: dict) -> int:
    """Step 5: wall time, counts and GPU use on the parent run, the report, the parent closed, `finished` in
    sweep.json, a summary (`summary`: `summarize` of the trials). Returns the exit status (1: no trial completed)."""
    name, directory, objectives = spec.name, folder.directory, folder.objectives
    total_wall = clock.update()["wall_s"]
    summary["gpu"] = gpu_monitor.summarize(directory)
    # every status is logged (0 when none), at the step of this run of the sweep: a resumed (or re-run) sweep
    # adds a point after the last run's, never a second value at one step
    counts = {f"sweep/n_{k}": summary["counts"].get(k, 0) for k in (*TRIAL_STATUSES, *summary["counts"])}
    tracking.log_metrics(cl, parent_id, {
        "sweep/wall_s": total_wall, "sweep/run_wall_s": clock.wall_s, "sweep/n_trials": summary["n"],
        "sweep/trial_overhead_s": summary["overhead_s"], "sweep/trial_setup_s": summary["setup_s"], **counts,
        **{f"sweep/trial_{name}_s": value for name, value in summary.get("phases_s", {}).items()},
        **gpu_metrics(summary)}, step=clock.index)
    if summary["gpu"]:
        cl.log_artifact(parent_id, str(directory / GPU_UTIL_CSV))
    if report is not None:
        report(folder.tracking_uri, name, directory)
    remove_snapshots(directory / RESULTS_DIR)  # every trial has ended (sweeps from before SnapshotCleanup: theirs too)
    cl.set_terminated(parent_id, "FINISHED")
    update_meta(directory, lambda m: m.update(finished={"num_samples": folder.num_samples,
                                                        "at": time.strftime("%Y-%m-%d %H:%M:%S")}))
    print_summary(summary, objectives, directory, folder.tracking_uri)
    return exit_code(summary)


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


STATE_FILES = ("experiment_state-{}.json", "search_gen_state-{}.json", "searcher-state-{}.pkl")  # one snapshot


def _usable_ray_state(exp_path: Path) -> bool:
    """Whether Ray's experiment folder holds a snapshot Tuner.restore can use. Ray copies its snapshot files
    into the folder non-atomically (every second, one file after the other); a snapshot a kill cut off is
    removed, so that the one before it (an earlier run's) is restored — or none, when it was the first."""
    import pickle

    if not (exp_path / "tuner.pkl").is_file():
        return False
    for state in sorted(exp_path.glob(STATE_FILES[0].format("*")), reverse=True):
        session = state.name[len("experiment_state-"):-len(".json")]
        files = [exp_path / t.format(session) for t in STATE_FILES]
        try:
            json.loads(files[0].read_text())
            for f in files[1:]:
                pickle.loads(f.read_bytes())
            return True
        except Exception as exc:  # noqa: BLE001 — cut off (or missing): not a snapshot
            print(f"warning: Ray's snapshot {session} in {exp_path} is incomplete ({type(exc).__name__}: a kill while "
                  "it was written); using the one before it", file=sys.stderr)
            for f in files:
                f.unlink(missing_ok=True)
    return False


def _extend(exp_path: Path, num_samples: int) -> None:
    """Raise the number of samples in Ray's newest search snapshot to `num_samples` (a sweep extended by a
    larger sweep.num_samples): Tune restores its sample count from the snapshot, not from the TuneConfig, and
    has no API to change it; the snapshot is a pickled dict with `total_samples` and `finished`."""
    import pickle

    states = sorted(exp_path.glob("search_gen_state-*.json"))
    if not states:
        return
    state = pickle.loads(states[-1].read_bytes())
    if not isinstance(state, dict) or not isinstance(state.get("total_samples"), int):
        raise ConfigError("sweep.num_samples", f"cannot extend the sweep in {exp_path.parent}: Ray's search state "
                                               "has no sample count (another Ray version?); use --fresh or another --dir")
    if state["total_samples"] >= num_samples:
        return
    state.update(total_samples=num_samples, finished=False)
    tmp = states[-1].with_name(f".{states[-1].name}.tmp")
    tmp.write_bytes(pickle.dumps(state))
    tmp.replace(states[-1])
    print(f"extending the sweep to {num_samples} trials", file=sys.stderr)


def _reset_partial(cl, parent_id: str, directory: Path) -> None:
    """Start over in the folder, keeping it (sweep.json, spec.yaml, the parent run, the probe cache): Ray's state,
    the study (the journal holds only this sweep's), the trial results and this sweep's trial runs go."""
    shutil.rmtree(directory / RAY_DIR, ignore_errors=True)
    shutil.rmtree(directory / RESULTS_DIR, ignore_errors=True)
    journal = directory / OPTUNA_LOG
    journal.unlink(missing_ok=True)
    repair_journal(journal)  # its writer lock, if a kill left one
    for run in _trial_runs(cl, parent_id):
        cl.delete_run(run.info.run_id)


# Where a completed trial's time goes, from the time/* metrics of its final record: one seed's build, probe and
# training loop (the recorded seed's, or the mean over seeds), and the whole trial function over all its seeds.
TRIAL_PHASES = {"build": TIME_SETUP, "probe": TIME_PROBE, "probe_wait": TIME_PROBE_WAIT, "train": TIME_TRAIN,
                "gate_wait": TIME_GATE_WAIT, "trial": TIME_TRAINABLE}
PHASE_LABELS = {"build": "task and model build", "probe": "throughput probe", "probe_wait": "waiting for the card",
                "train": "training loop (with its evaluations)", "gate_wait": "paused for other trials' probes"}


def summarize(cl, experiment: str, objectives: list, parent_id: Optional[str] = None) -> dict:
    """Counts by status, the best trials and start-up means of the trials of the sweep under `parent_id`
    (without: every trial run of the experiment — a folder from before sweep ids)."""
    if parent_id is not None:
        runs = _trial_runs(cl, parent_id)
    else:
        exp = cl.get_experiment_by_name(experiment)
        runs = cl.search_runs([exp.experiment_id], filter_string=tracking.role_filter(ROLE_TRIAL),
                              max_results=50000) if exp else []
    counts: dict = {}
    rows, overheads, setups = [], [], []
    phases: dict = {name: [] for name in TRIAL_PHASES}
    for run in runs:
        metrics = run.data.metrics
        if "trial/overhead_s" in metrics:
            overheads.append(metrics["trial/overhead_s"])
        if TIME_SETUP in metrics:
            setups.append(metrics[TIME_SETUP] + metrics.get(TIME_PROBE, 0.0))
        status = run.data.tags.get(STATUS_TAG, RUNNING)
        counts[status] = counts.get(status, 0) + 1
        if status == COMPLETED:
            for name, metric in TRIAL_PHASES.items():
                if metric in metrics:
                    phases[name].append(metrics[metric])
            rows.append({"arch": run.data.tags.get(ARCH_TAG, "?"), "trial_id": run.data.tags.get(TRIAL_ID_TAG),
                         "task": labels.task_label(run.data.params),
                         **{m: metrics.get(m) for m, _ in objectives}})
    metric, mode = objectives[0]
    rows.sort(key=lambda r: (r[metric] is None, -(r[metric] or 0) if mode == "max" else (r[metric] or 0)))
    tasks = sorted({r["task"] for r in rows})  # the best of each task (accuracies of two tasks do not compare)
    best = [r for t in tasks for r in [r for r in rows if r["task"] == t][:5 if len(tasks) == 1 else 3]]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"counts": counts, "n": len(runs), "best": best, "overhead_s": mean(overheads),
            "setup_s": mean(setups), "phases_s": {name: mean(v) for name, v in phases.items() if v}}


def gpu_metrics(summary: dict) -> dict:
    """sweep/gpu_* metrics: busy fraction (all GPUs and each), GPU-hours and completed trials per GPU-hour,
    over every segment of the sweep (a resumed sweep adds its segment to the earlier ones)."""
    gpu = summary.get("gpu")
    if not gpu:
        return {}
    done = summary["counts"].get(COMPLETED, 0)
    return {"sweep/gpu_busy_frac": gpu["busy_frac"], "sweep/gpu_hours": gpu["gpu_hours"],
            "sweep/n_gpus": gpu["n_gpus"], "sweep/trials_per_gpu_hour": done / gpu["gpu_hours"],
            **{f"sweep/gpu_busy_frac_gpu{g}": v for g, v in gpu["per_gpu"].items()}}


def print_best_trials(best: list, objectives: list) -> None:
    """One line per trial of summarize()'s `best`: its arch, its task (when searched), each objective's value."""
    names = [m for m, _ in objectives]
    width = max([len(str(r["arch"])) for r in best] + [4])
    task_width = max([len(r.get("task") or "") for r in best] + [0])
    for row in best:
        task = f"{row.get('task') or '':<{task_width}}  " if task_width else ""
        print(f"  {row['arch']:<{width}}  {task}" + "  ".join(
            f"{m} {labels.format_metric(m, row[m])}" for m in names))


def print_summary(summary: dict, objectives: list, directory: Path, tracking_uri: str) -> None:
    counts = ", ".join(f"{v} {k}" for k, v in sorted(summary["counts"].items()))
    print(f"\nsweep finished: {summary['n']} trials ({counts})")
    m = gpu_metrics(summary)
    if m:
        per = " ".join(f"{v:.0%}" for k, v in m.items() if k.startswith("sweep/gpu_busy_frac_gpu"))
        print(f"GPUs: {m['sweep/n_gpus']} busy {m['sweep/gpu_busy_frac']:.1%} of the sampled time (per GPU: {per}); "
              f"{m['sweep/gpu_hours']:.3f} GPU-hours, {m['sweep/trials_per_gpu_hour']:.1f} completed trials per "
              f"GPU-hour ({directory / GPU_UTIL_CSV})")
    if summary.get("overhead_s") is not None:
        print(f"per-trial start-up: {summary['overhead_s']:.2f} s outside the trial function (Ray scheduling, "
              f"process start/reuse) + {summary['setup_s'] or 0:.2f} s inside (build model, throughput probe "
              f"incl. compilation), means over trials")
    phases = summary.get("phases_s") or {}
    if phases:
        def part(name: str, within: str) -> str:  # "probe 3.10 s (of which waiting for the card 2.50 s)"
            inner = f" (of which {PHASE_LABELS[within]} {phases[within]:.2f} s)" if within in phases else ""
            return f"{PHASE_LABELS[name]} {phases[name]:.2f} s{inner}"

        parts = [part(name, within) for name, within in (("build", ""), ("probe", "probe_wait"), ("train", "gate_wait"))
                 if name in phases]
        whole = f"; the whole trial function {phases['trial']:.2f} s (all its seeds)" if "trial" in phases else ""
        print("per completed trial, means: " + ", ".join(parts) + " (one seed's)" * bool(parts) + whole)
    if summary["best"]:
        print("best trials by " + objectives[0][0] + ":")
        print_best_trials(summary["best"], objectives)
    # a server has its own UI (`mlflow ui --backend-store-uri http://…` would not open it)
    other = tracking_uri if tracking.is_server(tracking_uri) else f"mlflow ui --backend-store-uri {tracking_uri}"
    print(f"browse: hqlt ui {directory} --open    (the runs of the Pareto front in MLflow; or: {other})")
    print(f"live:   hqlt dashboard {directory}    (optuna-dashboard on the study, while a sweep runs)")
    print(f"report: hqlt report {directory}")
