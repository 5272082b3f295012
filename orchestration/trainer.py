"""Training and evaluation of one model on one task.

AdamW (decay / no-decay groups), linear warm-up + cosine to a floor, gradient clipping that is applied,
bf16 autocast on CUDA (fp32 on CPU), periodic evaluation with per-slice metrics, optional early stop,
and a `report(metrics)` callback so Ray Tune (or the CLI's progress bar) can follow along. A NaN/Inf
loss raises `TrialFailure("nan")`; running out of GPU memory is turned into `TrialFailure("oom")` by
the trial runner, so both become a recorded status rather than a crashed process.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .tasks.base import Batch, Task, per_example_accuracy, slice_metrics
from .trial_config import TrainConfig

Report = Callable[[dict], None]


class TrialFailure(RuntimeError):
    """A trial ended for a reason that belongs to its config (status 'nan', 'oom', ...), not to a bug."""

    def __init__(self, status: str, reason: str, metrics: Optional[dict] = None):
        super().__init__(f"{status}: {reason}")
        self.status, self.reason, self.metrics = status, reason, metrics or {}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Matrices and embeddings decay; vectors and scalars (norm weights, gains, decay rates) do not."""
    decay, no_decay = [], []
    for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine to lr·min_lr_ratio."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def autocast_for(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return Batch(batch.inputs.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True), batch.slices)


def train_step(model, optimizer, batch: Batch, cfg: TrainConfig, step: int, device) -> tuple[float, float]:
    """One optimizer step; returns (loss, grad norm before clipping)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    with autocast_for(device, cfg.precision):
        logits = model(batch.inputs)
    loss = lm_loss(logits, batch.targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params if p.grad is not None]))
    optimizer.step()
    return loss.item(), float(grad_norm)


@torch.no_grad()
def evaluate(model, task: Task, batch_size: int, device, precision: str) -> dict:
    """Validation metrics of `task`: accuracy (+ scaled, + per slice) or LM loss / bits per byte."""
    model.eval()
    correct, slices, loss_sum, n_tok = [], {}, 0.0, 0
    for batch in task.eval_batches(batch_size):
        batch = to_device(batch, device)
        with autocast_for(device, precision):
            logits = model(batch.inputs)
        mask = batch.targets != -100
        loss_sum += F.cross_entropy(logits.float()[mask], batch.targets[mask], reduction="sum").item()
        n_tok += int(mask.sum())
        correct.append(per_example_accuracy(logits.float(), batch.targets).cpu())
        for key, value in batch.slices.items():
            slices.setdefault(key, []).append(value.cpu())
    model.train()
    mean_loss = loss_sum / max(1, n_tok)
    metrics = slice_metrics(torch.cat(correct), {k: torch.cat(v) for k, v in slices.items()}, task)
    metrics["val/loss"] = mean_loss
    if task.kind == "lm":
        metrics["val/bpb"] = mean_loss / math.log(2)
    return metrics


def train(model, task: Task, cfg: TrainConfig, *, device, data_seed: int, order_seed: int,
          report: Optional[Report] = None, constant_metrics: Optional[dict] = None,
          progress: Optional[Callable[[int, dict], None]] = None, step_fn: Optional[Callable] = None) -> dict:
    """Train `model` on `task`; returns the last metrics. `constant_metrics` (throughput, sizes) are added
    to every report so that each one carries every objective key. `step_fn` replaces `train_step` (fault
    injection in tests)."""
    constant_metrics = dict(constant_metrics or {})
    step_fn = step_fn or train_step
    optimizer = make_optimizer(model, cfg)
    rng = np.random.default_rng([data_seed, order_seed])
    model.train()
    last_eval: dict = {}
    losses: list[float] = []
    start = time.perf_counter()
    metric, target = cfg.early_stop.metric, cfg.early_stop.value
    for step in range(cfg.steps):
        batch = to_device(task.train_batch(cfg.batch_size, rng), device)
        loss, grad_norm = step_fn(model, optimizer, batch, cfg, step, device)
        if not math.isfinite(loss):
            raise TrialFailure("nan", f"training loss became {loss} at step {step + 1}",
                               {**constant_metrics, **last_eval, "train/loss": loss, "step": step + 1})
        losses.append(loss)
        done = step + 1 == cfg.steps
        if (step + 1) % cfg.eval_every == 0 or done:
            last_eval = evaluate(model, task, cfg.eval_batch_size, device, cfg.precision)
            metrics = {**constant_metrics, **last_eval, "train/loss": float(np.mean(losses[-cfg.log_every:])),
                       "train/grad_norm": grad_norm, "train/lr": lr_at(step, cfg), "step": step + 1,
                       "time/train_s": time.perf_counter() - start}
            stop = target is not None and metrics.get(metric, -math.inf) >= target
            metrics["trial/stopped_early"] = float(stop and not done)
            if report is not None:
                report(metrics)
            if progress is not None:
                progress(step + 1, metrics)
            if stop:
                return metrics
        elif progress is not None and (step + 1) % cfg.log_every == 0:
            progress(step + 1, {"train/loss": float(np.mean(losses[-cfg.log_every:])), **last_eval})
    return metrics
