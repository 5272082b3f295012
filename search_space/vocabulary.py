"""The shared vocabulary of hqlt: metric names, trial statuses, MLflow tags, sweep-folder paths.

Every other list of these names derives from this module (docs/sweep-folder-and-mlflow.md explains each one). It lives in
``hqlt.search_space``, the lowest layer that needs it (a spec's objectives name metrics), and imports nothing
but the standard library, so ``hqlt.reports`` and the CLI can use it without torch or Ray.
"""
from __future__ import annotations

from pathlib import Path

# ------------------------------------------------------------------------------------------------ metrics
# Metric names shared by trials, sweeps and reports. `val/acc@<slice>` and `test/acc@<slice>` are per-slice
# accuracies (a length bucket, a kv-pair count); `seed<i>/<metric>` the per-seed values of a trial.
TRAIN_LOSS = "train/loss"
VAL_ACC = "val/acc"
VAL_ACC_SCALED = "val/acc_scaled"
VAL_LOSS = "val/loss"
VAL_BPB = "val/bpb"
TRAIN_TOK_S = "perf/train_tok_s"
PEAK_MEM_MB = "perf/peak_mem_mb"
STEP_MS = "perf/step_ms"
MFU = "perf/mfu"
PARAMS = "model/params"
FW_STATE_BYTES = "model/fw_state_bytes"
KV_CACHE_BYTES = "model/kv_cache_bytes"
FLOPS_PER_TOKEN = "model/flops_per_token"

# The test set: the same distribution as the validation set from another seed (a byte-LM file: its last part),
# evaluated once at the end of a trial, on the weights `train.checkpoint` selects. Validation metrics drive early
# stopping and checkpoint selection; test metrics are the score (the presets' objectives).
VAL_PREFIX, TEST_PREFIX = "val/", "test/"
TEST_ACC = "test/acc"
TEST_ACC_SCALED = "test/acc_scaled"
TEST_LOSS = "test/loss"
TEST_BPB = "test/bpb"

MODEL_METRICS = (PARAMS, FW_STATE_BYTES, KV_CACHE_BYTES, FLOPS_PER_TOKEN)
PERF_METRICS = (TRAIN_TOK_S, PEAK_MEM_MB, STEP_MS, MFU)
VAL_METRICS = (VAL_ACC, VAL_ACC_SCALED, VAL_LOSS, VAL_BPB)
TEST_METRICS = (TEST_ACC, TEST_ACC_SCALED, TEST_LOSS, TEST_BPB)
KNOWN_METRICS = (TRAIN_LOSS, *VAL_METRICS, *TEST_METRICS, *PERF_METRICS, *MODEL_METRICS)
SLICE_METRIC_PREFIX = "val/acc@"
TEST_SLICE_METRIC_PREFIX = "test/acc@"
SLICE_METRIC_PREFIXES = (SLICE_METRIC_PREFIX, TEST_SLICE_METRIC_PREFIX)
# MLflow forbids '@' in metric names: a slice metric is stored as `val/acc_at_len_41-64` and read back by name.
MLFLOW_SLICE_SEP = "_at_"


def to_mlflow_metric(name: str) -> str:
    return name.replace("@", MLFLOW_SLICE_SEP).replace("%", "pct")


def from_mlflow_metric(name: str) -> str:
    """The hqlt name of a stored metric (only slice metrics differ)."""
    for prefix in SLICE_METRIC_PREFIXES:
        stored = to_mlflow_metric(prefix)
        if name.startswith(stored):
            return prefix + name[len(stored):]
    return name
# Metrics where lower is better (checkpoint selection on a validation metric needs the direction).
LOWER_IS_BETTER = (TRAIN_LOSS, VAL_LOSS, VAL_BPB, TEST_LOSS, TEST_BPB, STEP_MS, PEAK_MEM_MB)


def as_test_metric(name: str) -> str:
    """`val/acc@len_41-64` -> `test/acc@len_41-64` (the same metric on the test set)."""
    return TEST_PREFIX + name[len(VAL_PREFIX):] if name.startswith(VAL_PREFIX) else name


