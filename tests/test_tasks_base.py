"""Task registry, the shared contract of every task, metric helpers and config errors."""
import math
import time

import numpy as np
import pytest
import torch

from hqlt.blocks.validation import ConfigError
from hqlt.orchestration.tasks import (TASKS, Batch, make_task, per_example_accuracy, slice_metrics, task_from_dict,
                                      task_names)
from hqlt.orchestration.tasks.formal import ParityConfig

# small settings so every task builds its eval set quickly
SMALL = {
    "parity": {"eval_size": 64}, "even_pairs": {"eval_size": 64}, "cycle_nav": {"eval_size": 64},
    "mod_arith": {"eval_size": 64}, "mod_arith_brackets": {"eval_size": 64},
    "mqar": {"vocab_size": 512, "seq_len": 128, "num_kv_pairs": 8, "eval_size": 32},
    "mad_in_context_recall": {"num_train_examples": 64, "num_test_examples": 32},
    "mad_fuzzy_recall": {"num_train_examples": 64, "num_test_examples": 32},
    "mad_noisy_recall": {"num_train_examples": 64, "num_test_examples": 32},
    "mad_selective_copying": {"num_train_examples": 64, "num_test_examples": 32},
    "mad_compression": {"num_train_examples": 64, "num_test_examples": 32},
    "mad_memorization": {"num_train_examples": 64, "num_test_examples": 32},
}
EXPECTED = set(SMALL) | {"byte_lm"}


def test_registry_lists_every_task():
    assert set(task_names()) == EXPECTED
    assert task_names() == sorted(task_names())
    shorts = []
    for name, entry in TASKS.items():
        config_cls, task_cls, short = entry  # tuple form
        assert entry.config is config_cls and entry.cls is task_cls
        assert task_cls.name == name and task_cls.short_id == short
        shorts.append(short)
    assert len(set(shorts)) == len(shorts)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_contract_of_every_task(name):
    task = make_task(name, SMALL[name], "task")
    assert task.name == name and task.kind == "classify"
    assert task.train_seq_len <= task.seq_len
    rng = np.random.default_rng(0)
    batches = [task.train_batch(16, rng)] + task.eval_batches(16)
    for i, b in enumerate(batches):
        assert isinstance(b, Batch)
        B, T = b.inputs.shape
        assert b.inputs.dtype == torch.int64 and b.targets.dtype == torch.int64
        assert b.targets.shape == (B, T) and T <= task.seq_len
        if i == 0:
            assert (B, T) == (16, task.train_seq_len)
        assert int(b.inputs.min()) >= 0 and int(b.inputs.max()) < task.vocab_size
        sup = b.targets[b.targets != -100]
        assert sup.numel() > 0 and int(sup.min()) >= 0 and int(sup.max()) < task.vocab_size
        for v in b.slices.values():
            assert v.shape == (B,) and v.dtype == torch.int64
    # the eval set is deterministic and cached
    again = make_task(name, SMALL[name], "task").eval_batches(16)
    assert len(again) == len(batches) - 1
    for a, b in zip(again, batches[1:]):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert task.eval_batches(16) is task.eval_batches(16)
    # same Generator seed -> same training batch
    b1, b2 = task.train_batch(8, np.random.default_rng(7)), task.train_batch(8, np.random.default_rng(7))
    assert torch.equal(b1.inputs, b2.inputs) and torch.equal(b1.targets, b2.targets)


def test_eval_batches_split_the_same_set_for_any_batch_size():
    task = make_task("parity", {"eval_size": 50})
    big = task.eval_batches(64)
    small = task.eval_batches(16)
    assert [b.size for b in small] == [16, 16, 16, 2] and len(big) == 1
    assert torch.equal(torch.cat([b.inputs for b in small]), big[0].inputs)
    assert torch.equal(torch.cat([b.slices["len"] for b in small]), big[0].slices["len"])


def test_make_task_accepts_the_dataclass_and_task_from_dict():
    t = make_task("parity", ParityConfig(train_max_len=20, eval_size=8))
    assert t.config.train_max_len == 20 and t.train_seq_len == 19
    t2 = task_from_dict({"name": "parity", "train_max_len": 20, "eval_size": 8})
    assert t2.config == t.config


def test_unknown_task_name_lists_names():
    with pytest.raises(ConfigError) as e:
        make_task("paritty", {}, "task")
    assert e.value.path == "task.name"
    for n in task_names():
        assert n in str(e.value)
    assert "did you mean 'parity'" in str(e.value)


