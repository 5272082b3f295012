"""The task contract shared by every data generator, plus the metric helpers built on it.

A task turns a validated config dataclass into batches:

- ``train_batch(batch_size, rng)`` draws a fresh training batch from the caller's numpy Generator
  (the trainer owns the seed; the same Generator state gives the same batch);
- ``eval_batches(batch_size)`` returns the validation set, deterministic from ``config.eval_seed`` (or the
  task's documented seeds), generated once per task instance and cached; it alone drives early stopping and
  checkpoint selection;
- ``test_batches(batch_size)`` returns the test set: the validation set's distribution and size drawn from another
  seed (``config.test_seed``; byte LM: the file's last part), deterministic and cached; scored once, after
  training, on the selected weights (metrics named ``test/...``);
- ``slice_label(key, value)`` names the slice an example falls into (``("len", 57) -> "len_41-64"``).

Shapes: ``inputs`` and ``targets`` are int64 ``[B, T]``; ``targets == -100`` is not supervised. Every batch has
``T <= task.seq_len``; every training batch has ``T == task.train_seq_len`` (constant, so compiled models do
not recompile); evaluation batches have the T documented by each task (formal languages: ``seq_len``).
Tokens past an example's end are padding that a causal model never reads for a supervised position.

Metrics: ``per_example_accuracy(logits, targets)`` -> ``[B]`` (NaN where an example has no supervised
position) and ``slice_metrics(correct, slices, task)`` -> ``val/acc``, ``val/acc_scaled`` (when the task has a
chance level) and ``val/acc@<label>`` per slice. Call ``slice_metrics`` on the concatenation of all evaluation
batches (not per batch), so the slice means are over the whole validation set.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

IGNORE = -100


@dataclass
class Batch:
    inputs: torch.Tensor  # int64 [B, T]
    targets: torch.Tensor  # int64 [B, T], -100 = not supervised
    slices: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> int64 [B]

    @property
    def size(self) -> int:
        return int(self.inputs.shape[0])

    def narrow(self, start: int, stop: int) -> "Batch":
        """Examples start..stop-1 (views, no copy)."""
        return Batch(self.inputs[start:stop], self.targets[start:stop], {k: v[start:stop] for k, v in self.slices.items()})

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(self.inputs.to(device, non_blocking=non_blocking), self.targets.to(device, non_blocking=non_blocking),
                     {k: v.to(device, non_blocking=non_blocking) for k, v in self.slices.items()})


def make_batch(inputs: np.ndarray, targets: np.ndarray, slices: Optional[dict[str, np.ndarray]] = None) -> Batch:
    """Batch from numpy arrays (copied into contiguous int64 tensors)."""
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    return Batch(as_t(inputs), as_t(targets), {k: as_t(v) for k, v in (slices or {}).items()})


class IntStream:
    """Uniform integers drawn from a numpy Generator in chunks: fast scalar draws for per-example Python loops.

    Deterministic given the Generator's state (it consumes the Generator in blocks of `chunk` floats).
    """

    def __init__(self, rng: np.random.Generator, chunk: int = 1 << 14):
        self.rng = rng
        self.chunk = chunk
        self.buf: list[float] = []
        self.i = 0

    def below(self, k: int) -> int:
        """Uniform in {0, ..., k-1}."""
        if self.i >= len(self.buf):
            self.buf = self.rng.random(self.chunk).tolist()
            self.i = 0
        u = self.buf[self.i]
        self.i += 1
        return min(int(u * k), k - 1)


def concat_batches(batches: list[Batch], T: Optional[int] = None, pad_id: int = 0) -> Batch:
    """Stack batches along B, right-padding each to a common T (inputs with `pad_id`, targets with -100)."""
    T = T or max(b.inputs.shape[1] for b in batches)

    def pad(x, value):
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=value) if x.shape[1] < T else x

    keys = batches[0].slices.keys()
    return Batch(torch.cat([pad(b.inputs, pad_id) for b in batches]), torch.cat([pad(b.targets, IGNORE) for b in batches]),
                 {k: torch.cat([b.slices[k] for b in batches]) for k in keys})


class Task(ABC):
    """Base class of every task. Subclasses set the attributes below in ``__init__``."""

    name: str = ""  # registry name (set by @register_task)
    short_id: str = ""  # short id for run names (set by @register_task)
    config: Any  # the task's validated config dataclass
    vocab_size: int  # handed to the model
    seq_len: int  # largest T of any batch (train or eval); the model/probe length
    train_seq_len: int  # T of every training batch (<= seq_len)
    chance: Optional[float] = None  # 1/K for scaled accuracy, else None
    kind: str = "classify"  # "classify" (accuracy metrics) or "lm" (loss / bits per byte)

    def __init__(self, config: Any, path: str = "task"):
        self.config = config
        self.path = path
        self._eval_sets: Optional[list[Batch]] = None
        self._eval_cache: dict[int, list[Batch]] = {}
        self._test_sets: Optional[list[Batch]] = None
        self._test_cache: dict[int, list[Batch]] = {}

    # ---- to implement -------------------------------------------------------------------------------
    @abstractmethod
    def train_batch(self, batch_size: int, rng: np.random.Generator) -> Batch:
        """A fresh training batch of `batch_size` examples, T = self.train_seq_len."""

    def stream_state(self, rng: np.random.Generator) -> dict:
        """What, beyond `rng`'s own state, the next `train_batch(., rng)` depends on (a seed snapshot saves it after
        each batch: keep it cheap, and replace arrays rather than change them in place). Most tasks draw each batch
        from `rng` alone: {}."""
        return {}

    def restore_stream_state(self, rng: np.random.Generator, state: dict) -> None:
        """Make `rng` (already holding its saved state) go on as the stream `state` was saved from."""

    @abstractmethod
    def _build_eval_sets(self) -> list[Batch]:
        """The whole validation set as one or more groups (batches never mix groups). Deterministic."""

    @abstractmethod
    def _build_test_sets(self) -> list[Batch]:
        """The whole test set, grouped like the validation set, from the test seed (never the validation one)."""

    # ---- shared ---------------------------------------------------------------------------------------
    def eval_sets(self) -> list[Batch]:
        if self._eval_sets is None:
            self._eval_sets = self._build_eval_sets()
        return self._eval_sets

    def eval_batches(self, batch_size: int) -> list[Batch]:
        """The validation set cut into batches of at most `batch_size` (cached; do not modify in place)."""
        return _cut(self.eval_sets(), batch_size, self._eval_cache)

    def test_sets(self) -> list[Batch]:
        if self._test_sets is None:
            self._test_sets = self._build_test_sets()
        return self._test_sets

    def test_batches(self, batch_size: int) -> list[Batch]:
        """The test set cut into batches of at most `batch_size` (cached; do not modify in place)."""
        return _cut(self.test_sets(), batch_size, self._test_cache)

    def eval_size(self) -> int:
        return sum(g.size for g in self.eval_sets())

    def slice_label(self, key: str, value: int) -> str:
        return f"{key}_{int(value)}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, seq_len={self.seq_len}, config={self.config})"


def _cut(groups: list[Batch], batch_size: int, cache: dict[int, list[Batch]]) -> list[Batch]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size not in cache:
        out = []
        for group in groups:
            out.extend(group.narrow(i, min(i + batch_size, group.size)) for i in range(0, group.size, batch_size))
        cache[batch_size] = out
    return cache[batch_size]


# ---- metrics -----------------------------------------------------------------------------------------
def per_example_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per example: mean over supervised positions (targets != -100) of argmax(logits) == target.

    logits [B, T, V], targets [B, T] -> float32 [B]; NaN for an example with no supervised position.
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on [B, T]")
    with torch.no_grad():
        mask = targets != IGNORE
        hit = (logits.argmax(dim=-1) == targets) & mask
        n = mask.sum(dim=1).to(torch.float32)
        acc = hit.sum(dim=1).to(torch.float32) / n
        return torch.where(n > 0, acc, torch.full_like(acc, float("nan")))


def _sort_key(label: str):
    parts = []
    for chunk in label.replace("-", "_").split("_"):
        parts.append((0, int(chunk), "") if chunk.isdigit() else (1, 0, chunk))
    return parts


def slice_metrics(correct: torch.Tensor, slices: dict[str, torch.Tensor], task: Optional[Task]) -> dict[str, float]:
    """Aggregate per-example accuracies into the shared metric names.

    correct: float [B] in [0, 1] (NaN = example without supervised positions, ignored);
    slices: key -> int [B]; values with the same ``task.slice_label`` are pooled (e.g. lengths 41..64).
    Returns ``val/acc``; ``val/acc_scaled`` = (acc - chance) / (1 - chance) when ``task.chance`` is set;
    ``val/acc@<label>`` per slice (mean over that slice's examples), labels in numeric order.
    """
    c = torch.as_tensor(correct).detach().to("cpu", torch.float64).flatten()
    ok = ~torch.isnan(c)
    n_ok = int(ok.sum())
    acc = float(c[ok].sum() / n_ok) if n_ok else float("nan")
    out: dict[str, float] = {"val/acc": acc}
    chance = getattr(task, "chance", None)
    if chance:
        out["val/acc_scaled"] = (acc - chance) / (1.0 - chance)
    for key, values in slices.items():
        v = torch.as_tensor(values).detach().cpu().flatten()
        if v.numel() != c.numel():
            raise ValueError(f"slice '{key}' has {v.numel()} values for {c.numel()} examples")
        groups: dict[str, list[float]] = {}
        for value in torch.unique(v[ok]).tolist():
            m = (v == value) & ok
            label = task.slice_label(key, int(value)) if task is not None else f"{key}_{int(value)}"
            g = groups.setdefault(label, [0.0, 0])
            g[0] += float(c[m].sum())
            g[1] += int(m.sum())
        for label in sorted(groups, key=_sort_key):
            s, n = groups[label]
            out[f"val/acc@{label}"] = s / n
    return out


def scaled_accuracy(acc: float, chance: float) -> float:
    return (acc - chance) / (1.0 - chance) if chance else acc


__all__ = ["Batch", "IGNORE", "IntStream", "Task", "concat_batches", "make_batch", "per_example_accuracy", "scaled_accuracy",
           "slice_metrics"]