# Seed aggregation of a trial (`sweep.seeds` > 1): `seed<i>/<metric>` is seed i's value of an objective;
# `seeds_median/<metric>`, `seeds_min/<metric>`, `seeds_max/<metric>` summarise an objective over the completed
# seeds; `seed_of/<metric>` is the index of the seed an objective's value came from (seed_aggregate max).
SEED_STATS = ("median", "min", "max")
SEED_OF_PREFIX = "seed_of/"
SELECTED_SEED = "trial/selected_seed"  # seed_aggregate max: the seed whose record is the trial's final record


def seed_metric(i: int, metric: str) -> str:
    return f"seed{i}/{metric}"


def seed_stat_metric(stat: str, metric: str) -> str:
    return f"seeds_{stat}/{metric}"


# The throughput probe (`perf/*` above). It measures at the trial's own size or at `probe.size` (a preset such as
# 340M, or explicit d_model / n_layers / n_heads) with the trial's architecture, once per architecture per sweep
# (cached in the sweep folder's `probes/`), and says how: the size, the card, a cache hit, contention.
PROBE_SEQ_LEN = "perf/probe_seq_len"
PROBE_BATCH_SIZE = "probe/batch_size"
PROBE_D_MODEL = "probe/d_model"
PROBE_N_LAYERS = "probe/n_layers"
PROBE_N_HEADS = "probe/n_heads"
PROBE_VOCAB_SIZE = "probe/vocab_size"
PROBE_PARAMS = "probe/params"
PROBE_FLOPS_PER_TOKEN = "probe/flops_per_token"
PROBE_CACHED = "probe/cached"        # 1: the value came from the sweep's probe cache (measured by an earlier trial
                                     # or by the sweep's warm-up)
PROBE_CONTENDED = "probe/contended"  # 1: other work may have shared the device (CPU, or a GPU without the card lock)
PROBE_SIZE = "probe/size"            # text: the size preset ("340M") or "d<D>-L<n>-H<h>-V<v>"
PROBE_DEVICE = "probe/device"        # text: the card's name ("NVIDIA H200") or "cpu"
PROBE_NUMERIC = (PROBE_SEQ_LEN, PROBE_BATCH_SIZE, PROBE_D_MODEL, PROBE_N_LAYERS, PROBE_N_HEADS, PROBE_VOCAB_SIZE,
                 PROBE_PARAMS, PROBE_FLOPS_PER_TOKEN, PROBE_CACHED, PROBE_CONTENDED)

# Where a trial's wall time goes (seconds, each seed's record; the sweep summary averages them, sweep.py).
TIME_SETUP = "time/setup_s"              # config, task, model: before any step
TIME_PROBE = "time/probe_s"              # the throughput probe, its waits for the card included
TIME_PROBE_WAIT = "time/probe_wait_s"    # ... of which waiting: for another trial's probe of the architecture, or
                                         # for the card (other probes, trainers reaching a step boundary)
TIME_TRAIN = "time/train_s"              # the training loop (evaluations and graph capture included)
TIME_GATE_WAIT = "time/gate_wait_s"      # ... of which paused while other trials' probes held the card
TIME_GRAPH_CAPTURE = "time/graph_capture_s"  # the CUDA-graph engine's capture
TIME_TRAINABLE = "time/trainable_s"      # the whole trial function in the Ray worker (all its seeds)

# A trial's analytic training cost: model FLOPs per token at the training length x batch size x training length x
# train.steps x seeds (orchestration/startup.py `predicted_flops`); what `sweep.order: longest_first` ranks a grid by.
PREDICTED_FLOPS = "trial/predicted_flops"

# The checkpoint whose weights were scored on the test set (`train.checkpoint: final | best_val`).
CHECKPOINT = "trial/checkpoint"      # text: the policy
SELECTED_STEP = "train/selected_step"  # the training step of those weights

