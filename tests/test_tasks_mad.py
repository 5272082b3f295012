"""The six MAD generators checked by re-reading their sequences (scanning earlier pairs, reading tokens back)."""
import numpy as np
import pytest
import torch

from hqlt.orchestration.tasks import make_task


def full_sequence(b, i):
    """Recall tasks are shifted by one: seq = inputs + the last target."""
    return b.inputs[i].tolist() + [int(b.targets[i, -1])]


def scan_pairs(seq, targets, kv_vocab, multi_query=True, is_noise=lambda t: False):
    """Walk the (key, value) pairs; a pair whose key was seen before must be supervised with the remembered value."""
    seen = {}
    n_rep = 0
    P = len(seq) // 2
    for i in range(P):
        k, v = seq[2 * i], seq[2 * i + 1]
        t = targets[2 * i]  # value at seq index 2i+1 <-> target index 2i
        if is_noise(k):
            assert is_noise(v) and t == -100
            continue
        assert 0 <= k < kv_vocab // 2 <= v < kv_vocab
        last = i == P - 1
        if last:
            assert k in seen and t == v == seen[k]  # the probe
        elif k in seen:
            assert v == seen[k], "a key keeps its value within the sequence"
            assert t == (v if multi_query else -100)
            n_rep += 1
        else:
            assert t == -100
        seen[k] = v
        if i > 0:
            assert targets[2 * i - 1] == -100  # keys are never supervised
    return n_rep


@pytest.mark.parametrize("multi_query", [True, False])
def test_in_context_recall(multi_query):
    task = make_task("mad_in_context_recall", {"num_train_examples": 50, "num_test_examples": 40, "multi_query": multi_query})
    assert task.vocab_size == 16 and task.seq_len == task.train_seq_len == 127
    ev = task.eval_batches(40)[0]
    reps = 0
    for i in range(ev.size):
        reps += scan_pairs(full_sequence(ev, i), ev.targets[i].tolist(), 16, multi_query)
    assert reps > 40 * 30  # 63 pairs over 8 keys: most keys repeat
    n_sup = int((ev.targets != -100).sum())
    assert n_sup == (reps + 40 if multi_query else 40)
    tr = task.train_batch(20, np.random.default_rng(0))
    for i in range(tr.size):  # train: next-token targets everywhere
        assert tr.targets[i, :-1].tolist() == tr.inputs[i, 1:].tolist()


def test_noisy_recall():
    task = make_task("mad_noisy_recall", {"num_train_examples": 50, "num_test_examples": 60, "frac_noise": 0.4})
    ev = task.eval_batches(60)[0]
    noise_slots = 0
    for i in range(ev.size):
        seq = full_sequence(ev, i)
        scan_pairs(seq, ev.targets[i].tolist(), 16, True, is_noise=lambda t: 16 <= t < 32)
        noise_slots += sum(16 <= t for t in seq[0::2])
    frac = noise_slots / (60 * 63)
    assert 0.33 < frac < 0.47


def parse_motifs(seq, pad, nk):
    """Split a fuzzy-recall sequence (pads stripped) into (key tuple, value tuple, start index of value)."""
    i = 0
    while seq[i] == pad:
        i += 1
    pairs = []
    while i < len(seq):
        k0 = i
        while seq[i] < nk:
            i += 1
        v0 = i
        while i < len(seq) and nk <= seq[i] < pad:
            i += 1
        assert v0 > k0 and i > v0
        pairs.append((tuple(seq[k0:v0]), tuple(seq[v0:i]), v0))
    return pairs


def test_fuzzy_recall():
    task = make_task("mad_fuzzy_recall", {"num_train_examples": 30, "num_test_examples": 30})
    V, pad, nk = 16, 15, 7
    for b, test in ((task.eval_batches(30)[0], True), (task.train_set(), False)):
        for i in range(b.size):
            seq = full_sequence(b, i)
            y = b.targets[i].tolist()
            pairs = parse_motifs(seq, pad, nk)
            assert len(seq) == 128 and len(pairs) >= 2
            seen, expected_sup = {}, 0
            for j, (k, v, v0) in enumerate(pairs):
                assert 1 <= len(v) <= 3 and 1 <= len(k) <= 3
                if test:
                    assert len(k) == 3  # test keys are always at the max motif size
                    supervised = [y[p - 1] != -100 for p in range(v0, v0 + len(v))]
                    if k in seen:
                        expected_sup += len(v)
                        assert v == seen[k] and all(supervised)
                        assert [y[p - 1] for p in range(v0, v0 + len(v))] == list(v)
                    else:
                        assert not any(supervised)
                    if j == len(pairs) - 1:
                        assert k in seen  # the probe repeats a shown key
                seen[k] = v
            if not test:  # next-token targets except onto padding
                assert all(t == (s if s != pad else -100) for t, s in zip(y, seq[1:]))
            if test:
                assert sum(t != -100 for t in y) == expected_sup  # nothing else is supervised


