"""Multi-Query Associative Recall (Zoology; Arora et al. 2023). Definition: tasks-reference.md A2.1.

One example of input length L with D key-value pairs (vocab V):

- keys are ids 1..V/2-1, values ids V/2..V-1 (id 0 is filler); D distinct keys and D distinct values are drawn
  per example and laid out as the context ``k1 v1 k2 v2 ... kD vD`` (2D tokens);
- the query region is the next L-2D positions seen as S = (L-2D)/2 two-token slots; D distinct slots g_j are drawn
  with P(g = i) proportional to (i+1)^(a-1) (power law, a = ``power_a``; successive sampling without replacement,
  done with the Gumbel-top-k trick) and key k_j is placed at region offset 2*g_j;
- targets are -100 everywhere except at each query key's position, where the target is that key's value (the
  next-token label of Zoology's shifted layout; the value itself is not in the inputs);
- every other query-region position is 0, or, with ``random_non_queries``, a token uniform over the whole vocab
  (it may collide with a key; it is never supervised).

Settings: ``train`` / ``eval`` are lists of ``{seq_len, num_kv_pairs, weight}``; when omitted or empty they default
to the single setting (``seq_len``, ``num_kv_pairs``); eval defaults to the train list. A training batch mixes settings,
each example drawn with probability proportional to ``weight`` (Zoology mixes by example counts), padded to
``train_seq_len`` = the longest training L (inputs 0, targets -100). Evaluation has ``eval_size`` examples per eval
setting (setting i generated from seed (eval_seed, i)); its batches never mix settings and have T = that L.
Slices: "kv" (``kv_16``) always, "len" (``len_256``) when the eval settings have several lengths.
Metric: per-example accuracy over its D queries, then the mean (Zoology's).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hqlt.blocks.configs import join, require

from .base import IGNORE, Batch, Task, make_batch
from .registry import register_task


@dataclass
class MQARSetting:
    seq_len: int = 256
    num_kv_pairs: int = 16
    weight: float = 1.0  # training mixture weight (ignored for eval)

    def check(self, path: str) -> None:
        require(self.num_kv_pairs >= 1, join(path, "num_kv_pairs"), f"got {self.num_kv_pairs}; must be >= 1")
        require(self.seq_len >= 4 and self.seq_len % 2 == 0, join(path, "seq_len"),
                f"got {self.seq_len}; must be an even number >= 4")
        require(4 * self.num_kv_pairs <= self.seq_len, join(path, "num_kv_pairs"),
                f"got {self.num_kv_pairs}; 4*num_kv_pairs (={4 * self.num_kv_pairs}) must be <= seq_len (={self.seq_len})")
        require(self.weight > 0, join(path, "weight"), f"got {self.weight}; must be > 0")


@dataclass
class MQARConfig:
    vocab_size: int = 8192
    seq_len: int = 256
    num_kv_pairs: int = 16
    # (not Optional: hqlt.blocks.configs reports errors inside Optional[list[...]] only as "expected a list or null")
    train: list[MQARSetting] = field(default_factory=list)  # []: [{seq_len, num_kv_pairs}]
    eval: list[MQARSetting] = field(default_factory=list)  # []: the train settings
    eval_size: int = 1000  # examples per eval setting
    eval_seed: int = 1234
    power_a: float = 0.01
    random_non_queries: bool = True

    def train_settings(self) -> list[MQARSetting]:
        return list(self.train) if self.train else [MQARSetting(self.seq_len, self.num_kv_pairs)]

    def eval_settings(self) -> list[MQARSetting]:
        return list(self.eval) if self.eval else self.train_settings()

    def check(self, path: str) -> None:
        require(self.vocab_size >= 4 and self.vocab_size % 2 == 0, join(path, "vocab_size"),
                f"got {self.vocab_size}; must be an even number >= 4")
        require(self.power_a > 0, join(path, "power_a"), f"got {self.power_a}; must be > 0")
        require(self.eval_size >= 1, join(path, "eval_size"), f"got {self.eval_size}; must be >= 1")
        if self.train:
            train = [(s, f"{join(path, 'train')}[{i}]") for i, s in enumerate(self.train)]
        else:  # the top-level seq_len / num_kv_pairs: errors name task.seq_len / task.num_kv_pairs
            train = [(MQARSetting(self.seq_len, self.num_kv_pairs), path)]
        evals = [(s, f"{join(path, 'eval')}[{i}]") for i, s in enumerate(self.eval)] if self.eval else []
        n_keys = self.vocab_size // 2 - 1
        for s, sp in train + evals:
            s.check(sp)
            require(self.vocab_size > s.seq_len, join(path, "vocab_size"),
                    f"got {self.vocab_size}; must be > every seq_len (got {s.seq_len} at {join(sp, 'seq_len')})")
            require(s.num_kv_pairs <= n_keys, join(sp, "num_kv_pairs"),
                    f"got {s.num_kv_pairs}; must be <= vocab_size/2-1 = {n_keys} (distinct keys)")


def mqar_examples(rng: np.random.Generator, n: int, V: int, L: int, D: int, power_a: float = 0.01,
                  random_non_queries: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """n MQAR examples -> (inputs [n, L], targets [n, L]) int64."""
    half = V // 2
    keys = _distinct(rng, n, D, 1, half)  # ids 1..V/2-1
    values = _distinct(rng, n, D, half, V)  # ids V/2..V-1
    S = (L - 2 * D) // 2
    # power-law slot choice without replacement: Gumbel-top-k over log p_i = (a-1) log(i+1)
    logp = (power_a - 1.0) * np.log(np.arange(1, S + 1, dtype=np.float64))
    score = logp[None, :] + rng.gumbel(size=(n, S))
    slots = np.argpartition(-score, D - 1, axis=1)[:, :D] if D < S else np.tile(np.arange(S), (n, 1))
    rows = np.arange(n)[:, None]
    inputs = np.zeros((n, L), dtype=np.int64)
    inputs[:, 0:2 * D:2] = keys
    inputs[:, 1:2 * D:2] = values
    qpos = 2 * D + 2 * slots
    inputs[rows, qpos] = keys
    targets = np.full((n, L), IGNORE, dtype=np.int64)
    targets[rows, qpos] = values
    if random_non_queries:
        noise = rng.integers(0, V, size=(n, L))
        filler = inputs == 0
        inputs[filler] = noise[filler]
    return inputs, targets


def _distinct(rng: np.random.Generator, n: int, k: int, lo: int, hi: int) -> np.ndarray:
    """[n, k] rows of k distinct integers uniform in [lo, hi) (uniform over ordered k-tuples of distinct values).

    Draw with replacement, then redraw every repeated entry (all but one per value) until none is left; the
    procedure commutes with any permutation of the value range, hence is uniform over distinct tuples.
    """
    out = rng.integers(lo, hi, size=(n, k))
    if k <= 1:
        return out
    while True:
        order = np.argsort(out, axis=1, kind="stable")
        s = np.take_along_axis(out, order, axis=1)
        dup_sorted = np.zeros_like(s, dtype=bool)
        dup_sorted[:, 1:] = s[:, 1:] == s[:, :-1]
        if not dup_sorted.any():
            return out
        dup = np.zeros_like(dup_sorted)
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        out[dup] = rng.integers(lo, hi, size=int(dup.sum()))


@register_task("mqar", MQARConfig, "mqar")
class MQAR(Task):
    kind = "classify"
    chance = None

    def __init__(self, config: MQARConfig, path: str = "task"):
        super().__init__(config, path)
        self.vocab_size = config.vocab_size
        self.train_settings = config.train_settings()
        self.eval_settings = config.eval_settings()
        self.train_seq_len = max(s.seq_len for s in self.train_settings)
        self.seq_len = max(self.train_seq_len, max(s.seq_len for s in self.eval_settings))
        w = np.array([s.weight for s in self.train_settings], dtype=np.float64)
        self.train_p = w / w.sum()
        self.slice_len = len({s.seq_len for s in self.eval_settings}) > 1

    def _examples(self, rng, n, s: MQARSetting, T: int) -> tuple[np.ndarray, np.ndarray, dict]:
        c = self.config
        x, y = mqar_examples(rng, n, c.vocab_size, s.seq_len, s.num_kv_pairs, c.power_a, c.random_non_queries)
        if T > s.seq_len:
            x = np.pad(x, ((0, 0), (0, T - s.seq_len)))
            y = np.pad(y, ((0, 0), (0, T - s.seq_len)), constant_values=IGNORE)
        slices = {"kv": np.full(n, s.num_kv_pairs)}
        if self.slice_len:
            slices["len"] = np.full(n, s.seq_len)
        return x, y, slices

    def train_batch(self, batch_size: int, rng: np.random.Generator) -> Batch:
        T = self.train_seq_len
        if len(self.train_settings) == 1:
            return make_batch(*self._examples(rng, batch_size, self.train_settings[0], T))
        which = rng.choice(len(self.train_settings), size=batch_size, p=self.train_p)
        inputs = np.zeros((batch_size, T), dtype=np.int64)
        targets = np.full((batch_size, T), IGNORE, dtype=np.int64)
        slices = {"kv": np.zeros(batch_size, dtype=np.int64)}
        if self.slice_len:
            slices["len"] = np.zeros(batch_size, dtype=np.int64)
        for i, s in enumerate(self.train_settings):
            idx = np.flatnonzero(which == i)
            if len(idx):
                x, y, sl = self._examples(rng, len(idx), s, T)
                inputs[idx], targets[idx] = x, y
                for k in slices:
                    slices[k][idx] = sl[k]
        return make_batch(inputs, targets, slices)

    def _build_eval_sets(self) -> list[Batch]:
        c = self.config
        out = []
        for i, s in enumerate(self.eval_settings):
            rng = np.random.default_rng([c.eval_seed, i])
            out.append(make_batch(*self._examples(rng, c.eval_size, s, s.seq_len)))
        return out

    def slice_label(self, key: str, value: int) -> str:
        return f"{key}_{int(value)}"


__all__ = ["MQAR", "MQARConfig", "MQARSetting", "mqar_examples"]
