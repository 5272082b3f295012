"""MQAR generator checked by scanning each example's context for the queried key."""
import numpy as np
import pytest
import torch

from hqlt.orchestration.tasks import make_task


def check_examples(batch, V, expect_zero_filler):
    """Independent check per example; returns the query-slot offsets seen."""
    slots = []
    for i in range(batch.size):
        x, y = batch.inputs[i].tolist(), batch.targets[i].tolist()
        D, L = int(batch.slices["kv"][i]), (int(batch.slices["len"][i]) if "len" in batch.slices else None)
        ctx = x[:2 * D]
        keys, values = ctx[0::2], ctx[1::2]
        assert all(1 <= k < V // 2 for k in keys) and all(V // 2 <= v < V for v in values)
        assert len(set(keys)) == D and len(set(values)) == D
        queries = [p for p, t in enumerate(y) if t != -100]
        assert len(queries) == D
        assert sorted(x[p] for p in queries) == sorted(keys)  # every key is queried once
        for p in queries:
            assert p >= 2 * D and (p - 2 * D) % 2 == 0
            # scan the context for the key, the answer is the token after it
            j = next(j for j in range(0, 2 * D, 2) if ctx[j] == x[p])
            assert y[p] == ctx[j + 1]
            slots.append((p - 2 * D) // 2)
        if expect_zero_filler:
            end = L if L is not None else len(x)
            assert all(x[p] == 0 for p in range(2 * D, end) if p not in queries)
        if L is not None:
            assert all(t == -100 for t in y[L:]) and all(t == 0 for t in x[L:])
    return slots


def test_answers_by_scanning_the_context():
    task = make_task("mqar", {"vocab_size": 256, "seq_len": 128, "num_kv_pairs": 8, "random_non_queries": False,
                              "eval_size": 64})
    assert task.vocab_size == 256 and task.seq_len == 128 and task.chance is None
    b = task.train_batch(200, np.random.default_rng(0))
    slots = check_examples(b, 256, expect_zero_filler=True)
    # power law (a=0.01 => P(slot i) ~ 1/(i+1)): slot 0 is used far more than the last slots
    counts = np.bincount(slots, minlength=(128 - 16) // 2)
    assert counts[0] > 5 * counts[-10:].mean()
    check_examples(task.eval_batches(64)[0], 256, expect_zero_filler=True)


def test_random_non_queries_fill_the_region_but_stay_unsupervised():
    task = make_task("mqar", {"vocab_size": 256, "seq_len": 128, "num_kv_pairs": 8, "eval_size": 8})
    b = task.train_batch(100, np.random.default_rng(1))
    check_examples(b, 256, expect_zero_filler=False)
    region = b.inputs[:, 16:]
    assert (region == 0).float().mean() < 0.05  # filler replaced by uniform tokens over the whole vocab
    assert int(region.max()) >= 200


def test_mixture_of_settings_and_eval_groups():
    cfg = {"vocab_size": 1024, "train": [{"seq_len": 64, "num_kv_pairs": 4, "weight": 3.0},
                                         {"seq_len": 128, "num_kv_pairs": 8}],
           "eval": [{"seq_len": 64, "num_kv_pairs": 4}, {"seq_len": 64, "num_kv_pairs": 16},
                    {"seq_len": 256, "num_kv_pairs": 32}],
           "eval_size": 10, "random_non_queries": False}
    task = make_task("mqar", cfg)
    assert task.train_seq_len == 128 and task.seq_len == 256
    b = task.train_batch(400, np.random.default_rng(2))
    assert b.inputs.shape == (400, 128)
    kv = b.slices["kv"]
    assert set(kv.tolist()) == {4, 8}
    assert 0.65 < (kv == 4).float().mean() < 0.85  # weight 3 : 1
    assert torch.equal(b.slices["len"], torch.where(kv == 4, 64, 128))
    check_examples(b, 1024, expect_zero_filler=True)
    ev = task.eval_batches(4)
    assert [e.inputs.shape[1] for e in ev] == [64] * 6 + [256] * 3  # batches never mix settings; T = that L
    assert [e.size for e in ev] == [4, 4, 2] * 3
    for e in ev:
        assert len(set(e.slices["kv"].tolist())) == 1
        check_examples(e, 1024, expect_zero_filler=True)
    assert task.slice_label("kv", 16) == "kv_16" and task.slice_label("len", 256) == "len_256"


def test_single_length_has_only_kv_slice_and_determinism():
    cfg = {"vocab_size": 512, "seq_len": 64, "num_kv_pairs": 4, "eval_size": 20}
    t1, t2 = make_task("mqar", cfg), make_task("mqar", cfg)
    e1, e2 = t1.eval_batches(8), t2.eval_batches(8)
    assert set(e1[0].slices) == {"kv"}
    for a, b in zip(e1, e2):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    r1 = t1.train_batch(16, np.random.default_rng(5))
    r2 = t2.train_batch(16, np.random.default_rng(5))
    r3 = t2.train_batch(16, np.random.default_rng(6))
    assert torch.equal(r1.inputs, r2.inputs) and not torch.equal(r1.inputs, r3.inputs)


def test_tight_fit_4kv_equals_L():
    task = make_task("mqar", {"vocab_size": 128, "seq_len": 64, "num_kv_pairs": 16, "random_non_queries": False,
                              "eval_size": 4})
    b = task.train_batch(50, np.random.default_rng(0))
    slots = check_examples(b, 128, expect_zero_filler=True)
    assert sorted(set(slots)) == list(range(16))  # every slot is used when D == S


@pytest.mark.parametrize("cfg, needle", [
    ({"seq_len": 64, "num_kv_pairs": 17}, "4*num_kv_pairs (=68) must be <= seq_len (=64)"),
    ({"vocab_size": 64, "seq_len": 64, "num_kv_pairs": 4}, "must be > every seq_len"),
    ({"train": [{"seq_len": 64, "num_kv_pairs": 4}, {"seq_len": 66, "num_kv_pairs": 17}]}, "task.train[1].num_kv_pairs"),
])
def test_config_messages(cfg, needle):
    from hqlt.blocks.validation import ConfigError
    with pytest.raises(ConfigError) as e:
        make_task("mqar", cfg)
    assert needle in str(e.value)


# ---------------------------------------------------------------- a fixed training set in epochs (issue #18)
def rows(batch):
    return [tuple(r) for r in batch.inputs.tolist()]


def test_fixed_training_set_walks_through_epochs():
    """num_train_examples = N: one fixed set; each run of N consecutive training examples (epochs, batches across
    the epoch boundary included) is a permutation of it; the epoch order comes from the trainer's Generator."""
    cfg = {"vocab_size": 256, "seq_len": 32, "num_kv_pairs": 4, "random_non_queries": False, "eval_size": 20,
           "num_train_examples": 50}
    task = make_task("mqar", cfg)
    x, y, slices = task.train_set_arrays()
    assert x.shape == (50, 32) and x.dtype == np.int16 and set(slices) == {"kv"}
    fixed = sorted(tuple(r) for r in x.tolist())
    rng = np.random.default_rng(3)
    seen = []
    for _ in range(10):                                           # 160 examples: 3 full epochs and a part
        b = task.train_batch(16, rng)
        assert b.inputs.shape == (16, 32) and b.inputs.dtype == torch.int64
        check_examples(b, 256, expect_zero_filler=True)
        seen += rows(b)
    for e in range(3):
        assert sorted(seen[50 * e:50 * (e + 1)]) == fixed
    assert seen[:50] != seen[50:100]                              # a new order every epoch
    # the same Generator seed gives the same stream; the set itself does not depend on it
    other = make_task("mqar", cfg)
    again = [r for _ in range(10) for r in rows(other.train_batch(16, np.random.default_rng(3)))]
    assert again[:16] == seen[:16]
    assert sorted(tuple(r) for r in other.train_set_arrays()[0].tolist()) == fixed
    assert rows(task.train_batch(16, np.random.default_rng(4))) != seen[:16]
    # the validation and test sets are other examples
    for group in (task.eval_sets(), task.test_sets()):
        assert not set(rows(group[0])) & set(fixed)


def test_fixed_training_set_shares_settings_by_weight():
    task = make_task("mqar", {"vocab_size": 512, "train": [{"seq_len": 64, "num_kv_pairs": 4, "weight": 3.0},
                                                           {"seq_len": 128, "num_kv_pairs": 8}],
                              "eval_size": 4, "num_train_examples": 10, "random_non_queries": False})
    x, _, slices = task.train_set_arrays()
    assert x.shape == (10, 128) and sorted(slices["kv"].tolist()) == [4] * 8 + [8] * 2  # 7.5 / 2.5 -> 8 / 2
    check_examples(task.train_batch(10, np.random.default_rng(0)), 512, expect_zero_filler=True)


@pytest.mark.parametrize("cfg, path", [({"num_train_examples": 0}, "task.num_train_examples"),
                                       ({"num_train_examples": 10, "train_seed": 1234}, "task.train_seed")])
def test_fixed_training_set_config_messages(cfg, path):
    from hqlt.blocks.validation import ConfigError
    with pytest.raises(ConfigError) as e:
        make_task("mqar", cfg)
    assert e.value.path == path
