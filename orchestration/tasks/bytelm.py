"""Byte-level language modelling on a local text file (tasks-reference.md B). Nothing is downloaded.

The file (config ``path``, required) is read as raw bytes (vocab 256; memory-mapped, so large files are fine).
The last ``val_fraction`` of it is the validation part, the rest the training part:

    n_val = floor(n * val_fraction), n_train = n - n_val   (validation = bytes [n_train, n))

- training: windows of ``seq_len + 1`` bytes at uniformly random offsets of the training part;
  inputs = window[:-1], targets = window[1:] (T = seq_len, every position supervised);
- evaluation: consecutive non-overlapping windows of the validation part (window k has inputs
  val[k*T : (k+1)*T] and targets shifted by one), at most ``eval_batches_max`` batches; T = seq_len.

kind = "lm": the trainer reports ``val/loss`` (mean nats per byte) and ``val/bpb`` = val/loss / ln 2
(bits per byte), see `lm_metrics`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from hqlt.blocks.configs import ConfigError, join, require

from .base import Batch, Task
from .registry import register_task


@dataclass
class ByteLMConfig:
    path: Optional[str] = None  # required: a local text file
    seq_len: int = 256
    val_fraction: float = 0.05
    eval_batches_max: int = 64

    def check(self, path: str) -> None:
        require(isinstance(self.path, str) and self.path != "", join(path, "path"),
                "required: the path of a local text file (read byte-level)")
        require(self.seq_len >= 1, join(path, "seq_len"), f"got {self.seq_len}; must be >= 1")
        require(0.0 < self.val_fraction < 1.0, join(path, "val_fraction"), f"got {self.val_fraction}; must be in (0, 1)")
        require(self.eval_batches_max >= 1, join(path, "eval_batches_max"), f"got {self.eval_batches_max}; must be >= 1")


def lm_metrics(mean_loss_nats: float, n_tokens: int) -> dict[str, float]:
    """{"val/loss": mean cross-entropy in nats per byte, "val/bpb": bits per byte = loss / ln 2}.

    NaN for both when no token was evaluated (n_tokens == 0)."""
    if n_tokens <= 0:
        return {"val/loss": float("nan"), "val/bpb": float("nan")}
    return {"val/loss": float(mean_loss_nats), "val/bpb": float(mean_loss_nats) / math.log(2.0)}


def split_sizes(n_bytes: int, val_fraction: float) -> tuple[int, int]:
    """(n_train, n_val) for a file of n_bytes."""
    n_val = int(math.floor(n_bytes * val_fraction))
    return n_bytes - n_val, n_val


@register_task("byte_lm", ByteLMConfig, "byte")
class ByteLM(Task):
    kind = "lm"
    chance = None
    vocab_size = 256

    def __init__(self, config: ByteLMConfig, path: str = "task"):
        super().__init__(config, path)
        p = join(path, "path")
        file = os.path.expanduser(config.path)
        if not os.path.isfile(file):
            raise ConfigError(p, f"{config.path!r} is not a readable file (no such file)")
        try:
            size = os.path.getsize(file)
            with open(file, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            raise ConfigError(p, f"{config.path!r} is not readable: {exc}") from None
        T = config.seq_len
        n_train, n_val = split_sizes(size, config.val_fraction)
        if n_train < T + 1 or n_val < T + 1:
            raise ConfigError(join(path, "seq_len"),
                              f"got {T}; {config.path!r} has {size} bytes -> train {n_train} / validation {n_val} bytes, "
                              f"each needs >= seq_len+1 = {T + 1} (lower seq_len or adjust val_fraction)")
        self.file = file
        self.data = np.memmap(file, dtype=np.uint8, mode="r")
        self.n_train, self.n_val = n_train, n_val
        self.seq_len = self.train_seq_len = T

    def _windows(self, starts: np.ndarray) -> Batch:
        T = self.seq_len
        idx = starts[:, None] + np.arange(T + 1)[None, :]
        w = torch.from_numpy(np.asarray(self.data[idx], dtype=np.int64))
        return Batch(w[:, :-1].contiguous(), w[:, 1:].contiguous(), {})

    def train_batch(self, batch_size: int, rng: np.random.Generator) -> Batch:
        starts = rng.integers(0, self.n_train - self.seq_len, size=batch_size)  # window ends <= n_train
        return self._windows(starts)

    def num_eval_windows(self) -> int:
        return (self.n_val - 1) // self.seq_len

    def _build_eval_sets(self) -> list[Batch]:  # uncapped (eval_batches applies the cap per batch size)
        return [self._windows(self.n_train + self.seq_len * np.arange(self.num_eval_windows()))]

    def eval_batches(self, batch_size: int) -> list[Batch]:
        """Consecutive non-overlapping validation windows, at most ``eval_batches_max`` batches (cached)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size not in self._eval_cache:
            n = min(self.num_eval_windows(), batch_size * self.config.eval_batches_max)
            starts = self.n_train + self.seq_len * np.arange(n)
            self._eval_cache[batch_size] = [self._windows(starts[i:i + batch_size]) for i in range(0, n, batch_size)]
        return self._eval_cache[batch_size]


__all__ = ["ByteLM", "ByteLMConfig", "lm_metrics", "split_sizes"]
