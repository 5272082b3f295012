"""Training and evaluation of one model on one task.

AdamW (decay / no-decay groups), linear warm-up + cosine to a floor, gradient clipping that is applied,
bf16 autocast on CUDA (fp32 on CPU), periodic evaluation with per-slice metrics, optional early stop,
and a `report(metrics)` callback so Ray Tune (or the CLI's progress bar) can follow along. A NaN/Inf
loss raises `TrialFailure("nan")`; running out of GPU memory is turned into `TrialFailure("oom")` by
the trial runner, so both become a recorded status rather than a crashed process. The step itself runs in
an engine (`train.engine`, see `engine`): eager, or one static-shape step captured into a CUDA graph.
"""
from __future__ import annotations

import copy
import math
import sys
import time
from contextlib import nullcontext
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from hqlt.search_space.vocabulary import NAN, RESUMED_STEP, TIME_TRAIN, as_test_metric

from .engine import EagerStep, StaticStep, resolve_engine
from .prefetch import BatchStream
from .seed_snapshot import SeedSnapshot, rng_state, set_rng_state
from .tasks.base import Batch, Task, per_example_accuracy, slice_metrics
from .trial_config import TrainConfig

Report = Callable[[dict], None]


class TrialFailure(RuntimeError):
    """A trial ended for a reason that belongs to its config (status 'nan', 'oom', ...), not to a bug."""

    def __init__(self, status: str, reason: str, metrics: Optional[dict] = None):
        super().__init__(f"{status}: {reason}")
        self.status, self.reason, self.metrics = status, reason, metrics or {}


def param_groups(model: torch.nn.Module, weight_decay: float, groups: str = "matrices") -> list[dict]:
    """groups="matrices": matrices and embeddings decay; vectors and scalars (norm weights, gains, decay rates) do not.
    groups="all": one group, every parameter decays (`train.weight_decay_groups`)."""
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    if groups == "all":
        return [{"params": params, "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in params:
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.weight_decay_groups), lr=cfg.lr,
                             betas=tuple(cfg.betas), eps=cfg.eps)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine to lr·min_lr_ratio, reached at
    step `cosine_steps` (null: `steps`) and held after it."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    horizon = cfg.steps if cfg.cosine_steps is None else cfg.cosine_steps
    span = max(1, horizon - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def autocast_for(device: torch.device, precision: str, cache_enabled: bool = True):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
    return nullcontext()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return Batch(batch.inputs.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True), batch.slices)


