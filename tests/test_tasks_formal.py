"""Formal-language generators checked against independent evaluators of the decoded token strings."""
import numpy as np
import pytest
import torch

from hqlt.orchestration.tasks import make_task

FORMAL = ["parity", "even_pairs", "cycle_nav", "mod_arith", "mod_arith_brackets"]


def examples(batch):
    """Yield (prefix tokens the model reads, answer id, supervised position, len slice) per example."""
    for i in range(batch.size):
        sup = torch.nonzero(batch.targets[i] != -100).flatten().tolist()
        assert len(sup) == 1, "exactly one supervised token"
        p = sup[0]
        yield batch.inputs[i, :p + 1].tolist(), int(batch.targets[i, p]), p, int(batch.slices["len"][i])


def batches(name, cfg=None, n=300, seed=0):
    task = make_task(name, dict(cfg or {}, eval_size=n, eval_min_len=40, eval_max_len=120))
    return task, [task.train_batch(n, np.random.default_rng(seed)), task.eval_batches(n)[0]]


# ---- independent evaluators ----------------------------------------------------------------------------
def eval_no_brackets(symbols):
    """Shunting-yard over ['3', '+', '2', '*', ...] with * above + and -, all left-associative."""
    prec = {"+": 1, "-": 1, "*": 2}
    out, ops = [], []

    def apply():
        op, b, a = ops.pop(), out.pop(), out.pop()
        out.append(a + b if op == "+" else a - b if op == "-" else a * b)

    for s in symbols:
        if s.isdigit():
            out.append(int(s))
        else:
            while ops and prec[ops[-1]] >= prec[s]:
                apply()
            ops.append(s)
    while ops:
        apply()
    return out[0]


class BracketParser:
    """term := digit | '-' term | '(' term [op term] ')' over decoded symbols."""

    def __init__(self, symbols):
        self.s, self.i = symbols, 0

    def take(self):
        self.i += 1
        return self.s[self.i - 1]

    def term(self):
        t = self.take()
        if t == "-":
            return -self.term()
        if t.isdigit():
            return int(t)
        assert t == "("
        v = self.term()
        if self.s[self.i] in "+-*":
            op, w = self.take(), self.term()
            v = v + w if op == "+" else v - w if op == "-" else v * w
        assert self.take() == ")"
        return v


# ---- tests -------------------------------------------------------------------------------------------
def test_parity_by_counting():
    task, bs = batches("parity")
    answers = []
    for b in bs:
        for seq, ans, p, L in examples(b):
            bits = seq[:p + 1]
            assert p == L - 2 and set(bits) <= {1, 2}
            assert ans == (1 if bits.count(2) % 2 == 0 else 2)
            answers.append(ans)
    assert 0.4 < np.mean(np.array(answers) == 1) < 0.6
    assert task.vocab_size == 3 and task.chance == 0.5


def test_even_pairs_first_equals_last():
    _, bs = batches("even_pairs")
    for b in bs:
        for seq, ans, p, L in examples(b):
            s = seq[:p + 1]
            assert p == L - 2 and set(s) <= {1, 2}
            unequal_pairs = sum(x != y for x, y in zip(s, s[1:]))
            assert ans == (1 if s[0] == s[-1] else 2) == (1 if unequal_pairs % 2 == 0 else 2)


@pytest.mark.parametrize("V", [10, 9])
def test_cycle_nav_by_summing_steps(V):
    task, bs = batches("cycle_nav", {"vocab_size": V})
    c = V - 4
    assert task.chance == pytest.approx(1 / c) and task.vocab_size == V
    step = {1: 0, 2: +1, 3: -1}
    for b in bs:
        for seq, ans, p, L in examples(b):
            pos = 0
            for t in seq[:p + 1]:
                pos = (pos + step[t]) % c
            assert p == L - 2 and ans == 4 + pos


def test_mod_arith_by_precedence_evaluator():
    task, bs = batches("mod_arith")
    names = {1: "+", 2: "-", 3: "*"} | {5 + d: str(d) for d in range(5)}
    seen_lengths = set()
    for b in bs:
        for seq, ans, p, L in examples(b):
            assert L % 2 == 1 and p == L - 2 and seq[p] == 4  # '=' then the answer
            symbols = [names[t] for t in seq[:p]]
            assert all(s.isdigit() for s in symbols[0::2]) and all(not s.isdigit() for s in symbols[1::2])
            value = eval_no_brackets(symbols)
            assert value == eval("".join(symbols))  # Python's own precedence agrees
            assert ans == 5 + value % 5
            seen_lengths.add(L)
    assert min(seen_lengths) == 3 and max(seen_lengths) >= 101
    assert task.chance == pytest.approx(0.2)