@pytest.mark.parametrize("name, cfg, path, words", [
    ("parity", {"train_max_len": 2}, "task.train_max_len", "train_min_len"),
    ("parity", {"train_min_len": 1}, "task.train_min_len", ">= 3"),
    ("parity", {"eval_min_len": 300}, "task.eval_max_len", "eval_min_len"),
    ("parity", {"eval_size": "many"}, "task.eval_size", "integer"),
    ("parity", {"vocab_size": 5}, "task.vocab_size", "unknown key"),
    ("cycle_nav", {"vocab_size": 5}, "task.vocab_size", ">= 6"),
    ("mod_arith", {"train_min_len": 4, "train_max_len": 4}, "task.train_max_len", "odd"),
    ("mod_arith_brackets", {"vocab_size": 8}, "task.vocab_size", ">= 9"),
    ("mqar", {"seq_len": 64, "num_kv_pairs": 17}, "task.num_kv_pairs", "4*num_kv_pairs"),
    ("mqar", {"vocab_size": 128, "seq_len": 256}, "task.vocab_size", "must be > every seq_len"),
    ("mqar", {"seq_len": 63, "num_kv_pairs": 4}, "task.seq_len", "even"),
    ("mqar", {"eval": [{"seq_len": 64, "num_kv_pairs": 4}, {"seq_len": 64, "num_kv_pairs": 20}]},
     "task.eval[1].num_kv_pairs", "4*num_kv_pairs"),
    ("mqar", {"train": [{"seq_len": 64, "kv": 4}]}, "task.train[0].kv", "unknown key"),
    ("mad_selective_copying", {"seq_len": 32, "num_tokens_to_copy": 16}, "task.seq_len", "2*num_tokens_to_copy+1"),
    ("mad_noisy_recall", {"frac_noise": 1.0}, "task.frac_noise", "[0, 1)"),
    ("mad_in_context_recall", {"seq_len": 127}, "task.seq_len", "even"),
    ("byte_lm", {}, "task.path", "required"),
])
def test_config_errors_name_the_dotted_path(name, cfg, path, words):
    with pytest.raises(ConfigError) as e:
        make_task(name, cfg, "task")
    assert e.value.path == path, str(e.value)
    assert words in str(e.value)


# ---- metrics -----------------------------------------------------------------------------------------
def test_per_example_accuracy_by_hand():
    V = 4
    targets = torch.tensor([[1, -100, 2], [-100, -100, -100], [3, 3, -100], [0, 1, 2]])
    pred = torch.tensor([[1, 0, 3], [0, 0, 0], [3, 3, 0], [0, 2, 3]])
    logits = torch.nn.functional.one_hot(pred, V).float()
    acc = per_example_accuracy(logits, targets)
    assert acc.shape == (4,)
    assert acc[0].item() == pytest.approx(0.5)
    assert math.isnan(acc[1].item())
    assert acc[2].item() == 1.0
    assert acc[3].item() == pytest.approx(1 / 3)


def test_slice_metrics_scaled_and_per_slice():
    task = make_task("parity", {"eval_size": 8})  # chance 1/2, buckets 3-40 | 41-64 | 65-128 | 129-256
    correct = torch.tensor([1.0, 0.0, 1.0, 1.0, float("nan"), 0.5])
    lens = torch.tensor([10, 50, 57, 200, 60, 40])
    m = slice_metrics(correct, {"len": lens}, task)
    assert m["val/acc"] == pytest.approx(3.5 / 5)
    assert m["val/acc_scaled"] == pytest.approx((0.7 - 0.5) / 0.5)
    assert m["val/acc@len_3-40"] == pytest.approx(0.75)  # lengths 10 and 40
    assert m["val/acc@len_41-64"] == pytest.approx(0.5)  # 50 and 57; 60 is NaN and ignored
    assert m["val/acc@len_129-256"] == pytest.approx(1.0)
    assert "val/acc@len_65-128" not in m
    assert [k for k in m if "@" in k] == ["val/acc@len_3-40", "val/acc@len_41-64", "val/acc@len_129-256"]


def test_slice_metrics_without_chance_and_kv_slices():
    task = make_task("mqar", SMALL["mqar"])
    assert task.chance is None
    m = slice_metrics(torch.tensor([1.0, 0.25, 0.75, 0.0]), {"kv": torch.tensor([4, 4, 16, 16])}, task)
    assert m == {"val/acc": pytest.approx(0.5), "val/acc@kv_4": pytest.approx(0.625), "val/acc@kv_16": pytest.approx(0.375)}


def test_perfect_and_chance_predictions_give_scaled_one_and_zero():
    task = make_task("mod_arith", {"eval_size": 40})
    b = task.eval_batches(40)[0]
    logits = torch.nn.functional.one_hot(b.targets.clamp(min=0), task.vocab_size).float()
    acc = per_example_accuracy(logits, b.targets)
    m = slice_metrics(acc, b.slices, task)
    assert m["val/acc"] == 1.0 and m["val/acc_scaled"] == 1.0
    assert slice_metrics(torch.full((10,), 0.2), {}, task)["val/acc_scaled"] == pytest.approx(0.0, abs=1e-6)


def test_generation_is_fast():
    rng = np.random.default_rng(0)
    for name, cfg in [("mqar", {"vocab_size": 8192, "seq_len": 256, "num_kv_pairs": 16}),
                      ("mad_selective_copying", {"num_train_examples": 512}), ("parity", {}), ("mod_arith", {}),
                      ("mod_arith_brackets", {})]:
        task = make_task(name, cfg)
        task.train_batch(256, rng)  # warm (MAD: builds the train set)
        t0 = time.perf_counter()
        for _ in range(5):
            task.train_batch(256, rng)
        assert (time.perf_counter() - t0) / 5 < 0.05, name