# A seed resumed from its seed snapshot (`sweep.snapshot_minutes`, orchestration/seed_snapshot.py): the step it went
# on from (0: trained from the start). Only in the records of sweeps that take snapshots.
RESUMED_STEP = "train/resumed_step"

# Axis labels for plots and tables; a metric missing here is labelled by its name.
METRIC_LABELS = {
    VAL_ACC: "validation accuracy",
    VAL_ACC_SCALED: "validation accuracy (scaled)",
    TRAIN_TOK_S: "throughput (tokens/s)",
    PEAK_MEM_MB: "peak memory (MB)",
    PARAMS: "parameters",
    FW_STATE_BYTES: "FW state (bytes)",
    KV_CACHE_BYTES: "KV cache (bytes)",
    TRAIN_LOSS: "training loss",
    VAL_LOSS: "validation loss",
    VAL_BPB: "validation bits per byte",
    TEST_ACC: "test accuracy",
    TEST_ACC_SCALED: "test accuracy (scaled)",
    TEST_LOSS: "test loss",
    TEST_BPB: "test bits per byte",
}

# ------------------------------------------------------------------------------------------- trial statuses
COMPLETED, FAILED, OOM, NAN, PRUNED, INFEASIBLE, RUNNING = (
    "completed", "failed", "oom", "nan", "pruned", "infeasible", "running")
TRIAL_STATUSES = (COMPLETED, FAILED, OOM, NAN, PRUNED, INFEASIBLE, RUNNING)
SUPERSEDED = "superseded"  # a second run of one trial_id, reduced away by the report

# ------------------------------------------------------------------------------------------------ MLflow tags
PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "hqlt.role"
ROLE_SWEEP, ROLE_TRIAL, ROLE_TRAIN = "sweep", "trial", "train"
SWEEP_NAME_TAG = "hqlt.sweep_name"
SPEC_HASH_TAG = "hqlt.spec_hash"
SWEEP_ID_TAG = "hqlt.sweep_id"  # parent run: the uuid in its folder's sweep.json — what identifies a sweep
OBJECTIVES_TAG = "hqlt.objectives"
REFERENCE_POINT_TAG = "hqlt.reference_point"
# child runs
STATUS_TAG = "status"
REASON_TAG = "reason"
ARCH_TAG = "arch"
TRIAL_ID_TAG = "trial_id"
CONFIG_HASH_TAG = "config_hash"
SEED_TAG = "seed"
BASELINE_TAG = "baseline"
PROBE_SIZE_TAG = "probe.size"
PROBE_DEVICE_TAG = "probe.device"
CHECKPOINT_TAG = "checkpoint"
NODE_TAG = "node"  # the Ray node that ran the trial's last report: "<host>:<node id, 8 hex>"
TRIAL_NODE = "trial/node"   # text: the Ray node of a trial report (its NODE_TAG)
REPLAYED_KEY = "replayed"   # in a Ray result: 1 when a restarted trial reported its saved results/<trial_id>.json
# Text-valued keys of a trial's final result that become child-run tags (MLflow metrics are numbers only).
RESULT_TAGS = {PROBE_SIZE: PROBE_SIZE_TAG, PROBE_DEVICE: PROBE_DEVICE_TAG, CHECKPOINT: CHECKPOINT_TAG,
               TRIAL_NODE: NODE_TAG}
# written by the report
PARETO_RANK_TAG = "pareto_rank"
DOMINATED_BY_TAG = "dominated_by"
PARETO_OBJECTIVES_TAG = "pareto_objectives"
NONE_TAG = "none"  # the value of a rank tag for a trial that is not ranked
REPORT_OBJECTIVES_TAG = "report.objectives"            # on the parent run: the objectives of the latest report
REPORT_REFERENCE_POINT_TAG = "report.reference_point"  # on the parent run: its hypervolume reference point
PARETO_RANK_METRIC = "pareto_rank"  # the rank again as a metric (numeric sort; NaN when not ranked), step 0
PARETO_GROUP_TAG = "pareto_group"   # child: the group (task) its rank is within, e.g. "parity"; "all": one group
ALL_GROUP = "all"
REPORT_GROUP_BY_TAG = "report.group_by"  # on the parent run: the params the latest report grouped by (JSON list)
# MLflow's own names that hqlt writes
RUN_NAME_TAG = "mlflow.runName"
NOTE_TAG = "mlflow.note.content"  # a run's (or experiment's) description, Markdown: the parent holds the front
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# MLflow 3's UI opens an experiment by its kind: this value selects the classic runs table (not GenAI's overview).
EXPERIMENT_KIND_RUNS = "custom_model_development"
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # experiment tag + `viewStateShareKey` in the runs-page URL
FRONT_VIEW_KEY = "hqlt-pareto-front"  # the shared view `hqlt ui` links to: the front's runs, objective columns

