"""Formal-language / state-tracking tasks (Deletang et al. 2023, token version of xLSTM / Grazzi et al. / HQLT).

Definitions: docs/tasks.md §A1.1-A1.2 (restated there in words; this is an independent implementation).

Sequence format. An example is a token string s of "reference length" L whose answer token sits at index a
(a = L-1, except the bracket task whose reference layout is ``expr '=' answer PAD`` so a = L-2). The model
reads tokens 0..a-1 causally and must emit the answer at position a-1 (the last operand, or '='):

    inputs[b]  = s[0..a-1], then the pad id (the answer slot and everything after it are pad)
    targets[b] = -100 everywhere except targets[b, a-1] = s[a]       (exactly one supervised token)
    slices     = {"len": L}

Pad id is 0 (the reference's pad) for every task except ``mod_arith_brackets``, whose id 0 is the digit 0:
there the task's own PAD id (V-1) is used. Padding is never read by a causal model at the supervised position.

Lengths. Training L ~ Uniform{train_min_len..train_max_len}, evaluation L ~ Uniform{eval_min_len..eval_max_len}
(``eval_size`` examples from ``eval_seed``; the test set: as many from ``test_seed``), except: ``mod_arith`` uses odd L only (L = 2k-1, uniform over the odd
lengths in the range; the reference's test range 40..256 thus gives 41..255, the reference also includes 39);
``mod_arith_brackets`` forces L >= 5 (as the reference does).

Batch shapes (T): training batches are padded to ``train_seq_len = train_max_len - 1`` (the longest training
input; constant so compiled models don't recompile, ~6x cheaper than padding to 255); evaluation batches are
padded to ``seq_len = max(train_max_len, eval_max_len) - 1`` (255 at the defaults).

Slices: "len" -> ``len_<train_min>-<train_max>`` for in-distribution lengths, then power-of-two buckets beyond
the training range clipped to ``eval_max_len``: with the defaults ``len_3-40``, ``len_41-64``, ``len_65-128``,
``len_129-256``. Chance K: parity 2, even pairs 2, cycle navigation c, modular arithmetic 5.
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import numpy as np

from hqlt.blocks.validation import join, require

from .base import IGNORE, Batch, IntStream, Task, make_batch
from .registry import register_task


# ---- configs -----------------------------------------------------------------------------------------
@dataclass
class FormalConfig:
    """Common options of the formal-language tasks (lengths include the answer token)."""

    train_min_len: int = 3
    train_max_len: int = 40
    eval_min_len: int = 40
    eval_max_len: int = 256
    eval_size: int = 8192
    eval_seed: int = 1234
    test_seed: int = 4321  # the test set: eval_size examples of the evaluation lengths from this seed

    def check(self, path: str) -> None:
        require(self.test_seed != self.eval_seed, join(path, "test_seed"),
                f"got {self.test_seed}, the eval_seed too; allowed: another seed than eval_seed")
        require(self.train_min_len >= 3, join(path, "train_min_len"), f"got {self.train_min_len}; must be >= 3")
        require(self.train_max_len >= self.train_min_len, join(path, "train_max_len"),
                f"got {self.train_max_len}; must be >= train_min_len ({self.train_min_len})")
        require(self.eval_min_len >= 3, join(path, "eval_min_len"), f"got {self.eval_min_len}; must be >= 3")
        require(self.eval_max_len >= self.eval_min_len, join(path, "eval_max_len"),
                f"got {self.eval_max_len}; must be >= eval_min_len ({self.eval_min_len})")
        require(self.eval_max_len <= 65536, join(path, "eval_max_len"), f"got {self.eval_max_len}; must be <= 65536")
        require(self.eval_size >= 1, join(path, "eval_size"), f"got {self.eval_size}; must be >= 1")


@dataclass
class ParityConfig(FormalConfig):
    pass


@dataclass
class EvenPairsConfig(FormalConfig):
    pass


@dataclass
class CycleNavConfig(FormalConfig):
    """vocab_size V: ids 0 pad, 1..2*max_step+1 steps, then c = V - 2 - 2*max_step answer ids (cycle length c).

    V=10 (default, xLSTM/Grazzi) gives a 6-cycle; Deletang's 5-cycle is V=9."""

    vocab_size: int = 10
    max_step: int = 1

    def check(self, path: str) -> None:
        super().check(path)
        require(self.max_step >= 1, join(path, "max_step"), f"got {self.max_step}; must be >= 1")
        c = self.vocab_size - 2 - 2 * self.max_step
        require(c >= 2, join(path, "vocab_size"),
                f"got {self.vocab_size}; must be >= {4 + 2 * self.max_step} (cycle length vocab_size-2-2*max_step >= 2)")


