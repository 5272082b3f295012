"""Trial engines: how `trainer.train` runs one optimizer step (``train.engine``).

    eager    `trainer.train_step` as it always was: the loss and grad norm come back as Python floats, so the
             host waits for the device once per step (``loss.item()``).
    static   the graph engine's code path without capture, on any device: a fixed batch shape (shorter
             batches are right-padded with ignored targets), the LR schedule read from a device tensor, loss
             and grad norm written into device-side histories that the trainer reads only at log/eval points.
             On CPU it is the graph engine's testable twin; on CUDA, a way to tell capture from the rest.
    graph    `static` captured once into a `torch.cuda.CUDAGraph` and replayed each step (CUDA only): the
             first GRAPH_WARMUP_STEPS training steps run uncaptured on a side stream (autotuning, lazy
             optimizer state), then one capture, then a replay per step after copying the batch into the
             static input buffers. One replay launches the whole step, so small models stop being host-bound.
    auto     graph on CUDA, eager elsewhere.

The engines share the trainer's numerics: the same parameter groups (decay / no decay), gradient clipping
(``clip_grad_norm_``: its coefficient is a device tensor, nothing is read back), bf16 autocast rule and loss.
The static engines' optimizer is AdamW with the learning rate as a 0-dim tensor, ``fused=True`` (and
``capturable=True`` on CUDA); eager keeps today's AdamW with a float learning rate. A NaN/Inf loss is seen by
eager at its step and by static/graph at the next log/eval point (the trainer reports the step range).

Both engines take host batches (from `prefetch.BatchStream`) and copy them to the device themselves. The
interface the trainer uses: ``name``, ``sync_every_step``, ``step(batch, step)``, ``flush(step)`` ->
(losses of the steps since the last flush, in order; grad norm of the last step) and ``metrics()``; a seed snapshot
(seed_snapshot.py) adds ``state_dict()`` and ``resume(state, step)``, which goes on at `step` from a saved state.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, Optional, Sequence

import torch

from hqlt.blocks.validation import ConfigError
from hqlt.search_space.vocabulary import TIME_GRAPH_CAPTURE

from .tasks.base import IGNORE, Batch, concat_batches

ENGINES = ("auto", "eager", "static", "graph")
GRAPH_WARMUP_STEPS = 3  # uncaptured steps before the capture (PyTorch's recipe; DDP would need 11)


def resolve_engine(name: str, device) -> str:
    """The engine that `name` means on `device`: eager, static or graph. `graph` off CUDA is a config error."""
    device = torch.device(device)
    if name not in ENGINES:
        raise ConfigError("train.engine", f"got {name!r}; allowed: {', '.join(map(repr, ENGINES))}")
    if name == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if name == "graph" and device.type != "cuda":
        raise ConfigError("train.engine", f"got 'graph' but the trial runs on {device.type} (CUDA graphs need a CUDA "
                                          f"device); allowed on {device.type}: 'auto', 'eager', 'static'")
    return name


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """The per-parameter state of `saved` (an optimizer state_dict) into `optimizer`, keeping the optimizer's own
    groups: its flags (fused, capturable: a snapshot of the eager engine may go on in the graph engine, on another
    device) and its learning rate, which the static engines hold as a device tensor the schedule writes into."""
    own = list(optimizer.param_groups)
    optimizer.load_state_dict({"state": saved["state"], "param_groups": optimizer.state_dict()["param_groups"]})
    for group, mine in zip(optimizer.param_groups, own):
        group["lr"] = mine["lr"]


def _host_fault(fault: Optional[tuple], step: int) -> None:
    """The injected `raise` / `oom` faults of `TrialConfig.fault` (the static engines' twin of trial.faulty_step)."""
    if fault is None or step + 1 != fault[1]:
        return
    if fault[0] == "raise":
        raise RuntimeError(f"injected failure at step {step + 1}")
    if fault[0] == "oom":
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected at step {step + 1})")


