"""Sweep start-up on GPUs: warm the Triton / fla kernel caches once per kernel shape, and pack trials onto GPUs.

Warm-up. fla's Triton kernels compile ~10-20 autotuning configurations per new (kernel, head count, head dim,
dtype, ...) key: minutes on a fresh machine, paid by every trial process that meets the key first — and, with
fractional GPUs, by several at once, each benchmarking under the others' load. `warm_kernel_cache(configs, device)`
runs one forward + backward of each *distinct kernel shape* among the sweep's candidate configs (a reduced model:
one layer per layer kind, at the trial's batch sizes and its training, evaluation and probe lengths) before the
trials fan out, so the compiled kernels — and, with Triton >= 3.4 and TRITON_CACHE_AUTOTUNING=1 (set by
`sweep._init_ray`), the autotuning results — land in the sweep's shared TRITON_CACHE_DIR and trials only load them.
`warm_sweep(spec)` runs it in a one-GPU Ray task (its CUDA context ends with the task, not held by the driver;
on a cluster it runs on one GPU node, the cache folder being on the shared sweep folder) and also reports the
GPU's memory. No-op without GPUs.

Packing. With ``sweep.resources.gpu: auto`` each trial asks Ray for the GPU fraction its memory needs:
`memory_estimate(plain)` (weights, gradients and AdamW state; training activations, which the graph engine keeps
reserved, plus evaluation at the same time; the probe at the trial's own size; CUDA context; a 25 % margin),
divided by the GPU's memory and rounded up to 1/k (k trials per GPU, at most `MAX_PER_GPU`). The estimate is
analytic and deliberately generous; a trial that still runs out of memory is recorded as `oom`.
"""
from __future__ import annotations

import json
import math
import sys
import time
from typing import Iterable, Optional

import torch

from hqlt.blocks import HybridLM, param_count

from .tasks import make_task
from .trial_config import trial_config

MAX_PER_GPU = 8  # trials sharing one GPU at most under `gpu: auto`
CONTEXT_BYTES = 600 * 2**20  # a CUDA context and the caching allocator's slack
MARGIN = 1.25


# ---- kernel shapes ----------------------------------------------------------------------------------
def _lengths(cfg, task) -> tuple[int, int, Optional[int]]:
    """(train T, eval T, probe T or None) of a trial."""
    probe_t = None
    if cfg.probe.enabled and getattr(cfg.probe, "size", None) is None:
        probe_t = cfg.probe.seq_len or task.seq_len
    return task.train_seq_len, task.seq_len, probe_t


def _probe_batch(cfg, probe_t: int) -> int:
    if cfg.probe.batch_size:
        return cfg.probe.batch_size
    tokens = getattr(cfg.probe, "batch_tokens", None)
    return max(1, tokens // probe_t) if tokens else cfg.train.batch_size


def _bf16(cfg, device_type: str = "cuda") -> bool:
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device_type == "cuda")


def kernel_shape(plain: dict) -> str:
    """What selects and tunes the token-mixing kernels of a trial config: layer kinds, heads, head dim, the
    mixer's memories and blend, backend, chunk, precision and the sequence lengths it runs at (json text; two
    configs with the same text meet the same compiled kernels). Width, depth, vocab, optimizer and batch sizes do not
    enter (a shape is warmed at the batch sizes of the first config that has it)."""
    cfg = trial_config(plain)
    task = make_task(cfg.task["name"], cfg.task_config)
    m = cfg.model
    mixer = {k: v for k, v in vars(m.mixer).items() if k in ("kv", "fw", "blend", "short_conv", "conv_size")}
    return json.dumps({"kinds": "".join(k for k in "HKF" if k in m.pattern), "n_heads": m.n_heads,
                       "head_dim": m.head_dim, "mixer": mixer, "backend": m.backend, "chunk_size": m.chunk_size,
                       "bf16": _bf16(cfg), "lengths": _lengths(cfg, task)}, sort_keys=True, default=str)


