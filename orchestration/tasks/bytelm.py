"""Byte-level language modelling on a local text file (docs/tasks.md §B). Nothing is downloaded.

The file (config ``path``, required; ``hqlt:tiny_corpus.txt`` is a 26 KB sample shipped with hqlt) is read as
raw bytes (vocab 256; memory-mapped, so large files are fine).
The last ``val_fraction`` of it is the validation part, the ``test_fraction`` before it the test part, the rest
the training part (the validation part is where it was before there was a test part):

    n_val = floor(n * val_fraction), n_test = floor(n * test_fraction), n_train = n - n_test - n_val
    (training = bytes [0, n_train), test = [n_train, n_train + n_test), validation = [n - n_val, n))

- training: windows of ``seq_len + 1`` bytes at uniformly random offsets of the training part;
  inputs = window[:-1], targets = window[1:] (T = seq_len, every position supervised);
- evaluation: consecutive non-overlapping windows of the validation part (window k has inputs
  val[k*T : (k+1)*T] and targets shifted by one), at most ``eval_batches_max`` batches; T = seq_len. The test set:
  the same windows of the test part.

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

from hqlt.blocks.validation import ConfigError, join, require

from .base import Batch, Task
from .registry import register_task


@dataclass
class ByteLMConfig:
    path: Optional[str] = None  # required: a local text file
    seq_len: int = 256
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    eval_batches_max: int = 64

    def check(self, path: str) -> None:
        require(isinstance(self.path, str) and self.path != "", join(path, "path"),
                "required: the path of a local text file (read byte-level)")
        require(self.seq_len >= 1, join(path, "seq_len"), f"got {self.seq_len}; must be >= 1")
        require(0.0 < self.val_fraction < 1.0, join(path, "val_fraction"), f"got {self.val_fraction}; must be in (0, 1)")
        require(0.0 < self.test_fraction < 1.0 - self.val_fraction, join(path, "test_fraction"),
                f"got {self.test_fraction}; must be in (0, 1 - val_fraction)")
        require(self.eval_batches_max >= 1, join(path, "eval_batches_max"), f"got {self.eval_batches_max}; must be >= 1")


SHIPPED_PREFIX = "hqlt:"  # `path: hqlt:tiny_corpus.txt` = a corpus shipped with hqlt (orchestration/tasks/data/)


def corpus_path(path: str) -> str:
    """The file of a `path`: `hqlt:<name>` names a corpus shipped in the package (a few KB of public-domain text
    for smoke tests: `hqlt:tiny_corpus.txt`), anything else a local file (`~` expanded)."""
    if path.startswith(SHIPPED_PREFIX):
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", path[len(SHIPPED_PREFIX):])
    return os.path.expanduser(path)


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
        file = corpus_path(config.path)
        if not os.path.isfile(file):
            raise ConfigError(p, f"{config.path!r} is not a readable file (no such file)")
        try:
            size = os.path.getsize(file)
            with open(file, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            raise ConfigError(p, f"{config.path!r} is not readable: {exc}") from None
        T = config.seq_len
        n_rest, n_val = split_sizes(size, config.val_fraction)
        n_test = int(math.floor(size * config.test_fraction))
        n_train = n_rest - n_test
        if min(n_train, n_test, n_val) < T + 1:
            raise ConfigError(join(path, "seq_len"),
                              f"got {T}; {config.path!r} has {size} bytes -> train {n_train} / test {n_test} / validation "
                              f"{n_val} bytes, each needs >= seq_len+1 = {T + 1} (lower seq_len or adjust "
                              f"val_fraction / test_fraction)")
        self.file = file
        self.data = np.memmap(file, dtype=np.uint8, mode="r")
        self.n_train, self.n_test, self.n_val = n_train, n_test, n_val
        self.val_start = n_rest
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

    def num_test_windows(self) -> int:
        return (self.n_test - 1) // self.seq_len

    def _build_eval_sets(self) -> list[Batch]:  # uncapped (eval_batches applies the cap per batch size)
        return [self._windows(self.val_start + self.seq_len * np.arange(self.num_eval_windows()))]

    def _build_test_sets(self) -> list[Batch]:  # uncapped (test_batches applies the cap per batch size)
        return [self._windows(self.n_train + self.seq_len * np.arange(self.num_test_windows()))]

    def _capped(self, start: int, windows: int, batch_size: int, cache: dict) -> list[Batch]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size not in cache:
            n = min(windows, batch_size * self.config.eval_batches_max)
            starts = start + self.seq_len * np.arange(n)
            cache[batch_size] = [self._windows(starts[i:i + batch_size]) for i in range(0, n, batch_size)]
        return cache[batch_size]

    def eval_batches(self, batch_size: int) -> list[Batch]:
        """Consecutive non-overlapping validation windows, at most ``eval_batches_max`` batches (cached)."""
        return self._capped(self.val_start, self.num_eval_windows(), batch_size, self._eval_cache)

    def test_batches(self, batch_size: int) -> list[Batch]:
        """Consecutive non-overlapping windows of the test part, at most ``eval_batches_max`` batches (cached)."""
        return self._capped(self.n_train, self.num_test_windows(), batch_size, self._test_cache)


__all__ = ["ByteLM", "ByteLMConfig", "lm_metrics", "split_sizes"]
