"""Throughput probe: timed fwd+bwd+optimizer steps after a warm-up that absorbs compilation/autotuning.

The probe trains a throw-away copy of the optimizer state on random tokens and restores the weights
afterwards, so the trial's training starts from the model's initial weights.

The timed step is the step of the trial's engine: where training runs the static / graph engine (CUDA by
default), loss and gradient norm stay on the device (`device_step`: no host synchronisation between steps,
fused AdamW), as in `hqlt bench model`; under the eager engine it is the trainer's `train_step`, which reads
both back every step. The probe does not capture a graph itself: at the target sizes the probe measures, a
step is long enough that launches overlap the GPU's work.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from .engine import resolve_engine
from .tasks.base import Batch
from .trainer import loss_and_grads, make_optimizer, param_groups, train_step
from .trial_config import ProbeConfig, TrainConfig

# Dense bf16 peaks for model-FLOP utilisation (docs/tasks.md §C1); unknown cards report no MFU.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "B200": 2250e12, "GB200": 2500e12}


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe_optimizer(model, train_cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """The optimizer of the trial's engine: fused AdamW where training runs the static / graph engine (CUDA by
    default, as `hqlt bench model`), the trainer's AdamW where it runs eager."""
    if resolve_engine(train_cfg.engine, device) == "eager":
        return make_optimizer(model, train_cfg)
    return torch.optim.AdamW(param_groups(model, train_cfg.weight_decay), lr=train_cfg.lr, betas=tuple(train_cfg.betas),
                             eps=train_cfg.eps, fused=True)


def device_step(model, optimizer, batch: Batch, cfg: TrainConfig, step: int, device) -> None:
    """One optimizer step as the static / graph engine runs it: clipping and the update on the device, nothing
    read back to the host."""
    loss_and_grads(model, optimizer, batch, cfg, step, device)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip,
                                       foreach=True)
    optimizer.step()


def probe_batch_size(cfg: ProbeConfig, train_cfg: TrainConfig, T: int) -> int:
    """Sequences per probe step: `batch_size`, else `batch_tokens // T` (at least 1), else train.batch_size."""
    if cfg.batch_size:
        return cfg.batch_size
    if cfg.batch_tokens:
        return max(1, cfg.batch_tokens // T)
    return train_cfg.batch_size


def probe_throughput(model, cfg: ProbeConfig, train_cfg: TrainConfig, *, vocab_size: int, seq_len: int,
                     device: torch.device, flops_per_token: float) -> dict:
    T = cfg.seq_len or seq_len
    batch_size = probe_batch_size(cfg, train_cfg, T)
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, vocab_size, (batch_size, T), generator=gen)
    batch = Batch(inputs.to(device), inputs.roll(-1, dims=1).to(device), {})
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = probe_optimizer(model, train_cfg, device)
    step = train_step if resolve_engine(train_cfg.engine, device) == "eager" else device_step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(cfg.warmup_steps):
        step(model, optimizer, batch, train_cfg, i, device)
    _sync(device)
    start = time.perf_counter()
    for i in range(cfg.steps):
        step(model, optimizer, batch, train_cfg, i, device)
    _sync(device)
    elapsed = time.perf_counter() - start
    model.load_state_dict(saved)
    del optimizer
    tok_s = batch_size * T * cfg.steps / elapsed
    metrics = {"perf/train_tok_s": tok_s, "perf/step_ms": 1e3 * elapsed / cfg.steps, "perf/probe_seq_len": T}
    if device.type == "cuda":
        metrics["perf/peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        metrics["perf/peak_mem_mb"] = _cpu_peak_mb()
    peak = peak_flops(device)
    if peak:
        metrics["perf/mfu"] = tok_s * flops_per_token / peak
    return metrics


def _cpu_peak_mb() -> float:
    """Peak resident memory of this process (CPU has no per-allocation counter)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
