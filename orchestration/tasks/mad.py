"""The six MAD-Lab synthetic tasks (Poli et al. 2024). Definitions: docs/tasks.md §A3.2 (restated, not copied).

Every MAD task has a FIXED training set of ``num_train_examples`` generated once (lazily, on the first
training batch) from ``seed``; ``train_batch`` samples examples from it uniformly with replacement using the
caller's Generator. MAD's test set (``num_test_examples``) is generated from ``eval_seed`` with the task's test
target rule: hqlt's validation set; hqlt's test set is as many examples from ``test_seed``, the same rule. Train and eval batches have the same T (``seq_len`` below; L = config seq_len).

| task | layout | T | supervised (train / test) |
|---|---|---|---|
| mad_in_context_recall | (key, value) pairs, last = probe of a shown key | L-1 | next token everywhere / values of repeated keys (+ probe) |
| mad_fuzzy_recall | key/value motifs of 1..3 tokens, left-padded with V-1 | L-1 | next non-pad token / value tokens of repeated keys (+ probe) |
| mad_noisy_recall | as in-context recall, pairs replaced by 2 noise tokens w.p. frac_noise | L-1 | as in-context recall |
| mad_selective_copying | k tokens among blanks, copy marker, k blanks | L | the k tokens in order on the final k blanks (not shifted) |
| mad_compression | causal restatement, see `MadCompression` | 2L-1 | the L-1 content tokens on the L-1 blank positions |
| mad_memorization | (key, insert) pairs with a fixed key->value map | L | value at each insert position |

Accuracy: per-example mean over supervised positions, then the mean over examples (micro), via
``per_example_accuracy`` / ``slice_metrics``. MAD itself reports torchmetrics' *macro* (per-class) accuracy; this
is a conscious replacement, so absolute numbers are comparable only roughly to MAD's. No slices, no chance level.
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from hqlt.blocks.validation import join, require

from .base import IGNORE, Batch, IntStream, Task, make_batch
from .registry import register_task


# ---- configs -----------------------------------------------------------------------------------------
@dataclass
class MADConfig:
    vocab_size: int = 16
    seq_len: int = 128
    num_train_examples: int = 12800
    num_test_examples: int = 1280
    seed: int = 12345  # training set (and memorization's key->value map)
    eval_seed: int = 54321  # MAD's test set, hqlt's validation set (early stopping, checkpoint selection)
    test_seed: int = 13579  # hqlt's test set: num_test_examples more, the same rule, from this seed

    def check(self, path: str) -> None:
        require(len({self.seed, self.eval_seed, self.test_seed}) == 3, join(path, "test_seed"),
                f"got seed {self.seed}, eval_seed {self.eval_seed}, test_seed {self.test_seed}; allowed: three "
                f"different seeds")
        require(self.num_train_examples >= 1, join(path, "num_train_examples"), f"got {self.num_train_examples}; must be >= 1")
        require(self.num_test_examples >= 1, join(path, "num_test_examples"), f"got {self.num_test_examples}; must be >= 1")
        require(self.vocab_size >= 3, join(path, "vocab_size"), f"got {self.vocab_size}; must be >= 3")

    def _even_len(self, path: str, minimum: int) -> None:
        require(self.seq_len >= minimum and self.seq_len % 2 == 0, join(path, "seq_len"),
                f"got {self.seq_len}; must be an even number >= {minimum}")


@dataclass
class InContextRecallConfig(MADConfig):
    vocab_size: int = 16
    seq_len: int = 128
    multi_query: bool = True  # test: every repeated key's value is supervised (else only the final probe)

    def check(self, path: str) -> None:
        super().check(path)
        require(self.vocab_size >= 4, join(path, "vocab_size"), f"got {self.vocab_size}; must be >= 4")
        self._even_len(path, 4)


@dataclass
class FuzzyRecallConfig(MADConfig):
    vocab_size: int = 16
    seq_len: int = 128
    k_motif_size: int = 3  # keys are 1..k_motif_size tokens (test: always k_motif_size)
    v_motif_size: int = 3  # values are 1..v_motif_size tokens
    multi_query: bool = True

    def check(self, path: str) -> None:
        super().check(path)
        require(self.vocab_size >= 4, join(path, "vocab_size"), f"got {self.vocab_size}; must be >= 4")
        require(self.k_motif_size >= 1, join(path, "k_motif_size"), f"got {self.k_motif_size}; must be >= 1")
        require(self.v_motif_size >= 1, join(path, "v_motif_size"), f"got {self.v_motif_size}; must be >= 1")
        need = 2 * (self.k_motif_size + self.v_motif_size)
        require(self.seq_len >= need, join(path, "seq_len"),
                f"got {self.seq_len}; must be >= 2*(k_motif_size+v_motif_size) = {need}")


@dataclass
class NoisyRecallConfig(MADConfig):
    vocab_size: int = 32  # kv vocab = vocab_size - noise_vocab_size
    seq_len: int = 128
    noise_vocab_size: int = 16
    frac_noise: float = 0.2
    multi_query: bool = True

    def check(self, path: str) -> None:
        super().check(path)
        self._even_len(path, 4)
        require(self.noise_vocab_size >= 1, join(path, "noise_vocab_size"), f"got {self.noise_vocab_size}; must be >= 1")
        require(self.vocab_size - self.noise_vocab_size >= 2, join(path, "vocab_size"),
                f"got {self.vocab_size}; must be >= noise_vocab_size + 2 = {self.noise_vocab_size + 2}")
        require(0.0 <= self.frac_noise < 1.0, join(path, "frac_noise"), f"got {self.frac_noise}; must be in [0, 1)")


@dataclass
class SelectiveCopyingConfig(MADConfig):
    vocab_size: int = 16
    seq_len: int = 256
    num_tokens_to_copy: int = 16

    def check(self, path: str) -> None:
        super().check(path)
        k = self.num_tokens_to_copy
        require(k >= 1, join(path, "num_tokens_to_copy"), f"got {k}; must be >= 1")
        require(self.seq_len >= 2 * k + 1, join(path, "seq_len"), f"got {self.seq_len}; must be >= 2*num_tokens_to_copy+1 = {2 * k + 1}")


@dataclass
class CompressionConfig(MADConfig):
    vocab_size: int = 16
    seq_len: int = 32

    def check(self, path: str) -> None:
        super().check(path)
        require(self.seq_len >= 2, join(path, "seq_len"), f"got {self.seq_len}; must be >= 2")


@dataclass
class MemorizationConfig(MADConfig):
    vocab_size: int = 256
    seq_len: int = 32
    num_train_examples: int = 256

    def check(self, path: str) -> None:
        super().check(path)
        self._even_len(path, 2)


# ---- shared machinery --------------------------------------------------------------------------------
class MADTask(Task):
    kind = "classify"
    chance = None

    def __init__(self, config: MADConfig, path: str = "task"):
        super().__init__(config, path)
        self.vocab_size = config.vocab_size
        self.seq_len = self.train_seq_len = self._T(config)
        self._train: Optional[Batch] = None
        self._train_np: Optional[tuple[np.ndarray, np.ndarray]] = None

    @staticmethod
    def _T(c) -> int:
        return c.seq_len - 1

    @abstractmethod
    def _generate(self, rng: np.random.Generator, n: int, train: bool) -> tuple[np.ndarray, np.ndarray]:
        """n examples -> (inputs [n, T], targets [n, T]) with the train or test target rule."""

    def _train_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._train_np is None:
            x, y = self._generate(np.random.default_rng(self.config.seed), self.config.num_train_examples, True)
            self._train_np = (np.ascontiguousarray(x, dtype=np.int64), np.ascontiguousarray(y, dtype=np.int64))
        return self._train_np

    def train_set(self) -> Batch:
        """The whole fixed training set (generated once from ``seed``)."""
        if self._train is None:
            self._train = make_batch(*self._train_arrays())
        return self._train

    def train_batch(self, batch_size: int, rng: np.random.Generator) -> Batch:
        x, y = self._train_arrays()
        idx = rng.integers(0, len(x), size=batch_size)
        return Batch(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]), {})  # numpy gather: faster than torch's on CPU

    def _build_eval_sets(self) -> list[Batch]:
        c = self.config
        return [make_batch(*self._generate(np.random.default_rng(c.eval_seed), c.num_test_examples, False))]

    def _build_test_sets(self) -> list[Batch]:
        c = self.config
        return [make_batch(*self._generate(np.random.default_rng(c.test_seed), c.num_test_examples, False))]


def recall_examples(rng: np.random.Generator, n: int, L: int, kv_vocab: int, vocab: int, frac_noise: float,
                    multi_query: bool, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """In-context / noisy recall. Keys [0, kv_vocab//2), values [kv_vocab//2, kv_vocab), noise [kv_vocab, vocab).

    L/2 pair slots; each sequence has its own key->value map (each key's value uniform); slot keys are uniform
    with replacement; with probability frac_noise a slot (not the last) is 2 noise tokens (at least one slot of
    the first L/2-1 stays a pair); the last slot is the probe: the key of a uniformly chosen earlier pair, and its
    value. Train targets: next token (inputs = seq[:-1], targets = seq[1:]). Test targets: the value of every pair
    whose key appeared in an earlier pair (multi_query) and the probe's value; -100 elsewhere.
    """
    nk = kv_vocab // 2
    P = L // 2
    rows = np.arange(n)
    keys = rng.integers(0, nk, size=(n, P))
    kvmap = rng.integers(nk, kv_vocab, size=(n, nk))
    noisy = rng.random((n, P)) < frac_noise if frac_noise > 0 else np.zeros((n, P), dtype=bool)
    noisy[:, -1] = False
    noisy[noisy[:, :-1].all(axis=1), 0] = False
    score = rng.random((n, P - 1))
    score[noisy[:, :-1]] = -1.0
    keys[:, -1] = keys[rows, score.argmax(axis=1)]
    vals = np.take_along_axis(kvmap, keys, axis=1)
    seq = np.empty((n, 2 * P), dtype=np.int64)
    seq[:, 0::2], seq[:, 1::2] = keys, vals
    if frac_noise > 0:
        noise = rng.integers(kv_vocab, vocab, size=(n, 2 * P))
        mask = np.repeat(noisy, 2, axis=1)
        seq[mask] = noise[mask]
    inputs = seq[:, :-1]
    if train:
        return inputs, seq[:, 1:].copy()
    slot = np.broadcast_to(np.arange(P), (n, P))
    first = np.full((n, nk), P, dtype=np.int64)
    np.minimum.at(first, (np.repeat(rows, P), keys.ravel()), np.where(noisy, P, slot).ravel())
    supervised = ~noisy & (slot > np.take_along_axis(first, keys, axis=1))
    if not multi_query:
        supervised[:] = False
    supervised[:, -1] = True
    targets = np.full((n, 2 * P - 1), IGNORE, dtype=np.int64)
    targets[:, 0::2] = np.where(supervised, vals, IGNORE)
    return inputs, targets


# ---- tasks -------------------------------------------------------------------------------------------
@register_task("mad_in_context_recall", InContextRecallConfig, "icr")
class MadInContextRecall(MADTask):
    """Multi-query in-context recall: keys [0, V/2), values [V/2, V); see `recall_examples`. T = L-1."""

    def _generate(self, rng, n, train):
        c = self.config
        return recall_examples(rng, n, c.seq_len, c.vocab_size, c.vocab_size, 0.0, c.multi_query, train)


@register_task("mad_noisy_recall", NoisyRecallConfig, "nzr")
class MadNoisyRecall(MADTask):
    """In-context recall with noise: kv vocab = V - noise_vocab_size, noise ids after it; each pair slot is
    replaced by 2 noise tokens with probability frac_noise. T = L-1."""

    def _generate(self, rng, n, train):
        c = self.config
        return recall_examples(rng, n, c.seq_len, c.vocab_size - c.noise_vocab_size, c.vocab_size, c.frac_noise,
                               c.multi_query, train)


@register_task("mad_fuzzy_recall", FuzzyRecallConfig, "fzr")
class MadFuzzyRecall(MADTask):
    """Fuzzy recall: pad id V-1, key tokens [0, (V-1)//2), value tokens [(V-1)//2, V-1).

    Per sequence a dictionary of (V-1)//2 distinct key motifs (train: 1..k_motif_size tokens, test: exactly
    k_motif_size) each mapped to a value motif of 1..v_motif_size tokens. Pairs drawn uniformly from the dictionary
    are emitted while they fit in L - (k_motif_size + v_motif_size) tokens; then a probe (the key of a uniformly
    chosen emitted pair, and its value); the sequence is left-padded with V-1 to length L; inputs = seq[:-1].
    Train targets: next token where it is not pad. Test targets: the value tokens of every pair whose key motif was
    emitted earlier (multi_query) and of the probe. T = L-1.
    """

    def _generate(self, rng, n, train):
        c = self.config
        L, V, km, vm = c.seq_len, c.vocab_size, c.k_motif_size, c.v_motif_size
        pad, nkv = V - 1, V - 1
        nk = nkv // 2
        S = IntStream(rng)
        inputs = np.full((n, L - 1), pad, dtype=np.int64)
        targets = np.full((n, L - 1), IGNORE, dtype=np.int64)
        budget = L - (km + vm)
        for e in range(n):
            motifs, seen = [], set()
            while len(motifs) < nk:
                size = 1 + S.below(km) if train else km
                m = tuple(S.below(nk) for _ in range(size))
                if m not in seen:
                    seen.add(m)
                    motifs.append(m)
            values = [tuple(nk + S.below(nkv - nk) for _ in range(1 + S.below(vm))) for _ in range(nk)]
            toks: list[int] = []
            sup: list[bool] = []
            shown: list[int] = []
            shown_set: set[int] = set()
            while True:
                i = S.below(nk)
                if len(toks) + len(motifs[i]) + len(values[i]) > budget:
                    break
                toks += motifs[i]
                toks += values[i]
                sup += [False] * len(motifs[i]) + [i in shown_set and c.multi_query] * len(values[i])
                shown.append(i)
                shown_set.add(i)
            p = shown[S.below(len(shown))]
            toks += motifs[p]
            toks += values[p]
            sup += [False] * len(motifs[p]) + [True] * len(values[p])
            seq = np.array([pad] * (L - len(toks)) + toks, dtype=np.int64)
            if train:
                nxt = seq[1:]
                targets[e] = np.where(nxt == pad, IGNORE, nxt)
            else:
                s = np.array([False] * (L - len(toks)) + sup)[1:]
                targets[e] = np.where(s, seq[1:], IGNORE)
            inputs[e] = seq[:-1]
        return inputs, targets


@register_task("mad_selective_copying", SelectiveCopyingConfig, "scp")
class MadSelectiveCopying(MADTask):
    """Content ids [0, V-2), blank V-2, copy marker V-1. k = num_tokens_to_copy content tokens (uniform, with
    replacement) at uniformly random distinct positions among the first L-k-1 (the rest blank), then the marker,
    then k blanks. Targets (not shifted): the k content tokens in order on the final k positions. T = L."""

    @staticmethod
    def _T(c) -> int:
        return c.seq_len

    def _generate(self, rng, n, train):
        c = self.config
        L, V, k = c.seq_len, c.vocab_size, c.num_tokens_to_copy
        R = L - k - 1
        rows = np.arange(n)[:, None]
        pos = np.sort(np.argpartition(rng.random((n, R)), k - 1, axis=1)[:, :k] if k < R else np.tile(np.arange(R), (n, 1)), axis=1)
        toks = rng.integers(0, V - 2, size=(n, k))
        inputs = np.full((n, L), V - 2, dtype=np.int64)
        inputs[rows, pos] = toks
        inputs[:, R] = V - 1
        targets = np.full((n, L), IGNORE, dtype=np.int64)
        targets[:, R + 1:] = toks
        return inputs, targets


@register_task("mad_compression", CompressionConfig, "cmp")
class MadCompression(MADTask):
    """Compression, restated for causal LMs (MAD's original uses an AutoEncoder backbone; hqlt models are causal).

    Content ids [0, V-2), blank V-2, compression token V-1. Inputs = x_1..x_{L-1} (uniform), COMP, then L-1 blanks
    (T = 2L-1); targets on the blank positions = x_1..x_{L-1} in order, -100 elsewhere (train and test alike).
    MAD's version has content [0, V-1) and no blank; here one id is the blank so the vocab stays V.
    Caveat: a model whose KV (softmax) window covers the whole sequence can simply copy the prefix rather than
    compress it into a state; only a model whose visible window is shorter than the distance from x_j to its blank
    (L positions) must carry the content through a compressed state. Compare window sizes with that in mind.
    """

    @staticmethod
    def _T(c) -> int:
        return 2 * c.seq_len - 1

    def _generate(self, rng, n, train):
        c = self.config
        L, V = c.seq_len, c.vocab_size
        x = rng.integers(0, V - 2, size=(n, L - 1))
        inputs = np.full((n, 2 * L - 1), V - 2, dtype=np.int64)
        inputs[:, :L - 1] = x
        inputs[:, L - 1] = V - 1
        targets = np.full((n, 2 * L - 1), IGNORE, dtype=np.int64)
        targets[:, L:] = x
        return inputs, targets


@register_task("mad_memorization", MemorizationConfig, "mem")
class MadMemorization(MADTask):
    """A fixed key->value map (from ``seed``; same for train and test) from keys [0, (V-1)//2) to values
    [(V-1)//2, V-1) (each value uniform). Sequence = L/2 x (key uniform, insert token V-1); target at each insert
    position = the value of the key before it (not shifted). T = L."""

    @staticmethod
    def _T(c) -> int:
        return c.seq_len

    def kv_map(self) -> np.ndarray:
        c = self.config
        nk = (c.vocab_size - 1) // 2
        return np.random.default_rng([c.seed, 0x6D656D]).integers(nk, c.vocab_size - 1, size=nk)

    def _generate(self, rng, n, train):
        c = self.config
        L, V = c.seq_len, c.vocab_size
        kv = self.kv_map()
        keys = rng.integers(0, len(kv), size=(n, L // 2))
        inputs = np.empty((n, L), dtype=np.int64)
        inputs[:, 0::2], inputs[:, 1::2] = keys, V - 1
        targets = np.full((n, L), IGNORE, dtype=np.int64)
        targets[:, 1::2] = kv[keys]
        return inputs, targets


__all__ = ["CompressionConfig", "FuzzyRecallConfig", "InContextRecallConfig", "MADConfig", "MADTask", "MadCompression",
           "MadFuzzyRecall", "MadInContextRecall", "MadMemorization", "MadNoisyRecall", "MadSelectiveCopying",
           "MemorizationConfig", "NoisyRecallConfig", "SelectiveCopyingConfig", "recall_examples"]