class EagerStep:
    """Today's step function (`step_fn(model, optimizer, batch, cfg, step, device)` -> (loss, grad norm))."""

    name = "eager"
    sync_every_step = True

    def __init__(self, model, optimizer, cfg, device, step_fn: Callable):
        self.model, self.optimizer, self.cfg, self.device, self.step_fn = model, optimizer, cfg, device, step_fn
        self._losses: list[float] = []
        self._grad_norm = float("nan")

    def step(self, batch: Batch, step: int) -> None:
        batch = Batch(batch.inputs.to(self.device, non_blocking=True), batch.targets.to(self.device, non_blocking=True),
                      batch.slices)
        loss, self._grad_norm = self.step_fn(self.model, self.optimizer, batch, self.cfg, step, self.device)
        self._losses.append(loss)

    def flush(self, step: int) -> tuple[list[float], float]:
        out, self._losses = self._losses, []
        return out, self._grad_norm

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def resume(self, state: dict, step: int) -> None:
        load_optimizer_state(self.optimizer, state["optimizer"])

    def metrics(self) -> dict:
        return {"trial/engine": self.name, "train/cuda_graph": 0.0}


class StaticStep:
    """The static-shape step with device-side schedule and metrics; captured into a CUDA graph if `capture`.

    model, groups: the model and its optimizer parameter groups (`trainer.param_groups`);
    cfg: the TrainConfig (lr, betas, eps, grad_clip, steps); batch_shape: (batch_size, T) of every step;
    schedule: the learning rate of each step 0..steps-1; loss_fn(logits, targets) -> fp32 scalar;
    autocast(): the precision context (bf16 autocast without its weight cache, which capture cannot keep);
    fault: ("nan" | "raise" | "oom", step) of `TrialConfig.fault`, or None;
    fallback: if capture fails (not for lack of memory), go on uncaptured (name becomes "static") and say why
    in ``metrics()["trial/engine_note"]`` instead of raising (``train.engine: auto``).
    """

    sync_every_step = False

    def __init__(self, model, groups: list[dict], cfg, device, *, batch_shape: tuple[int, int], schedule: Sequence[float],
                 loss_fn: Callable, autocast: Callable, capture: bool, fault: Optional[tuple] = None,
                 fallback: bool = False, warmup_steps: int = GRAPH_WARMUP_STEPS):
        device = torch.device(device)
        if capture and device.type != "cuda":
            raise ConfigError("train.engine", f"got 'graph' on {device.type}; CUDA graphs need a CUDA device")
        if len(schedule) < 1:
            raise ValueError("schedule: need the learning rate of at least one step")
        self.model, self.cfg, self.device = model, cfg, device
        self.loss_fn, self.autocast = loss_fn, autocast
        self.capture, self.fallback, self.warmup_steps = capture, fallback, warmup_steps
        self.name = "graph" if capture else "static"
        self.note = ""
        f32 = dict(dtype=torch.float32, device=device)
        n = len(schedule)
        self.schedule = torch.tensor([float(x) for x in schedule], **f32)
        self.lr = self.schedule[0].clone()  # 0-dim: the optimizer's learning rate, rewritten on the device each step
        self.optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True,
                                           capturable=device.type == "cuda")
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.index = torch.zeros(1, dtype=torch.long, device=device)  # the step counter, on the device
        self.loss_hist = torch.zeros(n, **f32)
        self.grad_norm_hist = torch.zeros(n, **f32)
        self.inputs = torch.zeros(batch_shape, dtype=torch.long, device=device)
        self.targets = torch.full(batch_shape, IGNORE, dtype=torch.long, device=device)
        self.fault = fault
        self.inject = None
        if fault is not None and fault[0] == "nan" and 1 <= fault[1] <= n:
            inject = torch.zeros(n)
            inject[fault[1] - 1] = float("nan")
            self.inject = inject.to(device)  # added to the recorded loss only, as trial.faulty_step does
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.capture_s: Optional[float] = None
        self._side = None
        self._done = 0  # steps run (host count)
        self._read = 0  # steps already handed to the trainer by flush
        self._first = 0  # the step this engine started at (a resumed seed's)

    # ---- the step -----------------------------------------------------------------------------------
    def _body(self) -> None:
        """One optimizer step on the static buffers; every read and write stays on the device."""
        self.optimizer.zero_grad(set_to_none=True)
        self.lr.copy_(self.schedule.index_select(0, self.index).squeeze(0))
        with self.autocast():
            logits = self.model(self.inputs)
        loss = self.loss_fn(logits, self.targets)
        loss.backward()
        if self.cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.detach().norm() for p in self.params if p.grad is not None]))
        self.optimizer.step()
        recorded = loss.detach().float().reshape(1)
        if self.inject is not None:
            recorded = recorded + self.inject.index_select(0, self.index)
        self.loss_hist.index_copy_(0, self.index, recorded)
        self.grad_norm_hist.index_copy_(0, self.index, grad_norm.detach().float().reshape(1))
        self.index.add_(1)

    def load(self, batch: Batch) -> None:
        """Copy a host batch into the static buffers (right-padding a shorter T with ignored targets)."""
        B, T = self.inputs.shape
        if batch.inputs.shape[0] != B or batch.inputs.shape[1] > T:
            raise ValueError(f"the {self.name} engine runs batches of shape {(B, T)}; got {tuple(batch.inputs.shape)}")
        if batch.inputs.shape[1] < T:
            batch = concat_batches([batch], T=T)
        self.inputs.copy_(batch.inputs, non_blocking=True)
        self.targets.copy_(batch.targets, non_blocking=True)

    def step(self, batch: Batch, step: int) -> None:
        if step != self._done:
            raise RuntimeError(f"the {self.name} engine runs consecutive steps; expected step {self._done}, got {step}")
        _host_fault(self.fault, step)
        self.load(batch)
        if not self.capture:
            self._body()
        elif self.graph is None and self._done - self._first < self.warmup_steps:
            self._warmup_step()
        elif self.graph is not None or self._capture():
            self.graph.replay()
        else:  # capture failed and fallback is on: this and every later step run uncaptured
            self._body()
        self._done += 1

    def _warmup_step(self) -> None:
        current = torch.cuda.current_stream(self.device)
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side), warnings.catch_warnings():
            # AdamW(capturable=True) warns when it steps uncaptured: these steps are meant to
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            self._body()
        current.wait_stream(self._side)

    def _capture(self) -> bool:
        """Capture `_body` (capture records, it does not run: the caller replays). False if it fell back."""
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)  # the gradients are allocated inside the graph's pool
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._body()
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 — an op that cannot be captured
            first = (str(exc).splitlines() or [""])[0][:300]
            if not self.fallback:
                raise RuntimeError(f"CUDA graph capture failed ({type(exc).__name__}: {first}); "
                                   f"train.engine: static or eager runs without capture") from exc
            self.optimizer.zero_grad(set_to_none=True)
            self.capture, self.name = False, "static"
            self.note = f"graph capture failed, ran uncaptured: {type(exc).__name__}: {first}"
            return False
        self.graph = graph
        self.capture_s = time.perf_counter() - t0
        return True

    # ---- seed snapshots ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def resume(self, state: dict, step: int) -> None:
        """Go on at `step` (before any step of this engine): the optimizer state, the device step counter."""
        if self._done or self.graph is not None:
            raise RuntimeError(f"the {self.name} engine resumes only before its first step")
        if not 0 <= step < len(self.schedule):
            raise ValueError(f"resume at step {step}: the schedule has steps 0..{len(self.schedule) - 1}")
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.lr.copy_(self.schedule[step])
        self.index.fill_(step)
        self._done = self._read = self._first = step

    # ---- metrics --------------------------------------------------------------------------------------
    def flush(self, step: int) -> tuple[list[float], float]:
        """Losses of steps since the last flush (one device-to-host read) and the last step's grad norm."""
        if step != self._done:
            raise RuntimeError(f"flush({step}) after {self._done} steps")
        if step == 0:
            return [], float("nan")
        values = torch.cat([self.loss_hist[self._read:step], self.grad_norm_hist[step - 1:step]]).tolist()
        self._read = step
        return values[:-1], values[-1]

    def history(self) -> tuple[list[float], list[float]]:
        """Per-step losses and grad norms of every step run so far (reads the device)."""
        return self.loss_hist[:self._done].tolist(), self.grad_norm_hist[:self._done].tolist()

    def metrics(self) -> dict:
        out = {"trial/engine": self.name, "train/cuda_graph": float(self.graph is not None)}
        if self.capture_s is not None:
            out[TIME_GRAPH_CAPTURE] = self.capture_s
        if self.note:
            out["trial/engine_note"] = self.note
        return out


__all__ = ["ENGINES", "EagerStep", "GRAPH_WARMUP_STEPS", "StaticStep", "resolve_engine"]