@dataclass
class ModArithConfig(FormalConfig):
    """Modular arithmetic without brackets (modulus 5, vocab 10). Odd lengths only."""

    def check(self, path: str) -> None:
        super().check(path)
        for lo_key, hi_key in (("train_min_len", "train_max_len"), ("eval_min_len", "eval_max_len")):
            lo, hi = getattr(self, lo_key), getattr(self, hi_key)
            require(_odd_k_range(lo, hi)[0] <= _odd_k_range(lo, hi)[1], join(path, hi_key),
                    f"mod_arith uses odd lengths only and [{lo}, {hi}] contains none; widen {lo_key}..{hi_key}")


@dataclass
class ModArithBracketsConfig(FormalConfig):
    """Modular arithmetic with brackets. vocab_size V: modulus m = V - 7 (V=12 as in Grazzi's configs: m=5)."""

    vocab_size: int = 12

    def check(self, path: str) -> None:
        super().check(path)
        require(self.vocab_size >= 9, join(path, "vocab_size"), f"got {self.vocab_size}; must be >= 9 (modulus vocab_size-7 >= 2)")
        require(self.train_max_len >= 5, join(path, "train_max_len"), f"got {self.train_max_len}; brackets need lengths >= 5")
        require(self.eval_max_len >= 5, join(path, "eval_max_len"), f"got {self.eval_max_len}; brackets need lengths >= 5")
        require(self.eval_max_len <= 4096, join(path, "eval_max_len"), f"got {self.eval_max_len}; must be <= 4096 (recursive generator)")


def _odd_k_range(lo: int, hi: int) -> tuple[int, int]:
    """L = 2k-1 odd in [lo, hi]  <=>  k in [ceil((lo+1)/2), floor((hi+1)/2)]."""
    return (lo + 2) // 2, (hi + 1) // 2