def test_selective_copying():
    cfg = {"vocab_size": 16, "seq_len": 64, "num_tokens_to_copy": 8, "num_train_examples": 40, "num_test_examples": 40}
    task = make_task("mad_selective_copying", cfg)
    assert task.seq_len == 64
    blank, marker = 14, 15
    for b in (task.eval_batches(40)[0], task.train_set()):
        for i in range(b.size):
            x, y = b.inputs[i].tolist(), b.targets[i].tolist()
            m = x.index(marker)
            assert m == 64 - 8 - 1 and x.count(marker) == 1
            content = [t for t in x[:m] if t != blank]  # read the non-blank tokens
            assert len(content) == 8 and all(0 <= t < 14 for t in content)
            assert all(t == blank for t in x[m + 1:])
            assert y[m + 1:] == content and all(t == -100 for t in y[:m + 1])
    pos = [torch.nonzero(b.inputs[i, :55] != blank).flatten().tolist() for i in range(b.size)]
    assert len({tuple(p) for p in pos}) == b.size  # random placements


def test_compression_causal_variant():
    task = make_task("mad_compression", {"seq_len": 32, "num_train_examples": 20, "num_test_examples": 20})
    assert task.seq_len == task.train_seq_len == 63 and task.vocab_size == 16
    for b in (task.eval_batches(20)[0], task.train_batch(20, np.random.default_rng(0))):
        x, y = b.inputs, b.targets
        assert torch.all(x[:, 31] == 15) and torch.all(x[:, 32:] == 14)  # COMP then L-1 blanks
        assert torch.all(x[:, :31] < 14)
        assert torch.equal(y[:, 32:], x[:, :31]) and torch.all(y[:, :32] == -100)


def test_memorization_uses_one_fixed_map():
    task = make_task("mad_memorization", {"vocab_size": 64, "seq_len": 32, "num_train_examples": 200,
                                          "num_test_examples": 100})
    mapping = {}
    for b in (task.train_set(), task.eval_batches(100)[0]):
        x, y = b.inputs, b.targets
        assert torch.all(x[:, 1::2] == 63) and torch.all(y[:, 0::2] == -100)
        for k, v in zip(x[:, 0::2].flatten().tolist(), y[:, 1::2].flatten().tolist()):
            assert 0 <= k < 31 and 31 <= v < 63
            assert mapping.setdefault(k, v) == v  # same key -> same value in train and test
    assert len(mapping) == 31
    other = make_task("mad_memorization", {"vocab_size": 64, "seq_len": 32, "seed": 1, "num_train_examples": 50})
    assert not np.array_equal(other.kv_map(), task.kv_map())


def test_fixed_train_set_is_sampled_and_deterministic():
    cfg = {"num_train_examples": 10, "num_test_examples": 5}
    t1, t2 = make_task("mad_in_context_recall", cfg), make_task("mad_in_context_recall", cfg)
    assert torch.equal(t1.train_set().inputs, t2.train_set().inputs)
    rows = {tuple(r) for r in t1.train_set().inputs.tolist()}
    b = t1.train_batch(64, np.random.default_rng(0))
    assert all(tuple(r) in rows for r in b.inputs.tolist())
    assert len({tuple(r) for r in b.inputs.tolist()}) == 10  # 64 draws cover the 10 examples
    t3 = make_task("mad_in_context_recall", dict(cfg, seed=99))
    assert not torch.equal(t1.train_set().inputs, t3.train_set().inputs)
    assert not torch.equal(t1.eval_batches(5)[0].inputs, t1.train_set().inputs[:5])  # test set uses eval_seed