def _warm_one(plain: dict, device: torch.device) -> None:
    """One forward + backward at the training (and probe) length, one forward at the evaluation length."""
    from .trainer import autocast_for, lm_loss

    cfg = trial_config(plain)
    task = make_task(cfg.task["name"], cfg.task_config)
    m = cfg.model
    kinds = "".join(k for k in "HKF" if k in m.pattern)
    reduced = trial_config({**plain, "model": {**plain.get("model", {}), "layers": kinds, "n_layers": len(kinds),
                                               "vocab_size": m.vocab_size or task.vocab_size}}).model
    model = HybridLM(reduced).to(device)
    train_t, eval_t, probe_t = _lengths(cfg, task)
    runs = {(train_t, cfg.train.batch_size, True), (eval_t, cfg.train.eval_batch_size, False)}
    if probe_t:
        runs.add((probe_t, _probe_batch(cfg, probe_t), True))
    for T, B, backward in sorted(runs):
        x = torch.randint(0, reduced.vocab_size, (B, T), device=device)
        with torch.set_grad_enabled(backward), autocast_for(device, cfg.train.precision):
            logits = model(x)
        if backward:
            lm_loss(logits, x).backward()
        del logits
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_kernel_cache(configs: Iterable[dict], device, *, max_shapes: int = 32, time_budget_s: float = 1200.0,
                      cpu: bool = False) -> dict:
    """Warm the kernel caches for each distinct `kernel_shape` among `configs` (plain trial configs; invalid ones
    are skipped) on `device`. CUDA only: elsewhere nothing runs (``cpu=True`` runs it anyway, for tests).
    Stops after `max_shapes` shapes or `time_budget_s`. Returns {"shapes", "seconds", "skipped", "errors"}."""
    device = torch.device(device)
    out = {"shapes": 0, "seconds": 0.0, "skipped": 0, "errors": []}
    if device.type != "cuda" and not cpu:
        return out
    start, seen = time.perf_counter(), set()
    for plain in configs:
        try:
            key = kernel_shape(plain)
        except Exception:  # noqa: BLE001 — an infeasible candidate: the trial itself will say why
            continue
        if key in seen:
            continue
        if len(seen) >= max_shapes or time.perf_counter() - start > time_budget_s:
            out["skipped"] += 1
            seen.add(key)
            continue
        seen.add(key)
        try:
            _warm_one(plain, device)
            out["shapes"] += 1
        except Exception as exc:  # noqa: BLE001 — a shape that fails here fails (and is recorded) in its trial
            out["errors"].append(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    out["seconds"] = time.perf_counter() - start
    return out


def sweep_candidates(spec, limit: int = 2000) -> list[dict]:
    """Plain trial configs of the space's candidates (`hqlt.search_space` enumeration: the whole grid when it
    has at most `limit` points, else corners and seeded samples); those that do not materialise are left out."""
    from hqlt.search_space import materialize
    from hqlt.search_space.candidates import candidates

    out = []
    for sampled in candidates(spec.params, limit, seed=spec.sweep.sampler_seed)[0]:
        try:
            out.append(materialize(spec, sampled))
        except Exception:  # noqa: BLE001
            continue
    return out


def uses_gpus(spec) -> bool:
    gpu = spec.sweep.resources.gpu
    return gpu == "auto" or (isinstance(gpu, (int, float)) and gpu > 0)


def warm_sweep(spec, *, max_shapes: int = 32, time_budget_s: float = 1200.0) -> dict:
    """`warm_kernel_cache` over the sweep's candidates in a one-GPU Ray task (Ray initialised with the sweep's
    environment); adds "gpu_mem_bytes" (the GPU's memory). {} when the spec uses no GPU or Ray has none."""
    import ray

    if not uses_gpus(spec) or ray.cluster_resources().get("GPU", 0) < 1:
        return {}
    configs = sweep_candidates(spec)

    @ray.remote(num_gpus=1, max_calls=1)
    def warm(configs):
        device = torch.device("cuda")
        result = warm_kernel_cache(configs, device, max_shapes=max_shapes, time_budget_s=time_budget_s)
        result["gpu_mem_bytes"] = torch.cuda.get_device_properties(device).total_memory
        result["gpu_name"] = torch.cuda.get_device_name(device)
        return result

    result = ray.get(warm.remote(configs))
    print(f"kernel cache warmed: {result['shapes']} kernel shapes in {result['seconds']:.0f}s"
          + (f" ({result['skipped']} left to the trials)" if result["skipped"] else "")
          + (f"; {len(result['errors'])} failed: {result['errors'][0]}" if result["errors"] else ""), file=sys.stderr)
    return result


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


__all__ = ["TrialResources", "gpu_fraction", "kernel_shape", "memory_estimate", "sweep_candidates", "trial_resources", "uses_gpus",
           "warm_kernel_cache", "warm_sweep"]