# ---- shared machinery --------------------------------------------------------------------------------
class FormalLanguageTask(Task):
    kind = "classify"
    pad_id = 0
    min_len = 3  # smallest reference length the task can generate

    def __init__(self, config: FormalConfig, path: str = "task"):
        super().__init__(config, path)
        c = config
        self.seq_len = max(c.train_max_len, c.eval_max_len) - 1
        self.train_seq_len = c.train_max_len - 1

    # subclasses: vocab_size, chance, _generate
    @abstractmethod
    def _generate(self, rng: np.random.Generator, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Full strings for the given reference lengths.

        Returns (seq [n, W] with the answer included and pad elsewhere, W >= max answer index + 1;
        answer index a [n]).
        """

    def _lengths(self, rng: np.random.Generator, n: int, lo: int, hi: int) -> np.ndarray:
        return rng.integers(max(lo, self.min_len), hi + 1, size=n)

    def _batch(self, rng: np.random.Generator, n: int, lo: int, hi: int, T: int) -> Batch:
        L = self._lengths(rng, n, lo, hi)
        seq, a = self._generate(rng, L)
        rows = np.arange(n)
        W = min(seq.shape[1], T)
        inputs = np.full((n, T), self.pad_id, dtype=np.int64)
        inputs[:, :W] = np.where(np.arange(W)[None, :] < a[:, None], seq[:, :W], self.pad_id)
        targets = np.full((n, T), IGNORE, dtype=np.int64)
        targets[rows, a - 1] = seq[rows, a]
        return make_batch(inputs, targets, {"len": L})

    def train_batch(self, batch_size: int, rng: np.random.Generator) -> Batch:
        c = self.config
        return self._batch(rng, batch_size, c.train_min_len, c.train_max_len, self.train_seq_len)

    def _build_eval_sets(self) -> list[Batch]:
        c = self.config
        rng = np.random.default_rng(c.eval_seed)
        return [self._batch(rng, c.eval_size, c.eval_min_len, c.eval_max_len, self.seq_len)]

    def _build_test_sets(self) -> list[Batch]:
        c = self.config
        rng = np.random.default_rng(c.test_seed)
        return [self._batch(rng, c.eval_size, c.eval_min_len, c.eval_max_len, self.seq_len)]

    def slice_label(self, key: str, value: int) -> str:
        if key != "len":
            return super().slice_label(key, value)
        c = self.config
        L = int(value)
        if L <= c.train_max_len:
            return f"len_{c.train_min_len}-{c.train_max_len}"
        top = max(c.eval_max_len, c.train_max_len)
        lo, hi = c.train_max_len + 1, 1 << int(c.train_max_len).bit_length()  # first power of two > train_max_len
        while L > hi:
            lo, hi = hi + 1, hi * 2
        return f"len_{lo}-{min(hi, top)}" if L <= top else f"len_{lo}-{hi}"


def _bits(rng: np.random.Generator, lengths: np.ndarray, n_symbols: int, first_id: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Uniform symbols first_id..first_id+n_symbols-1 at positions < L-1; 0 elsewhere. Returns (seq [n, Lmax], a=L-1)."""
    n, W = len(lengths), int(lengths.max())
    a = lengths - 1
    sym = rng.integers(first_id, first_id + n_symbols, size=(n, W))
    sym[np.arange(W)[None, :] >= a[:, None]] = 0
    return sym, a


# ---- tasks -------------------------------------------------------------------------------------------
@register_task("parity", ParityConfig, "par")
class Parity(FormalLanguageTask):
    """Bits as ids {1, 2}; answer id 1 + (number of id-2 tokens mod 2). V=3, chance 1/2."""

    vocab_size = 3
    chance = 0.5

    def _generate(self, rng, lengths):
        seq, a = _bits(rng, lengths, 2)
        seq[np.arange(len(a)), a] = 1 + (seq == 2).sum(axis=1) % 2
        return seq, a


@register_task("even_pairs", EvenPairsConfig, "evp")
class EvenPairs(FormalLanguageTask):
    """Ids {1, 2}; answer id 1 if the first and last input tokens are equal (even number of unequal adjacent
    pairs), else id 2. V=3, chance 1/2."""

    vocab_size = 3
    chance = 0.5

    def _generate(self, rng, lengths):
        seq, a = _bits(rng, lengths, 2)
        rows = np.arange(len(a))
        seq[rows, a] = 1 + np.abs(seq[:, 0] - seq[rows, a - 1])
        return seq, a


@register_task("cycle_nav", CycleNavConfig, "cyc")
class CycleNav(FormalLanguageTask):
    """Walk on a c-cycle from 0. Step ids: 1 -> 0, 2j -> +j, 2j+1 -> -j (j = 1..max_step); answer id
    2 + 2*max_step + (sum of steps mod c), c = V - 2 - 2*max_step. V=10: ids 1 stay, 2 +1, 3 -1, answers 4..9."""

    def __init__(self, config: CycleNavConfig, path: str = "task"):
        super().__init__(config, path)
        s = config.max_step
        self.vocab_size = config.vocab_size
        self.cycle = config.vocab_size - 2 - 2 * s
        self.chance = 1.0 / self.cycle
        self.answer_base = 2 + 2 * s
        delta = np.zeros(2 + 2 * s, dtype=np.int64)
        for j in range(1, s + 1):
            delta[2 * j], delta[2 * j + 1] = j, -j
        self.delta = delta  # id -> step (id 0 = pad -> 0, id 1 -> 0)

    def _generate(self, rng, lengths):
        seq, a = _bits(rng, lengths, 1 + 2 * self.config.max_step)
        pos = self.delta[seq].sum(axis=1) % self.cycle
        seq[np.arange(len(a)), a] = self.answer_base + pos
        return seq, a


# token ids of mod_arith (w/o brackets)
MA_PAD, MA_PLUS, MA_MINUS, MA_TIMES, MA_EQ, MA_DIGIT0, MA_MOD = 0, 1, 2, 3, 4, 5, 5


@register_task("mod_arith", ModArithConfig, "ma")
class ModArith(FormalLanguageTask):
    """``d op d op ... d = answer`` with m = (L-1)/2 operands (L odd). Ids: 0 pad, 1 '+', 2 '-', 3 '*', 4 '=',
    5..9 digits 0..4; operands and operators uniform; standard precedence ('*' before left-to-right '+'/'-');
    answer = value mod 5 (non-negative), id 5 + answer. V=10, chance 1/5."""

    vocab_size = 10
    chance = 1.0 / MA_MOD

    def _lengths(self, rng, n, lo, hi):
        k_lo, k_hi = _odd_k_range(lo, hi)
        return 2 * rng.integers(k_lo, k_hi + 1, size=n) - 1

    def _generate(self, rng, lengths):
        n = len(lengths)
        m = (lengths - 1) // 2  # operands
        M = int(m.max())
        digits = rng.integers(0, MA_MOD, size=(n, M))
        ops = rng.integers(MA_PLUS, MA_TIMES + 1, size=(n, max(M - 1, 1)))
        # evaluate: acc = sum of finished signed terms, cur = running product of the current term
        acc = np.zeros(n, dtype=np.int64)
        sign = np.ones(n, dtype=np.int64)
        cur = digits[:, 0].copy()
        for j in range(1, M):
            live = j < m
            op, d = ops[:, j - 1], digits[:, j]
            mul = op == MA_TIMES
            close = live & ~mul
            acc = np.where(close, (acc + sign * cur) % MA_MOD, acc)
            sign = np.where(close, np.where(op == MA_PLUS, 1, -1), sign)
            cur = np.where(live, np.where(mul, cur * d % MA_MOD, d), cur)
        answer = (acc + sign * cur) % MA_MOD
        W = int(lengths.max())
        seq = np.zeros((n, W), dtype=np.int64)
        pos = np.arange(W)[None, :]
        seq[:, 0:2 * M:2] = MA_DIGIT0 + digits
        seq[:, 1:2 * M - 1:2] = ops[:, :M - 1]
        seq[pos >= (2 * m - 1)[:, None]] = MA_PAD
        rows = np.arange(n)
        seq[rows, 2 * m - 1] = MA_EQ
        seq[rows, 2 * m] = MA_DIGIT0 + answer
        return seq, 2 * m


@register_task("mod_arith_brackets", ModArithBracketsConfig, "mab")
class ModArithBrackets(FormalLanguageTask):
    """Bracketed modular arithmetic (Deletang grammar). m = V-7; ids: digits 0..m-1, '+' m, '-' m+1, '*' m+2,
    '(' m+3, ')' m+4, '=' m+5, PAD m+6 = V-1. Reference layout ``expr '=' answer PAD`` with |expr| = n = L-3:
    n=1 "d", 2 "-d", 3 "(d)", 4 "(-d)", n>=5 "(" left op right ")" with |left| ~ U{1..n-4}, |right| = n-3-|left|,
    op uniform in {+,-,*}; answer = value mod m. The model emits the answer at the '=' position (a-1 = L-3).
    Chance 1/m (1/5 at the default V=12)."""

    min_len = 5

    def __init__(self, config: ModArithBracketsConfig, path: str = "task"):
        super().__init__(config, path)
        self.vocab_size = config.vocab_size
        m = self.mod = config.vocab_size - 7
        self.chance = 1.0 / m
        self.PLUS, self.MINUS, self.TIMES, self.LP, self.RP, self.EQ, self.PAD = range(m, m + 7)
        self.pad_id = self.PAD

    def _expr(self, n: int, S: IntStream, out: list) -> int:
        m = self.mod
        if n <= 4:
            d = S.below(m)
            if n == 1:
                out.append(d)
            elif n == 2:
                out += (self.MINUS, d)
            elif n == 3:
                out += (self.LP, d, self.RP)
            else:
                out += (self.LP, self.MINUS, d, self.RP)
            return (-d) % m if n in (2, 4) else d
        left = 1 + S.below(n - 4)
        op = S.below(3)
        out.append(self.LP)
        x = self._expr(left, S, out)
        out.append(self.PLUS + op)
        y = self._expr(n - 3 - left, S, out)
        out.append(self.RP)
        return (x + y) % m if op == 0 else (x - y) % m if op == 1 else (x * y) % m

    def _generate(self, rng, lengths):
        n_ex, W = len(lengths), int(lengths.max())
        seq = np.full((n_ex, W), self.PAD, dtype=np.int64)
        S = IntStream(rng)
        for i, L in enumerate(lengths.tolist()):
            toks: list[int] = []
            v = self._expr(L - 3, S, toks)
            toks += (self.EQ, v)
            seq[i, :L - 1] = toks
        return seq, lengths - 2


__all__ = ["CycleNav", "CycleNavConfig", "EvenPairs", "EvenPairsConfig", "FormalConfig", "FormalLanguageTask", "ModArith",
           "ModArithBrackets", "ModArithBracketsConfig", "ModArithConfig", "Parity", "ParityConfig"]
