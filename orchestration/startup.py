"""Sweep start-up on GPUs: warm the Triton / fla kernel caches once per kernel shape, and pack trials onto GPUs.

Warm-up. fla's Triton kernels compile ~10-20 autotuning configurations per new (kernel, head count, head dim,
dtype, ...) key: minutes on a fresh machine, paid by every trial process that meets the key first — and, with
fractional GPUs, by several at once, each benchmarking under the others' load. `warm_kernel_cache(configs, device)`
runs one forward + backward of each *distinct kernel shape* among the sweep's candidate configs (`plan_warm_up`;
a reduced model: one layer per layer kind) before the trials fan out: the trial's model at its batch sizes and
its training, evaluation and own-size probe lengths, and — with `probe.size` set — the probe's model at that
size (the trial's architecture at the target's d_model / heads / head dim, `cost.plan_probe`) at the probe's
length and batch. The compiled kernels — and, with Triton >= 3.4 and TRITON_CACHE_AUTOTUNING=1 (set by
`sweep._init_ray`), the autotuning results — land in the sweep's shared TRITON_CACHE_DIR and trials only load
them. The shapes run on parallel worker processes (compilation is CPU-bound; their autotuning timings take turns;
``$HQLT_WARM_WORKERS``, default min(shapes, cores / 2, 8); `warm_kernel_cache` says why and how).
`warm_sweep(spec)` runs it in a one-GPU Ray task (its CUDA context ends with the task, not held by the driver;
on a cluster it runs on one GPU node, the cache folder being on the shared sweep folder), prints one line per
shape and the total (`warm_report`) and reports the GPU's memory. A shape that fails is reported and left to its
trial; a warm-up that fails as a whole is one line, and the sweep goes on. No-op without GPUs.

Packing. With ``sweep.resources.gpu: auto`` each trial asks Ray for the GPU fraction its memory needs:
`memory_estimate(plain)` (weights, gradients and AdamW state; training activations, which the graph engine keeps
reserved, plus evaluation at the same time; the probe at the trial's own size; CUDA context; a 25 % margin),
divided by the GPU's memory and rounded up to 1/k (k trials per GPU, at most `MAX_PER_GPU`). The estimate is
analytic and deliberately generous; a trial that still runs out of memory is recorded as `oom`.

Order. A grid's points start longest first (``sweep.order``, default ``longest_first``; search_space/grid.py), so
that the long trials do not run alone at the end while the other GPUs idle: `predicted_flops(plain)` is a trial's
analytic training cost, model FLOPs per token at the training length (`hqlt.blocks.estimate`, docs/tasks.md §C7) ×
batch size × training length × `train.steps` (× seeds); `grid_cost(spec)` is the sampler's cost function.
Evaluation, the throughput probe and early stopping are left out. Each trial reports its value as
`trial/predicted_flops`. TPE, NSGA-II and random sampling choose each trial from the results so far: their order
is theirs.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, NamedTuple, Optional

import torch

from hqlt.blocks import HybridLM, estimate, param_count
from hqlt.blocks.validation import ConfigError

from .tasks import make_task
from .trial_config import seed_config, trial_config

MAX_PER_GPU = 8  # trials sharing one GPU at most under `gpu: auto`
CONTEXT_BYTES = 600 * 2**20  # a CUDA context and the caching allocator's slack
MARGIN = 1.25


# ---- kernel shapes ----------------------------------------------------------------------------------
WARM_WORKERS_ENV = "HQLT_WARM_WORKERS"  # warm-up worker processes: unset = auto, 1 = one shape at a time
MAX_WARM_WORKERS = 8


def _lengths(cfg, task) -> tuple[int, int, Optional[int]]:
    """(train T, eval T, probe T or None) of a trial; the probe's T only when it measures the trial's own model
    (at `probe.size` it is another model: `warm_jobs` warms it as a shape of its own)."""
    probe_t = None
    if cfg.probe.enabled and getattr(cfg.probe, "size", None) is None:
        probe_t = cfg.probe.seq_len or task.seq_len
    return task.train_seq_len, task.seq_len, probe_t


def _probe_batch(cfg, probe_t: int) -> int:
    from .probe import probe_batch_size

    return probe_batch_size(cfg.probe, cfg.train, probe_t)


def _bf16(cfg, device_type: str = "cuda") -> bool:
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device_type == "cuda")


def _shape_key(m, bf16: bool, lengths) -> str:
    mixer = {k: v for k, v in vars(m.mixer).items() if k in ("kv", "fw", "blend", "short_conv", "conv_size")}
    return json.dumps({"kinds": "".join(k for k in "HKF" if k in m.pattern), "n_heads": m.n_heads,
                       "head_dim": m.head_dim, "mixer": mixer, "backend": m.backend, "chunk_size": m.chunk_size,
                       "bf16": bf16, "lengths": lengths}, sort_keys=True, default=str)


def kernel_shape(plain: dict) -> str:
    """What selects and tunes the token-mixing kernels of a trial config: layer kinds, heads, head dim, the
    mixer's memories and blend, backend, chunk, precision and the sequence lengths it runs at (json text; two
    configs with the same text meet the same compiled kernels). Width, depth, vocab, optimizer and batch sizes do not
    enter (a shape is warmed at the batch sizes of the first config that has it). The trial's own model only: a
    probe at `probe.size` is another shape (`warm_jobs`)."""
    cfg = trial_config(plain)
    task = make_task(cfg.task["name"], cfg.task_config)
    return _shape_key(cfg.model, _bf16(cfg), _lengths(cfg, task))


@dataclass(frozen=True)
class WarmJob:
    """One kernel shape to warm: `plain` (a trial config) at its own size, or — `target` — the model its probe
    measures at `probe.size`; `runs` are (T, batch size, backward) steps; `key` dedupes, `label` is printed."""

    key: str
    plain: dict
    target: bool
    runs: tuple
    label: str


def _model_text(m, bf16: bool) -> str:
    kinds = "".join(k for k in "HKF" if k in m.pattern)
    parts = []
    kv, fw = m.mixer.kv, m.mixer.fw
    if set(kinds) & set("HK"):
        parts.append(f"kv {kv.get('name')}" + (f" w{kv['window']}" if kv.get("window") else ""))
    if set(kinds) & set("HF"):
        parts.append(f"fw {fw.get('name')}" + (f" b{fw['beta_range']}" if "beta_range" in fw else ""))
    if "H" in kinds:
        parts.append(f"blend {m.mixer.blend}")
    return f"{kinds} d{m.d_model} h{m.n_heads}x{m.head_dim} {', '.join(parts)} {'bf16' if bf16 else 'fp32'}"


def _runs_text(runs) -> str:
    return " ".join(f"{'fwd+bwd' if backward else 'fwd'} {B}x{T}" for T, B, backward in runs)


def _probe_plan(cfg, task):
    """The trial's probe at `probe.size` as the trial measures it (`cost.plan_probe`: the resized model, its
    sequence length and batch size)."""
    from .cost import plan_probe

    if not cfg.model.vocab_size:  # as the trial does before it plans its probe
        cfg.model.vocab_size = task.vocab_size
    return plan_probe(cfg, task.seq_len, torch.device("cpu"))  # the device only names the card and precision


def warm_jobs(plain: dict) -> list[WarmJob]:
    """The kernel shapes trial config `plain` meets: its own model at its training, evaluation (and own-size probe)
    lengths and batch sizes; with `probe.size` set, also its architecture at that size (`hqlt.blocks.sizes.resized`:
    d_model, heads, head dim of the target) at the probe's length and batch, forward + backward. Raises for a config
    that does not build; a probe size the architecture cannot take is left to the trial (it reports why)."""
    cfg = trial_config(plain)
    task = make_task(cfg.task["name"], cfg.task_config)
    bf16 = _bf16(cfg)
    lengths = _lengths(cfg, task)
    train_t, eval_t, probe_t = lengths
    runs = {(train_t, cfg.train.batch_size, True), (eval_t, cfg.train.eval_batch_size, False)}
    if probe_t:
        runs.add((probe_t, _probe_batch(cfg, probe_t), True))
    runs = tuple(sorted(runs))
    jobs = [WarmJob(_shape_key(cfg.model, bf16, lengths), plain, False, runs,
                    f"trial {_model_text(cfg.model, bf16)}: {_runs_text(runs)}")]
    if cfg.probe.enabled and getattr(cfg.probe, "size", None) is not None:
        try:
            plan = _probe_plan(cfg, task)
        except Exception:  # noqa: BLE001 — e.g. heads that do not divide the target width: the trial says so
            return jobs
        probe_runs = ((plan.seq_len, plan.batch_size, True),)
        jobs.append(WarmJob(_shape_key(plan.model, bf16, {"probe": plan.seq_len}), plain, True, probe_runs,
                            f"probe {plan.size} {_model_text(plan.model, bf16)}: {_runs_text(probe_runs)}"))
    return jobs


def plan_warm_up(configs: Iterable[dict], max_shapes: int = 32) -> tuple[list[WarmJob], int]:
    """The distinct kernel shapes (`warm_jobs`, deduplicated by key) of `configs`, invalid configs left out, the
    first `max_shapes` of them, probe-size shapes first (the slowest: they start first); and how many more there
    were (left to the trials)."""
    jobs, seen = [], set()
    for plain in configs:
        try:
            found = warm_jobs(plain)
        except Exception:  # noqa: BLE001 — an infeasible candidate: the trial itself will say why
            continue
        for job in found:
            if job.key not in seen:
                seen.add(job.key)
                jobs.append(job)
    kept = sorted(jobs[:max_shapes], key=lambda job: not job.target)
    return kept, len(jobs) - len(kept)


def _reduced_model(job: WarmJob, cfg, task):
    """The job's model with one layer per layer kind and the task's (small) vocabulary: the token mixers and their
    kernels at full width, without the depth and the embedding of the real model."""
    from hqlt.blocks.model_schema import ModelConfig
    from hqlt.blocks.validation import build

    m = _probe_plan(cfg, task).model if job.target else cfg.model
    kinds = "".join(k for k in "HKF" if k in m.pattern)
    vocab = task.vocab_size if job.target else (m.vocab_size or task.vocab_size)
    data = dataclasses.asdict(m)
    data.update(layers=kinds, n_layers=len(kinds), vocab_size=vocab)
    return build(ModelConfig, data, "model")


def warm_one(job: WarmJob, device: str) -> None:
    """Warm one shape: one forward + backward at each training / probe step of `job.runs`, one forward at the
    evaluation length (the default worker function of `warm_kernel_cache`)."""
    from .trainer import autocast_for, lm_loss

    device = torch.device(device)
    cfg = trial_config(job.plain)
    task = make_task(cfg.task["name"], cfg.task_config)
    reduced = _reduced_model(job, cfg, task)
    model = HybridLM(reduced).to(device)
    for T, B, backward in job.runs:
        x = torch.randint(0, reduced.vocab_size, (B, T), device=device)
        with torch.set_grad_enabled(backward), autocast_for(device, cfg.train.precision):
            logits = model(x)
        if backward:
            lm_loss(logits, x).backward()
        del logits
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _timed(fn: Callable, job: WarmJob, device: str) -> tuple[float, Optional[str], bool]:
    """Run `fn(job, device)`: (seconds, error line or None, whether the error is worth one retry alone)."""
    start = time.perf_counter()
    try:
        fn(job, device)
        return time.perf_counter() - start, None, False
    except Exception as exc:  # noqa: BLE001 — a shape that fails here fails (and is recorded) in its trial
        line = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        return time.perf_counter() - start, line, _is_oom(exc)
    finally:
        if device.startswith("cuda") and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


# ---- the warm-up's worker processes -----------------------------------------------------------------
def _serialized_bench(real: Callable, lock_path: str) -> Callable:
    """`triton.testing.do_bench` whose timing holds a lock shared by the warm-up's workers: the configuration is
    compiled and run once first (CPU-bound: the other workers keep compiling meanwhile), then timed while no
    other worker times one."""
    def do_bench(fn, *args, **kwargs):
        fn()
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return real(fn, *args, **kwargs)
        finally:
            os.close(fd)  # closing releases the lock

    do_bench.hqlt_serialized = True
    return do_bench


def _init_worker(lock_path: str, device: str) -> None:
    """A warm-up worker process: on CUDA, Triton's autotuning benchmark goes through `_serialized_bench`. Triton
    >= 3.2 looks the benchmarker up (`driver.active.get_benchmarker()`: `triton.testing.do_bench`) when a kernel
    is first tuned; older ones when the kernel is defined — fla is imported after this, so both see the patch."""
    if not device.startswith("cuda"):
        return
    try:
        import triton.testing as testing
    except Exception:  # noqa: BLE001 — no Triton: nothing is tuned
        return
    if not getattr(testing.do_bench, "hqlt_serialized", False):
        testing.do_bench = _serialized_bench(testing.do_bench, lock_path)


def _pool_pass(jobs: Iterable[WarmJob], n: int, fn: Callable, device: str, deadline: float, lock_path: str):
    """Run `jobs` on `n` spawned worker processes, at most n at a time, none started after `deadline`.
    Returns ([(job, seconds, error, retry)], jobs not started because a worker died, jobs skipped (deadline))."""
    queue, results, in_flight, broken, skipped = deque(jobs), [], {}, False, 0
    pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                               initargs=(lock_path, device))
    try:
        while (queue and not broken) or in_flight:
            while queue and not broken and len(in_flight) < n:
                if time.perf_counter() > deadline:
                    skipped += len(queue)
                    queue.clear()
                    break
                job = queue.popleft()
                try:
                    in_flight[pool.submit(_timed, fn, job, device)] = job
                except BrokenProcessPool:
                    queue.appendleft(job)
                    broken = True
            if not in_flight:
                break
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                job = in_flight.pop(future)
                try:
                    results.append((job, *future.result()))
                except Exception as exc:  # noqa: BLE001 — BrokenProcessPool: a worker died (CUDA fault, killed)
                    broken = True
                    results.append((job, None, f"the worker process died ({type(exc).__name__})", True))
    finally:
        pool.shutdown(wait=not broken, cancel_futures=True)
    return results, list(queue), skipped


def warm_workers_setting() -> Optional[int]:
    """``$HQLT_WARM_WORKERS``: the warm-up's worker processes (an integer >= 1; 1 warms one shape at a time in the
    warm-up task itself), or None (unset: `default_warm_workers`)."""
    text = os.environ.get(WARM_WORKERS_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(WARM_WORKERS_ENV, f"got {text!r}; allowed: an integer >= 1 (1: one kernel shape at a "
                                            "time), or unset (one per two CPU cores, at most 8)")
    return int(text)


def default_warm_workers(shapes: int, cpus: Optional[int] = None) -> int:
    """min(shapes, CPU cores // 2, MAX_WARM_WORKERS), at least 1."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(shapes, cpus // 2, MAX_WARM_WORKERS))


def warm_kernel_cache(configs: Iterable[dict], device, *, max_shapes: int = 32, time_budget_s: float = 1200.0,
                      cpu: bool = False, workers: Optional[int] = None, warm_fn: Optional[Callable] = None) -> dict:
    """Warm the kernel caches for each distinct shape (`plan_warm_up`) among `configs` (plain trial configs;
    invalid ones are skipped) on `device`. CUDA only: elsewhere nothing runs (``cpu=True`` runs it anyway, for
    tests). At most `max_shapes` shapes; none starts after `time_budget_s` (both: the rest are "skipped", left to
    the trials).

    Parallel. `workers` (None: `default_warm_workers` on CUDA, 1 elsewhere) > 1 runs the shapes on that many
    spawned worker processes (`concurrent.futures.ProcessPoolExecutor`, 'spawn': a fresh CUDA context each, on the
    warm-up task's GPU), a shape per process at a time. Triton's compilation — most of a fresh shape's time,
    ~10-20 autotuning configurations per kernel key — is CPU-bound and single-threaded per process, so it scales
    with the cores the GPU machine has and one GPU process does not use. Processes rather than threads: Triton's
    compile path holds the GIL for much of its Python work. Processes inside the one-GPU task rather than several
    fractional-GPU Ray tasks: the GPU and its memory stay reserved for the warm-up as a whole (no trial is placed
    beside it), and one place times, retries and reports the shapes. Autotuning measures each configuration while
    the other workers compile and run theirs, so a pick could differ from one made alone; the workers' timings
    are therefore serialised (`_serialized_bench`: a configuration is compiled and run once outside the lock, then
    timed holding a lock file no other worker's timing can hold). What is left beside a timing is the other
    workers' single untimed launches and their CPU load; a pick this noise could flip is between configurations
    within noise of each other anyway, which costs speed, never correctness. A shape that fails with an
    out-of-memory error (several shapes share the GPU) or whose worker dies is run again alone at the end.
    `warm_fn(job, device)` (default `warm_one`; module-level, it must pickle) warms one shape; tests inject a fake.

    Returns {"shapes" (warmed), "seconds" (wall), "skipped", "errors" (["label: error"]), "workers",
    "per_shape" ([{"label", "seconds" (None: the worker died), "error"}])}."""
    device = torch.device(device)
    out = {"shapes": 0, "seconds": 0.0, "skipped": 0, "errors": [], "workers": 0, "per_shape": []}
    if device.type != "cuda" and not cpu:
        return out
    start = time.perf_counter()
    deadline = start + time_budget_s
    fn = warm_fn or warm_one
    jobs, out["skipped"] = plan_warm_up(configs, max_shapes)
    if workers is None:
        workers = default_warm_workers(len(jobs)) if device.type == "cuda" else 1
    workers = max(1, min(workers, len(jobs)))
    out["workers"] = workers if jobs else 0

    def record(job: WarmJob, seconds: Optional[float], error: Optional[str], note: str = "") -> None:
        out["per_shape"].append({"label": job.label + note, "seconds": seconds, "error": error})
        if error:
            out["errors"].append(f"{job.label}{note}: {error}")
        else:
            out["shapes"] += 1

    if workers == 1:  # in this process, one shape after another
        for job in jobs:
            if time.perf_counter() > deadline:
                out["skipped"] += 1
                continue
            seconds, error, _ = _timed(fn, job, str(device))
            record(job, seconds, error)
    else:
        lock_dir = tempfile.mkdtemp(prefix="hqlt-warm-")
        lock_path = os.path.join(lock_dir, "autotune.lock")
        try:
            queue, retry, n, note = list(jobs), [], workers, ""
            while queue:
                before = len(queue)
                results, queue, skipped = _pool_pass(queue, n, fn, str(device), deadline, lock_path)
                out["skipped"] += skipped
                if not results and len(queue) == before:  # no worker would start: say so once per shape, stop
                    for job in queue:
                        record(job, None, "no warm-up worker process could start")
                    break
                for job, seconds, error, again in results:
                    if error and again and n > 1:
                        retry.append(job)
                    else:
                        record(job, seconds, error, note)
                if not queue and retry:  # out of memory beside the others, or a dead worker: once more, alone
                    queue, retry, n, note = retry, [], 1, " (alone, after a failure beside others)"
        finally:
            shutil.rmtree(lock_dir, ignore_errors=True)
    out["seconds"] = time.perf_counter() - start
    return out


def warm_report(result: dict) -> list[str]:
    """The lines `warm_sweep` prints: one per shape (its time or its error), then the total."""
    lines = []
    for shape in result.get("per_shape", []):
        took = "     ?" if shape["seconds"] is None else f"{shape['seconds']:5.1f}s"
        lines.append(f"kernel cache warm-up {took}  {shape['label']}"
                     + (f"  FAILED: {shape['error']}" if shape["error"] else ""))
    total = sum(s["seconds"] or 0.0 for s in result.get("per_shape", []))
    workers = result.get("workers", 1)
    lines.append(f"kernel cache warmed: {result['shapes']} kernel shapes in {result['seconds']:.0f}s"
                 + (f" ({workers} workers; {total:.0f}s of shape time)" if workers > 1 else "")
                 + (f" ({result['skipped']} left to the trials)" if result["skipped"] else "")
                 + (f"; {len(result['errors'])} failed: {result['errors'][0]}" if result["errors"] else ""))
    probes = result.get("probes")
    if probes:
        lines.append(f"throughput probes measured before the trials: {probes['measured']} in {probes['seconds']:.0f}s"
                     + (f", {probes['cached']} already cached" if probes["cached"] else "")
                     + (f" ({probes['skipped']} left to the trials)" if probes["skipped"] else "")
                     + (f"; {len(probes['errors'])} failed: {probes['errors'][0]}" if probes["errors"] else ""))
    return lines


def sweep_candidates(spec, limit: int = 2000, with_complete: bool = False):
    """Plain trial configs of the space's candidates (`hqlt.search_space` enumeration: the whole grid when it
    has at most `limit` points, else corners and seeded samples); those that do not materialise are left out.
    `with_complete`: return (configs, whether they are the whole space)."""
    from hqlt.search_space import materialize
    from hqlt.search_space.candidates import candidates

    out = []
    sampled_all, complete = candidates(spec.params, limit, seed=spec.sweep.sampler_seed)
    for sampled in sampled_all:
        try:
            out.append(materialize(spec, sampled))
        except Exception:  # noqa: BLE001
            continue
    return (out, complete) if with_complete else out


def remaining(configs: list[dict], finished: Iterable[str]) -> list[dict]:
    """`configs` (plain trial configs) without those whose seed-0 config is in `finished` (labels)."""
    from hqlt.search_space.spec import label

    finished = set(finished)
    return [c for c in configs if label(seed_config(c, 0)) not in finished] if finished else list(configs)


# ---- probes before the trials -----------------------------------------------------------------------
MAX_WARM_PROBES = 64  # distinct probe keys the warm-up measures at most (more: left to the trials)


class ProbeJob(NamedTuple):
    """One distinct probe of a sweep: its cache key, a trial config that needs it, that config's task length and
    the probe's plan (`cost.plan_probe`, on the measuring device)."""
    key: str
    cfg: object
    task_seq_len: int
    plan: object


def probe_plans(configs: Iterable[dict], device) -> list[ProbeJob]:
    """A `ProbeJob` for each distinct probe (architecture at the probe's size, length, batch, precision, card)
    among `configs`, in order; configs without a cached probe are left out."""
    from .cost import plan_probe

    device, out, seen = torch.device(device), [], set()
    for plain in configs:
        try:
            cfg = trial_config(plain)
            if not (cfg.probe.enabled and cfg.probe.cache):
                continue
            task = make_task(cfg.task["name"], cfg.task_config, "task")
            if not cfg.model.vocab_size:  # as the trial does before it plans its probe
                cfg.model.vocab_size = task.vocab_size
            plan = plan_probe(cfg, task.seq_len, device)
            key = plan.key(cfg.train)
        except Exception:  # noqa: BLE001 — a config that does not build is the trial's to report
            continue
        if key not in seen:
            seen.add(key)
            out.append(ProbeJob(key, cfg, task.seq_len, plan))
    return out


def measure_probes(plans: list[ProbeJob], device, folder, *, deadline: float) -> dict:
    """Measure each planned probe (`probe_plans`) into the sweep's probe cache `folder` (probes/), one after
    another, in this process: the way a trial measures it (`cost.run_probe`: its model, engine step and precision,
    the card lock), but before any trial trains, so no trial pauses for it and no probe waits for a step boundary.
    A probe already cached (a resumed sweep) is not measured again; none starts after `deadline`; one that fails is
    left to its trial. Returns {"measured", "cached", "skipped", "errors", "seconds"}."""
    from pathlib import Path

    from .cost import read_cached, run_probe

    device, folder = torch.device(device), Path(folder)
    out = {"measured": 0, "cached": 0, "skipped": 0, "errors": [], "seconds": 0.0}
    start = time.perf_counter()
    for key, cfg, task_seq_len, plan in plans:
        if time.perf_counter() > deadline:
            out["skipped"] += 1
            continue
        model = None
        try:
            if read_cached(folder, key, plan.identity(cfg.train)) is not None:
                out["cached"] += 1
                continue
            if plan.own:  # the trial's own model (its weights do not matter to a timing)
                torch.manual_seed(cfg.seeds()["model"])
                model = HybridLM(cfg.model).to(device)
            run_probe(cfg, model, task_seq_len, device, folder)
            out["measured"] += 1
        except Exception as exc:  # noqa: BLE001 — the trial measures it (and records a failure) itself
            out["errors"].append(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")
        finally:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    out["seconds"] = time.perf_counter() - start
    return out


def uses_gpus(spec) -> bool:
    gpu = spec.sweep.resources.gpu
    return gpu == "auto" or (isinstance(gpu, (int, float)) and gpu > 0)


def warm_sweep(spec, *, max_shapes: int = 32, time_budget_s: float = 1200.0, probe_dir=None,
               probe_budget_s: float = 600.0, finished: Iterable[str] = ()) -> dict:
    """`warm_kernel_cache` over the sweep's candidates in a one-GPU Ray task (Ray initialised with the sweep's
    environment; its worker processes inherit it), `$HQLT_WARM_WORKERS` workers; adds "gpu_mem_bytes" (the GPU's
    memory). Prints `warm_report`. {} when the spec uses no GPU or Ray has none, or — said in one line, the
    sweep goes on and its trials compile their own kernels — when the warm-up task itself fails.

    Probes. With `probe_dir` (the sweep folder's probes/) the same task then measures the trials' throughput
    probes (`measure_probes`, within `probe_budget_s`) when the candidates are the whole space and it has at most
    min(sweep.num_samples, MAX_WARM_PROBES) distinct probes — every one of them a trial will need; the trials then
    read their value from the cache. Otherwise each probe is measured by the first trial that needs it, which
    takes the card from the trials training on it (cost.py).

    `finished`: labels of the seed-0 configs of trials a resumed sweep has finished (`trainable.finished_configs`);
    those candidates are not warmed again (a shape they share with a remaining candidate still is)."""
    import ray

    if not uses_gpus(spec) or ray.cluster_resources().get("GPU", 0) < 1:
        return {}
    workers = warm_workers_setting()
    configs, complete = sweep_candidates(spec, with_complete=True)
    configs = remaining(configs, finished)
    probe_limit = min(spec.sweep.num_samples, MAX_WARM_PROBES)
    measure_here = probe_dir is not None and complete

    @ray.remote(num_gpus=1, max_calls=1)
    def warm(configs, workers):
        device = torch.device("cuda")
        result = warm_kernel_cache(configs, device, max_shapes=max_shapes, time_budget_s=time_budget_s,
                                   workers=workers)
        result["gpu_mem_bytes"] = torch.cuda.get_device_properties(device).total_memory
        result["gpu_name"] = torch.cuda.get_device_name(device)
        plans = probe_plans(configs, device) if measure_here else []
        if plans and len(plans) <= probe_limit:
            result["probes"] = measure_probes(plans, device, probe_dir,
                                              deadline=time.perf_counter() + probe_budget_s)
        return result

    try:
        result = ray.get(warm.remote(configs, workers))
    except Exception as exc:  # noqa: BLE001 — the warm-up only saves time: never the reason a sweep fails
        text = (str(exc).strip().splitlines() or [""])[-1][:200]
        print(f"kernel cache warm-up failed ({type(exc).__name__}: {text}); the trials compile their own kernels",
              file=sys.stderr)
        return {}
    for line in warm_report(result):
        print(line, file=sys.stderr)
    return result


# ---- order ------------------------------------------------------------------------------------------
@lru_cache(maxsize=256)
def _train_dims(name: str, options_json: str) -> tuple[int, int]:
    """(vocab_size, training sequence length) of a task config (cached: a grid repeats a few task configs)."""
    task = make_task(name, json.loads(options_json))
    return int(task.vocab_size), int(task.train_seq_len)


def predicted_flops(plain: dict, seeds: int = 1) -> float:
    """A trial's analytic training cost (module doc): FLOPs per token at the training length × batch size ×
    training length × train.steps × seeds. Raises ConfigError for an invalid config."""
    cfg = trial_config(plain)
    options = {k: v for k, v in cfg.task.items() if k != "name"}
    vocab, T = _train_dims(cfg.task["name"], json.dumps(options, sort_keys=True, default=str))
    m = cfg.model
    if m.vocab_size == 0:
        m.vocab_size = vocab
    return float(estimate(m, T).flops_per_token) * cfg.train.batch_size * T * cfg.train.steps * seeds


def grid_cost(spec) -> Callable[[dict], float]:
    """The cost function `make_sampler` orders a grid by: a sampled assignment -> `predicted_flops` of its trial
    config (× sweep.seeds). A point whose config is invalid raises (the sampler counts it 0); an over-budget one
    keeps its cost: it reports `infeasible` at once wherever it stands. About 1 ms per distinct config."""
    from hqlt.search_space import materialize

    seeds = spec.sweep.seeds

    def cost(sampled: dict) -> float:
        return predicted_flops(materialize(spec.base, sampled), seeds)

    return cost


# ---- packing ----------------------------------------------------------------------------------------
def memory_estimate(plain: dict) -> int:
    """Bytes of GPU memory one trial of `plain` needs at most (generous analytic estimate, see the module doc)."""
    cfg = trial_config(plain)
    task = make_task(cfg.task["name"], cfg.task_config)
    m = cfg.model
    if m.vocab_size == 0:
        m.vocab_size = task.vocab_size
    V, D, H, d, L = m.vocab_size, m.d_model, m.n_heads, m.head_dim, m.n_layers
    act = 2 if _bf16(cfg) else 4
    n_fw = sum(k in "HF" for k in m.pattern)
    static = 16 * param_count(m)  # fp32 weights, gradients, AdamW's two moments

    def activations(B: int, T: int) -> float:  # saved for backward, per step
        per_token = L * (24 * D + 4 * m.mlp_hidden) * act + n_fw * H * d * d * 4 / max(1, m.chunk_size)
        return B * T * (per_token + 10.0 * V)  # logits: bf16, fp32 copy, fp32 gradient

    def forward(B: int, T: int) -> float:  # evaluation: a few live activations and the logits
        return B * T * (8 * D * act + 6.0 * V)

    train_t, eval_t, probe_t = _lengths(cfg, task)
    peak = activations(cfg.train.batch_size, train_t) + forward(cfg.train.eval_batch_size, eval_t)
    if probe_t:
        peak = max(peak, activations(_probe_batch(cfg, probe_t), probe_t))
    return int(CONTEXT_BYTES + MARGIN * (static + peak))


def gpu_fraction(plain: dict, gpu_mem_bytes: float, max_per_gpu: int = MAX_PER_GPU) -> float:
    """The GPU share of one trial: its `memory_estimate` over the GPU's memory, rounded up to 1/k (k <= max_per_gpu)."""
    need = memory_estimate(plain) / float(gpu_mem_bytes)
    if need >= 1.0:
        return 1.0
    return 1.0 / max(1, min(max_per_gpu, math.floor(1.0 / need)))


class TrialResources:
    """`gpu: auto`: each trial's {cpu, gpu} from its config (Ray Tune calls it with the trial's config): its
    `gpu_fraction`, or a whole GPU when the GPU's memory is unknown or the config does not build; an infeasible
    sample (it reports without training) takes the smallest share. A class, so it pickles with the trainable."""

    def __init__(self, spec, gpu_mem_bytes: Optional[float]):
        self.spec, self.gpu_mem_bytes = spec, gpu_mem_bytes

    def __call__(self, config: dict) -> dict:
        from hqlt.search_space import INFEASIBLE_KEY, materialize

        cpu = self.spec.sweep.resources.cpu
        if not self.gpu_mem_bytes:
            return {"cpu": cpu, "gpu": 1.0}
        if config.get(INFEASIBLE_KEY):
            return {"cpu": cpu, "gpu": 1.0 / MAX_PER_GPU}
        try:
            return {"cpu": cpu, "gpu": gpu_fraction(materialize(self.spec, config), self.gpu_mem_bytes)}
        except Exception:  # noqa: BLE001 — a config that does not build fails in its trial, on a whole GPU
            return {"cpu": cpu, "gpu": 1.0}


def trial_resources(spec, gpu_mem_bytes: Optional[float] = None):
    """What `tune.with_resources` gets: {cpu, gpu} as the spec says, or — `gpu: auto` — a `TrialResources`."""
    r = spec.sweep.resources
    if r.gpu != "auto":
        return {"cpu": r.cpu, "gpu": r.gpu}
    return TrialResources(spec, gpu_mem_bytes)


__all__ = ["ProbeJob", "TrialResources", "WarmJob", "default_warm_workers", "gpu_fraction", "grid_cost",
           "kernel_shape", "measure_probes", "memory_estimate", "plan_warm_up", "predicted_flops", "probe_plans",
           "sweep_candidates", "trial_resources", "uses_gpus", "warm_jobs", "warm_kernel_cache", "warm_one",
           "warm_report", "warm_sweep", "warm_workers_setting"]