# Trial metrics that do not change during a trial (sizes, the throughput probe, the predicted cost): logged to MLflow
# when their value changes, not at every evaluation (a flat line in the charts otherwise).
CONSTANT_METRIC_PREFIXES = ("model/", "perf/", "probe/", PREDICTED_FLOPS)
# Searched keys under this prefix say which task a trial ran on: fronts are ranked per task (report grouping).
TASK_PARAM_PREFIX = "task"
# A choice of whole arms (`model: {choice: [...]}`) is logged flat (`model.mixer.kv.window`, ...) plus the arm's id
# under the key itself: `arm<i>`, i = its position in the spec's choice list (from 0).
ARM_ID_PREFIX = "arm"

# ------------------------------------------------------------------------------------- Optuna and Ray configs
# Keys under this prefix in a sampled config (so in Ray's trial config and the trial's MLflow params) are sweep
# bookkeeping, never part of the trial config.
BOOKKEEPING_PREFIX = "hqlt."
# Optuna user attributes of a trial
OPTUNA_STATUS_ATTR = "hqlt.status"      # the hqlt trial status
OPTUNA_REASON_ATTR = "hqlt.reason"      # why it did not complete
OPTUNA_ORPHANED_ATTR = "hqlt.orphaned"  # closed on resume: Ray's last snapshot never recorded it

# ------------------------------------------------------------------------------------------- sweep folder
SWEEP_JSON = "sweep.json"      # name, spec hash, objectives, tracking URI, folder path, wall time of each run
SPEC_YAML = "spec.yaml"        # the merged spec as run
OPTUNA_LOG = "optuna.log"      # Optuna journal (the study)
MLFLOW_DB = "mlflow.db"        # embedded MLflow store (unless a tracking server is used)
ARTIFACTS_DIR = "artifacts"    # the embedded store's artifact root
RAY_DIR = "ray"                # Ray Tune experiment state (Tuner.restore)
RESULTS_DIR = "results"        # per trial: the final result, each completed seed, the running seed's snapshot
PROBES_DIR = "probes"          # throughput probe results by architecture hash, and the per-GPU probe locks
GPU_UTIL_CSV = "gpu_util.csv"  # GPU utilization sampled by the driver
CACHE_DIR = "cache"            # Triton / Inductor compile caches shared by all trials (not needed to resume)
REPORT_DIR = "report"          # the latest report's files
DRIVER_LOCK = ".driver.lock"   # held (flock) by the driver running the sweep: one driver per folder
SEED_STATS_MD = "seed_stats.md"  # the report's seed statistics
# the report's files: on the parent run (artifacts, logged in this order: the last one marks a whole report) and in report/
REPORT_ARTIFACTS = ("pareto.png", "pareto.html", "hypervolume.png", "front.md", "front.csv", "trials.csv",
                    SEED_STATS_MD, "report.json")
PARETO_PNG = "pareto.png"

# Progress phases of one trial (`run_trial(phase=...)` is called with each as it starts).
PHASE_PROBE, PHASE_TRAIN, PHASE_TEST = "probe", "train", "test eval"


def sqlite_uri(directory) -> str:
    """The tracking URI of a sweep folder's embedded MLflow store."""
    return f"sqlite:///{(Path(directory) / MLFLOW_DB).resolve()}"
