"""Byte-level LM on a generated local text file: split sizes, windows, bits per byte."""
import math

import numpy as np
import pytest
import torch

from hqlt.blocks.validation import ConfigError
from hqlt.orchestration.tasks import lm_metrics, make_task, per_example_accuracy, slice_metrics


@pytest.fixture
def text_file(tmp_path):
    """9,000 lowercase bytes then 1,000 uppercase bytes: the two parts are recognisable."""
    rng = np.random.default_rng(0)
    train = bytes(rng.integers(ord("a"), ord("z") + 1, size=9000).astype(np.uint8))
    val = bytes(rng.integers(ord("A"), ord("Z") + 1, size=1000).astype(np.uint8))
    path = tmp_path / "corpus.txt"
    path.write_bytes(train + val)
    return path, train + val


def test_split_and_windows(text_file):
    path, data = text_file
    task = make_task("byte_lm", {"path": str(path), "seq_len": 64, "val_fraction": 0.1})
    assert task.kind == "lm" and task.vocab_size == 256 and task.chance is None
    assert (task.n_train, task.n_test, task.n_val) == (8500, 500, 1000)  # train | test (test_fraction 0.05) | val
    assert task.seq_len == task.train_seq_len == 64
    b = task.train_batch(200, np.random.default_rng(0))
    assert b.inputs.shape == b.targets.shape == (200, 64)
    assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1])  # next byte
    assert int(torch.cat([b.inputs, b.targets]).max()) <= ord("z") and int(b.inputs.min()) >= ord("a")  # training part only
    for row in b.inputs[:20]:
        s = bytes(row.tolist())
        assert s in data[:9000]
    # validation: consecutive non-overlapping windows from the start of the validation part
    ev = task.eval_batches(4)
    n_windows = (1000 - 1) // 64
    assert [e.size for e in ev] == [4, 4, 4, 3] and sum(e.size for e in ev) == n_windows == 15
    flat_in = torch.cat([e.inputs for e in ev]).flatten()
    flat_tg = torch.cat([e.targets for e in ev]).flatten()
    expect = torch.tensor(list(data[9000:9000 + 15 * 64 + 1]))
    assert torch.equal(flat_in, expect[:-1]) and torch.equal(flat_tg, expect[1:])
    assert task.eval_batches(4) is ev  # cached


def test_eval_cap_and_determinism(text_file):
    path, _ = text_file
    task = make_task("byte_lm", {"path": str(path), "seq_len": 32, "val_fraction": 0.1, "eval_batches_max": 2})
    ev = task.eval_batches(5)
    assert len(ev) == 2 and all(e.size == 5 for e in ev)
    a = task.train_batch(8, np.random.default_rng(3))
    b = make_task("byte_lm", {"path": str(path), "seq_len": 32, "val_fraction": 0.1}).train_batch(8, np.random.default_rng(3))
    assert torch.equal(a.inputs, b.inputs)


def test_bits_per_byte():
    assert lm_metrics(math.log(2) * 1.5, 100) == {"val/loss": pytest.approx(math.log(2) * 1.5), "val/bpb": pytest.approx(1.5)}
    assert lm_metrics(math.log(256), 10)["val/bpb"] == pytest.approx(8.0)  # uniform over bytes = 8 bits
    assert all(math.isnan(v) for v in lm_metrics(1.0, 0).values())


def test_uniform_model_is_eight_bits(text_file):
    path, _ = text_file
    task = make_task("byte_lm", {"path": str(path), "seq_len": 16})
    b = task.eval_batches(8)[0]
    logits = torch.zeros(b.size, 16, 256)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b.targets.flatten())
    assert lm_metrics(loss.item(), b.targets.numel())["val/bpb"] == pytest.approx(8.0, rel=1e-5)
    assert "val/acc" in slice_metrics(per_example_accuracy(logits, b.targets), b.slices, task)


def test_missing_unreadable_and_too_small(tmp_path):
    with pytest.raises(ConfigError) as e:
        make_task("byte_lm", {"path": str(tmp_path / "nope.txt")}, "task")
    assert e.value.path == "task.path" and "nope.txt" in str(e.value)
    with pytest.raises(ConfigError) as e:
        make_task("byte_lm", {"path": str(tmp_path)}, "task")  # a directory
    assert e.value.path == "task.path"
    small = tmp_path / "small.txt"
    small.write_text("hello world " * 20)  # 240 bytes -> 12 validation bytes
    with pytest.raises(ConfigError) as e:
        make_task("byte_lm", {"path": str(small), "seq_len": 64}, "task")
    assert e.value.path == "task.seq_len" and "240 bytes" in str(e.value)
    with pytest.raises(ConfigError) as e:
        make_task("byte_lm", {"path": str(small), "val_fraction": 1.5}, "task")
    assert e.value.path == "task.val_fraction"