def test_mod_arith_brackets_by_recursive_descent():
    task, bs = batches("mod_arith_brackets")
    m = 5
    names = {d: str(d) for d in range(m)} | {5: "+", 6: "-", 7: "*", 8: "(", 9: ")", 10: "="}
    for b in bs:
        for seq, ans, p, L in examples(b):
            assert L >= 5 and p == L - 3 and seq[p] == 10 and 0 <= ans < m
            symbols = [names[t] for t in seq[:p]]
            parser = BracketParser(symbols + ["="])
            value = parser.term()
            assert parser.i == len(symbols), "the expression uses every symbol before '='"
            assert value % m == ans == eval("".join(symbols)) % m
    assert task.vocab_size == 12 and task.chance == pytest.approx(0.2)


def test_brackets_pad_with_their_pad_id():
    task = make_task("mod_arith_brackets", {"eval_size": 16})
    b = task.train_batch(32, np.random.default_rng(1))
    for i in range(32):
        p = int(torch.nonzero(b.targets[i] != -100)[0])
        assert torch.all(b.inputs[i, p + 1:] == 11)  # PAD = V-1, never digit 0


@pytest.mark.parametrize("name", FORMAL)
def test_lengths_padding_and_one_answer(name):
    task = make_task(name, {"train_min_len": 3, "train_max_len": 20, "eval_min_len": 30, "eval_max_len": 90,
                            "eval_size": 400})
    assert task.seq_len == 89 and task.train_seq_len == 19
    tr = task.train_batch(400, np.random.default_rng(3))
    ev = task.eval_batches(1000)[0]
    assert tr.inputs.shape == (400, 19) and ev.inputs.shape == (400, 89)
    lo = 5 if name == "mod_arith_brackets" else 3
    for b, (a, z) in ((tr, (lo, 20)), (ev, (30, 90))):
        L = b.slices["len"]
        assert int(L.min()) >= a and int(L.max()) <= z
        assert len(set(L.tolist())) > (5 if b is tr else 20)  # lengths vary over the range
        assert torch.all((b.targets != -100).sum(1) == 1)
        p = torch.nonzero(b.targets != -100)[:, 1]
        offset = 3 if name == "mod_arith_brackets" else 2
        assert torch.equal(p, L - offset)
        pad = 11 if name == "mod_arith_brackets" else 0
        after = torch.arange(b.inputs.shape[1])[None, :] > p[:, None]
        assert torch.all(b.inputs[after] == pad)
        assert torch.all(b.inputs[~after] != pad)  # no pad inside the string


def test_eval_seed_changes_the_eval_set_only():
    a = make_task("parity", {"eval_size": 64, "eval_seed": 1}).eval_batches(64)[0]
    b = make_task("parity", {"eval_size": 64, "eval_seed": 1}).eval_batches(64)[0]
    c = make_task("parity", {"eval_size": 64, "eval_seed": 2}).eval_batches(64)[0]
    assert torch.equal(a.inputs, b.inputs) and not torch.equal(a.inputs, c.inputs)


def test_length_slice_labels():
    t = make_task("parity", {"eval_size": 8})
    assert t.slice_label("len", 3) == "len_3-40"
    assert t.slice_label("len", 40) == "len_3-40"
    assert t.slice_label("len", 41) == "len_41-64"
    assert t.slice_label("len", 57) == "len_41-64"
    assert t.slice_label("len", 64) == "len_41-64"
    assert t.slice_label("len", 65) == "len_65-128"
    assert t.slice_label("len", 256) == "len_129-256"
    t2 = make_task("parity", {"eval_size": 8, "eval_max_len": 300})
    assert t2.slice_label("len", 290) == "len_257-300"
    labels = {t.slice_label("len", int(v)) for v in t.eval_batches(8)[0].slices["len"]}
    assert labels <= {"len_3-40", "len_41-64", "len_65-128", "len_129-256"}