def loss_and_grads(model, optimizer, batch: Batch, cfg: TrainConfig, step: int, device) -> torch.Tensor:
    """The first half of an optimizer step: the learning rate of `step`, the loss (on the device) and its gradients."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    with autocast_for(device, cfg.precision):
        logits = model(batch.inputs)
    loss = lm_loss(logits, batch.targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return loss


def train_step(model, optimizer, batch: Batch, cfg: TrainConfig, step: int, device) -> tuple[float, float]:
    """One optimizer step; returns (loss, grad norm before clipping)."""
    loss = loss_and_grads(model, optimizer, batch, cfg, step, device)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params if p.grad is not None]))
    optimizer.step()
    return loss.item(), float(grad_norm)


@torch.no_grad()
def evaluate(model, task: Task, batch_size: int, device, precision: str, split: str = "val") -> dict:
    """Validation metrics of `task`: accuracy (+ scaled, + per slice) or LM loss / bits per byte. `split="test"`:
    the same metrics of the test set (`task.test_batches`), named `test/...`."""
    model.eval()
    correct, slices, loss_sum, n_tok = [], {}, 0.0, 0
    for batch in (task.test_batches(batch_size) if split == "test" else task.eval_batches(batch_size)):
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
    return {as_test_metric(k): v for k, v in metrics.items()} if split == "test" else metrics


def make_engine(model, cfg: TrainConfig, device, *, seq_len: int, step_fn: Optional[Callable] = None,
                fault: Optional[tuple] = None):
    """The step engine of `cfg.engine` on `device` (see `engine`): eager runs `step_fn` (default `train_step`),
    static/graph the static-shape step over batches of (cfg.batch_size, seq_len). `fault` = (kind, step) is
    `TrialConfig.fault` for the static engines (eager gets it through `step_fn`)."""
    device = torch.device(device)
    kind = resolve_engine(cfg.engine, device)
    if kind == "eager":
        return EagerStep(model, make_optimizer(model, cfg), cfg, device, step_fn or train_step)
    return StaticStep(model, param_groups(model, cfg.weight_decay, cfg.weight_decay_groups), cfg, device, batch_shape=(cfg.batch_size, seq_len),
                      schedule=[lr_at(s, cfg) for s in range(cfg.steps)], loss_fn=lm_loss,
                      autocast=lambda: autocast_for(device, cfg.precision, cache_enabled=False),
                      capture=kind == "graph", fault=fault, fallback=cfg.engine == "auto")


SNAPSHOT_KEYS = ("step", "model", "engine", "stream", "losses", "last_eval", "grad_norm", "report", "train_s", "rng",
                 "parts")


def _resume(saved: dict, snapshot: SeedSnapshot, model, engine, parts: dict, device, new_engine: Callable):
    """Put the model, the engine, the snapshot parts and the random state where `saved` left them: (engine, saved).
    A snapshot that does not fit (made by code whose model, optimizer or state layout has changed since) is undone,
    deleted and reported in one line, and the seed starts over: (a new engine, None)."""
    model_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    part_states = {name: copy.deepcopy(part.state_dict()) for name, part in parts.items()}
    rng = rng_state(device)
    try:
        missing = [k for k in SNAPSHOT_KEYS if k not in saved] + [f"parts.{n}" for n in parts
                                                                   if n not in saved.get("parts", {})]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
        np.random.default_rng().bit_generator.state = saved["stream"]["rng"]  # a stream state this numpy can take
        model.load_state_dict(saved["model"])
        engine.resume(saved["engine"], int(saved["step"]))
        for name, part in parts.items():
            part.load_state_dict(saved["parts"][name])
        set_rng_state(saved["rng"], device)
        return engine, saved
    except Exception as exc:  # noqa: BLE001 — an unusable snapshot costs the seed its progress, not its result
        first_line = (str(exc).splitlines() or [""])[0][:200]
        print(f"warning: seed snapshot {snapshot.path} does not fit this run ({type(exc).__name__}: {first_line}); "
              "the seed starts over", file=sys.stderr)
        snapshot.remove()
        model.load_state_dict(model_state)
        for name, part in parts.items():
            part.load_state_dict(part_states[name])
        set_rng_state(rng, device)
        return new_engine(), None


def train(model, task: Task, cfg: TrainConfig, *, device, data_seed: int, order_seed: int,
          report: Optional[Report] = None, constant_metrics: Optional[dict] = None,
          progress: Optional[Callable[[int, dict], None]] = None, step_fn: Optional[Callable] = None,
          fault: Optional[tuple] = None, boundary: Optional[Callable[[int], None]] = None,
          snapshot: Optional[SeedSnapshot] = None, snapshot_parts: Optional[dict] = None) -> dict:
    """Train `model` on `task`; returns the last metrics. `constant_metrics` (throughput, sizes) are added
    to every report so that each one carries every objective key. `step_fn` replaces `train_step` (fault
    injection in tests; eager engine), `fault` = (kind, step) injects the same faults into the static/graph
    engines. The eager engine hands back each step's loss at once; the static/graph engines keep losses on the
    device and are read at log points (every `log_every` steps) and evaluation points, where a NaN/Inf loss is
    found with the range of steps it hides in. `boundary(step)` is called before each step (the card lock of
    `cost.TrainerGate`: a pause while another trial's throughput probe measures).

    `snapshot` (seed_snapshot.py): go on from its saved state if it holds one for this config, and save the state at
    evaluations as `snapshot.due()` says (not at the last one: the seed then ends). `snapshot_parts`: {name: object
    with state_dict() / load_state_dict()} saved and restored with it (the checkpoint selection)."""
    constant_metrics = dict(constant_metrics or {})
    device = torch.device(device)
    parts = dict(snapshot_parts or {})
    new_engine = lambda: make_engine(model, cfg, device, seq_len=task.train_seq_len, step_fn=step_fn,  # noqa: E731
                                     fault=fault)
    engine = new_engine()
    saved = snapshot.load() if snapshot is not None else None
    if saved is not None:
        engine, saved = _resume(saved, snapshot, model, engine, parts, device, new_engine)
    first = int(saved["step"]) if saved is not None else 0
    if snapshot is not None:
        constant_metrics[RESUMED_STEP] = float(first)
    if saved is not None and report is not None:
        # the snapshot's own evaluation: the caller may have held its report back (trainable.run_sampled) when the
        # run stopped, so it is sent again; a consumer that had it sees the same step twice (MLflow logs it once)
        report({**saved["report"], RESUMED_STEP: float(first)})
    batches = BatchStream(task, cfg.batch_size, np.random.default_rng([data_seed, order_seed]), count=cfg.steps,
                          device=device, start=saved["stream"] if saved is not None else None)
    model.train()
    last_eval: dict = dict(saved["last_eval"]) if saved is not None else {}
    losses: list[float] = list(saved["losses"]) if saved is not None else []
    grad_norm, checked = (float(saved["grad_norm"]), first) if saved is not None else (float("nan"), 0)
    start = time.perf_counter() - (float(saved["train_s"]) if saved is not None else 0.0)
    metric, target = cfg.early_stop.metric, cfg.early_stop.value
    try:
        for step in range(first, cfg.steps):
            if boundary is not None:
                boundary(step)
            engine.step(batches.next(), step)
            done = step + 1 == cfg.steps
            at_eval, at_log = (step + 1) % cfg.eval_every == 0 or done, (step + 1) % cfg.log_every == 0
            if engine.sync_every_step or at_eval or at_log:
                new, grad_norm = engine.flush(step + 1)
                for i, loss in enumerate(new):
                    if not math.isfinite(loss):
                        bad = checked + i + 1
                        where = f"at step {bad}" if bad == step + 1 and checked == step else (
                            f"at step {bad} (found at step {step + 1}: the {engine.name} engine reads steps "
                            f"{checked + 1}-{step + 1} at once)")
                        raise TrialFailure(NAN, f"training loss became {loss} {where}",
                                           {**constant_metrics, **engine.metrics(), **last_eval, "train/loss": loss,
                                            "step": step + 1, "train/nan_step": bad})
                losses.extend(new)
                checked = step + 1
            if at_eval:
                last_eval = evaluate(model, task, cfg.eval_batch_size, device, cfg.precision)
                metrics = {**constant_metrics, **engine.metrics(), **last_eval,
                           "train/loss": float(np.mean(losses[-cfg.log_every:])), "train/grad_norm": grad_norm,
                           "train/lr": lr_at(step, cfg), "step": step + 1, TIME_TRAIN: time.perf_counter() - start}
                stop = target is not None and metrics.get(metric, -math.inf) >= target
                metrics["trial/stopped_early"] = float(stop and not done)
                if report is not None:
                    report(metrics)
                if progress is not None:
                    progress(step + 1, metrics)
                if stop:
                    return metrics
                if snapshot is not None and not done and snapshot.due():
                    snapshot.save({"step": step + 1, "model": model.state_dict(), "engine": engine.state_dict(),
                                   "stream": batches.position(), "losses": losses[-cfg.log_every:],
                                   "last_eval": last_eval, "grad_norm": grad_norm, "report": metrics,
                                   "train_s": time.perf_counter() - start, "rng": rng_state(device),
                                   "parts": {name: part.state_dict() for name, part in parts.items()}})
            elif progress is not None and at_log:
                progress(step + 1, {"train/loss": float(np.mean(losses[-cfg.log_every:])), **last_eval})
    finally:
        batches.close()
    return metrics
