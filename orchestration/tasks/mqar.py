"""Multi-Query Associative Recall (Zoology; Arora et al. 2023). Definition: docs/tasks.md §A2.1.

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
setting (setting i generated from seed (eval_seed, i)); its batches never mix settings and have T = that L. The test
set is the same from seeds (test_seed, i).
Slices: "kv" (``kv_16``) always, "len" (``len_256``) when the eval settings have several lengths.
Metric: per-example accuracy over its D queries, then the mean (Zoology's).

Training data: fresh examples every step by default. With ``num_train_examples`` = N there is instead one FIXED
training set of N examples (Zoology trains on such a set for a number of epochs): setting i contributes its share
floor(N * p_i) (the remainder to the first settings), generated from seed (``train_seed``, i). Training batches walk
through it in epochs, each epoch a fresh permutation drawn from the trainer's Generator; a batch may run across an
epoch boundary (the batch shape stays constant), so ``train.steps = epochs * N / batch_size`` trains that many epochs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from hqlt.blocks.validation import join, require

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
    # (not Optional: hqlt.blocks.validation reports errors inside Optional[list[...]] only as "expected a list or null")
    train: list[MQARSetting] = field(default_factory=list)  # []: [{seq_len, num_kv_pairs}]
    eval: list[MQARSetting] = field(default_factory=list)  # []: the train settings
    eval_size: int = 1000  # examples per eval setting
    eval_seed: int = 1234
    test_seed: int = 4321  # the test set: eval_size examples per eval setting, setting i from (test_seed, i)
    power_a: float = 0.01
    random_non_queries: bool = True
    num_train_examples: Optional[int] = None  # null: fresh examples every step; N: a fixed training set, in epochs
    train_seed: int = 2468  # the fixed training set: setting i from (train_seed, i)

    def train_settings(self) -> list[MQARSetting]:
        return list(self.train) if self.train else [MQARSetting(self.seq_len, self.num_kv_pairs)]

    def eval_settings(self) -> list[MQARSetting]:
        return list(self.eval) if self.eval else self.train_settings()

    def check(self, path: str) -> None:
        require(self.vocab_size >= 4 and self.vocab_size % 2 == 0, join(path, "vocab_size"),
                f"got {self.vocab_size}; must be an even number >= 4")
        require(self.power_a > 0, join(path, "power_a"), f"got {self.power_a}; must be > 0")
        require(self.eval_size >= 1, join(path, "eval_size"), f"got {self.eval_size}; must be >= 1")
        require(self.test_seed != self.eval_seed, join(path, "test_seed"),
                f"got {self.test_seed}, the eval_seed too; allowed: another seed than eval_seed")
        if self.num_train_examples is not None:
            require(self.num_train_examples >= len(self.train_settings()), join(path, "num_train_examples"),
                    f"got {self.num_train_examples}; allowed: at least one example per training setting, or null")
            require(self.train_seed not in (self.eval_seed, self.test_seed), join(path, "train_seed"),
                    f"got {self.train_seed}; allowed: a seed other than eval_seed and test_seed")
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
        self._train_set: Optional[tuple] = None  # the fixed training set (num_train_examples), built lazily
        self._epochs: dict = {}  # id(Generator) -> [Generator, order of the current epoch, next position]

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
        if self.config.num_train_examples is not None:
            return self._fixed_batch(batch_size, rng)
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

    def train_set_arrays(self) -> tuple[np.ndarray, np.ndarray, dict]:
        """The fixed training set (inputs, targets, slices), compact integers; only with num_train_examples."""
        if self._train_set is None:
            c = self.config
            N, T = c.num_train_examples, self.train_seq_len
            counts = np.floor(N * self.train_p).astype(np.int64)
            counts[:N - int(counts.sum())] += 1
            dtype = np.int16 if c.vocab_size <= np.iinfo(np.int16).max else np.int32
            parts = [self._examples(np.random.default_rng([c.train_seed, i]), int(n), s, T)
                     for i, (s, n) in enumerate(zip(self.train_settings, counts)) if n > 0]
            x = np.concatenate([p[0] for p in parts]).astype(dtype)
            y = np.concatenate([p[1] for p in parts]).astype(dtype)
            slices = {k: np.concatenate([p[2][k] for p in parts]).astype(np.int32) for k in parts[0][2]}
            self._train_set = (x, y, slices)
        return self._train_set

    def _fixed_batch(self, batch_size: int, rng: np.random.Generator) -> Batch:
        """The next `batch_size` examples of the fixed set in this Generator's epoch order (a new permutation from
        `rng` whenever an epoch is used up). The position is kept per Generator, so one stream's order never
        depends on another's."""
        x, y, slices = self.train_set_arrays()
        state = self._epochs.get(id(rng))
        if state is None or state[0] is not rng:
            if len(self._epochs) >= 8:  # a trial uses one stream; keep the table small
                self._epochs.pop(next(iter(self._epochs)))
            state = self._epochs[id(rng)] = [rng, np.empty(0, dtype=np.int64), 0]
        parts, need = [], batch_size
        while need:
            if state[2] == len(state[1]):
                state[1], state[2] = rng.permutation(len(x)), 0
            take = min(need, len(state[1]) - state[2])
            parts.append(state[1][state[2]:state[2] + take])
            state[2] += take
            need -= take
        idx = np.concatenate(parts)
        return make_batch(x[idx], y[idx], {k: v[idx] for k, v in slices.items()})

    def stream_state(self, rng: np.random.Generator) -> dict:
        state = self._epochs.get(id(rng))
        if self.config.num_train_examples is None or state is None or state[0] is not rng:
            return {}
        return {"order": state[1], "next": state[2]}  # `order` is replaced at each epoch, never changed in place

    def restore_stream_state(self, rng: np.random.Generator, state: dict) -> None:
        if state:
            self._epochs[id(rng)] = [rng, np.asarray(state["order"], dtype=np.int64), int(state["next"])]

    def _build_eval_sets(self, seed: Optional[int] = None) -> list[Batch]:
        c = self.config
        out = []
        for i, s in enumerate(self.eval_settings):
            rng = np.random.default_rng([c.eval_seed if seed is None else seed, i])
            out.append(make_batch(*self._examples(rng, c.eval_size, s, s.seq_len)))
        return out

    def _build_test_sets(self) -> list[Batch]:
        return self._build_eval_sets(self.config.test_seed)

    def slice_label(self, key: str, value: int) -> str:
        return f"{key}_{int(value)}"


__all__ = ["MQAR", "MQARConfig", "MQARSetting", "mqar_examples"]
