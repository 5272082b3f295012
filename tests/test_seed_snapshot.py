"""Seed snapshots (orchestration/seed_snapshot.py): a seed stopped part-way goes on from its last snapshot and ends
exactly where an uninterrupted run ends.

Checked here: every task's data stream goes on from a saved position (prefetching or not, in a fresh task object, as
after a restart); a seed interrupted after a snapshot and resumed ends with bit-identical parameters (eager and static
engines) and the same final record (checkpoint selection included); in a sweep trial the completed seed comes from
its record, the interrupted one from its snapshot, and the snapshot is deleted once the seed is recorded; a snapshot
of another config, a damaged one or a half-written one is not used; the interval is an operational key with a
one-line error for bad values.
"""
from __future__ import annotations

import copy
import json
import textwrap

import numpy as np
import pytest
import torch

from hqlt.blocks import HybridLM
from hqlt.blocks.validation import ConfigError
from hqlt.orchestration import trainer
from hqlt.orchestration.prefetch import BatchStream
from hqlt.orchestration.seed_snapshot import SeedSnapshot, _saveable
from hqlt.orchestration.space_hooks import HOOKS
from hqlt.orchestration.tasks import make_task
from hqlt.orchestration.trainable import SeedRecords, run_sampled
from hqlt.orchestration.trial import run_trial
from hqlt.orchestration.trial_config import trial_config
from hqlt.search_space import load_spec
from hqlt.search_space.vocabulary import RESUMED_STEP
from test_engine import TINY as ENGINE_TINY
from test_tasks_base import SMALL

CPU = torch.device("cpu")
# test_engine's tiny trial, evaluated (and so snapshotted) every 3 steps
TINY = {**copy.deepcopy(ENGINE_TINY), "device": "cpu"}
TINY["train"].update(eval_every=3, log_every=2)


class Interrupted(BaseException):
    """What a kill looks like to the trainer: nothing after it runs (not an Exception: run_trial does not record it)."""


def roundtrip(obj):
    """Through a file and back, as a snapshot is (weights_only loading)."""
    import io

    buf = io.BytesIO()
    torch.save(_saveable(obj), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---- the data stream ------------------------------------------------------------------------------------
STREAMS = {**SMALL, "mqar_fixed": {"vocab_size": 128, "seq_len": 32, "num_kv_pairs": 4, "eval_size": 8,
                                   "num_train_examples": 20}}  # 20 examples, batches of 6: epochs end mid-batch


@pytest.mark.parametrize("name", sorted(STREAMS) + ["byte_lm"])
@pytest.mark.parametrize("depth", [0, 2])
def test_every_task_stream_goes_on_from_its_position(name, depth, tmp_path):
    if name == "byte_lm":
        path = tmp_path / "bytes.bin"
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
        make = lambda: make_task("byte_lm", {"path": str(path), "seq_len": 32, "val_fraction": 0.1})  # noqa: E731
    else:
        task_name = "mqar" if name == "mqar_fixed" else name
        make = lambda: make_task(task_name, copy.deepcopy(STREAMS[name]))  # noqa: E731
    whole = list(BatchStream(make(), 6, np.random.default_rng([4, 4]), count=9, device=CPU, depth=0))
    first = BatchStream(make(), 6, np.random.default_rng([4, 4]), count=9, device=CPU, depth=depth)
    for _ in range(4):
        first.next()
    position = roundtrip(first.position())
    first.close()
    assert position["taken"] == 4
    rest = list(BatchStream(make(), 6, np.random.default_rng([4, 4]), count=9, device=CPU, depth=depth,
                            start=position))
    assert len(rest) == 5
    for a, b in zip(whole[4:], rest):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
        assert a.slices.keys() == b.slices.keys() and all(torch.equal(a.slices[k], b.slices[k]) for k in a.slices)


# ---- one seed -------------------------------------------------------------------------------------------
def model_and_task(seed: int):
    cfg = trial_config(TINY)
    task = make_task("even_pairs", {k: v for k, v in TINY["task"].items() if k != "name"})
    cfg.model.vocab_size = task.vocab_size
    torch.manual_seed(seed)
    return HybridLM(cfg.model), task, cfg


def train_tiny(engine: str, snapshot=None, stop_at=None, seed: int = 0):
    model, task, cfg = model_and_task(seed)
    cfg.train.engine = engine

    def boundary(step):
        if step == stop_at:
            raise Interrupted

    reports = []
    metrics = trainer.train(model, task, cfg.train, device=CPU, data_seed=0, order_seed=0, report=reports.append,
                            boundary=boundary, snapshot=snapshot)
    return model, metrics, reports


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("time/") and k != RESUMED_STEP}


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_a_resumed_seed_ends_with_the_parameters_of_an_uninterrupted_one(engine, tmp_path):
    whole, whole_final, whole_reports = train_tiny(engine)
    snap = SeedSnapshot(tmp_path / "s.pt", 0, "cfg")
    with pytest.raises(Interrupted):
        train_tiny(engine, snap, stop_at=8)  # snapshots at steps 3 and 6; killed in step 9's window
    assert torch.load(snap.path, weights_only=True)["step"] == 6
    # another initialisation: the snapshot's weights must replace it
    resumed, final, reports = train_tiny(engine, SeedSnapshot(snap.path, 0, "cfg"), seed=1)
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert final[RESUMED_STEP] == 6.0
    assert [r["step"] for r in reports] == [6, 9, 12]  # the snapshot's own evaluation is reported again
    assert [comparable(r) for r in reports] == [comparable(r) for r in whole_reports[1:]]
    assert comparable(final) == comparable(whole_final)
    assert final["time/train_s"] > reports[0]["time/train_s"] - 1e-9  # the time before the kill is counted


def test_an_eager_snapshot_goes_on_in_the_static_engine_with_its_own_optimizer_settings(tmp_path):
    """A sweep resumed on other hardware may run another engine: the optimizer state carries over, the engine keeps
    its own groups (fused flag, the learning rate as the device tensor its schedule writes into)."""
    snap = SeedSnapshot(tmp_path / "s.pt", 0, "cfg")
    with pytest.raises(Interrupted):
        train_tiny("eager", snap, stop_at=8)
    model, task, cfg = model_and_task(0)
    cfg.train.engine = "static"
    engine = trainer.make_engine(model, cfg.train, CPU, seq_len=task.train_seq_len)
    engine.resume(snap.load()["engine"], 6)
    group = engine.optimizer.param_groups[0]
    assert group["lr"] is engine.lr and group["fused"] is True
    assert engine.lr.item() == pytest.approx(trainer.lr_at(6, cfg.train))
    assert all(float(st["step"]) == 6.0 for st in engine.optimizer.state.values())
    _, final, reports = train_tiny("static", SeedSnapshot(snap.path, 0, "cfg"))
    assert final[RESUMED_STEP] == 6.0 and [r["step"] for r in reports] == [6, 9, 12]


def test_a_resumed_trial_keeps_its_checkpoint_selection(tmp_path):
    config = copy.deepcopy(TINY)
    config["train"].update(checkpoint="best_val", steps=15)
    whole = run_trial(config)
    path = tmp_path / "t.seed0.snapshot.pt"

    def kill_after_step_12(metrics):
        if metrics["step"] == 12:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_trial(config, report=kill_after_step_12, snapshot=SeedSnapshot(path, 0, "x"))
    assert torch.load(path, weights_only=True)["step"] == 9  # step 12's report came before its snapshot
    resumed = run_trial(config, snapshot=SeedSnapshot(path, 0, "x"))
    assert resumed.status == whole.status == "completed"
    assert resumed.metrics[RESUMED_STEP] == 9.0
    assert comparable(resumed.metrics) == comparable(whole.metrics)  # test/* of the same selected weights
    assert resumed.metrics["train/selected_step"] == whole.metrics["train/selected_step"]


def test_a_snapshot_of_another_config_or_a_damaged_one_is_not_used(tmp_path, capsys):
    snap = SeedSnapshot(tmp_path / "s.pt", 0, "config-a")
    with pytest.raises(Interrupted):
        train_tiny("eager", snap, stop_at=5)
    assert SeedSnapshot(snap.path, 0, "config-b").load() is None
    assert SeedSnapshot(snap.path, 0, "config-a").load()["step"] == 3
    _, final, _ = train_tiny("eager", SeedSnapshot(snap.path, 0, "config-b"))
    assert final[RESUMED_STEP] == 0.0
    snap.path.write_bytes(b"cut off mid-wr")
    assert SeedSnapshot(snap.path, 0, "config-a").load() is None
    assert "unreadable" in capsys.readouterr().err
    # a snapshot is written aside and renamed: a leftover half-written file is never read
    (tmp_path / "s.pt.999.tmp").write_bytes(b"partial")
    snap.path.unlink()
    assert SeedSnapshot(snap.path, 0, "config-a").load() is None


@pytest.mark.parametrize("damage", ["renamed weight", "lost key"])
def test_a_snapshot_that_does_not_fit_is_dropped_and_the_seed_starts_over(damage, tmp_path, capsys):
    """Code changed since the snapshot was made (a renamed module, another state layout): the seed trains from step
    0, as an uninterrupted run, and the snapshot is deleted (one warning line), instead of failing for good."""
    whole, whole_final, _ = train_tiny("eager")
    snap = SeedSnapshot(tmp_path / "s.pt", 0, "cfg")
    with pytest.raises(Interrupted):
        train_tiny("eager", snap, stop_at=8)
    state = torch.load(snap.path, weights_only=True)
    if damage == "renamed weight":
        key = next(iter(state["model"]))
        state["model"]["renamed." + key] = state["model"].pop(key)
    else:
        del state["parts"]
    torch.save(state, snap.path)
    resumed, final, _ = train_tiny("eager", SeedSnapshot(snap.path, 0, "cfg"), seed=1)
    assert "does not fit this run" in capsys.readouterr().err
    assert final[RESUMED_STEP] == 0.0
    assert SeedSnapshot(snap.path, 0, "cfg").load()["step"] == 9  # the damaged one went; this run's last is there
    # seed=1 initialised another model: the undone load must not leave a mix behind, so it differs from `whole`
    # exactly as a fresh seed-1 run does
    fresh, fresh_final, _ = train_tiny("eager", seed=1)
    for (name, a), (_, b) in zip(fresh.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert comparable(final) == comparable(fresh_final)


def test_the_interval_is_kept(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("hqlt.orchestration.seed_snapshot.time.monotonic", lambda: clock[0])
    snap = SeedSnapshot(tmp_path / "s.pt", 2, "c")
    assert not snap.due()
    clock[0] += 119.0
    assert not snap.due()
    clock[0] += 1.0
    assert snap.due()
    snap.save({"step": 1})
    assert not snap.due()
    assert SeedSnapshot(tmp_path / "s.pt", 0, "c").due()


# ---- in a sweep trial -----------------------------------------------------------------------------------
SPEC = """
base:
  model: {d_model: 16, n_layers: 1, n_heads: 2, layers: H, mixer: {kv: {name: softmax, window: 4}}}
  task: {name: parity, eval_size: 32, eval_max_len: 48}
  train: {steps: 10, batch_size: 8, eval_every: 2, eval_batch_size: 32, warmup_steps: 1}
  probe: {enabled: false}
  device: cpu
  seed: 7
space:
  model.mixer.kv.window: {choice: [2, 4]}
sweep: {name: t, num_samples: 2, snapshot_minutes: 0}
"""
OBJECTIVES = [("val/acc", "max"), ("val/loss", "min")]


def test_a_sweep_trial_resumes_its_interrupted_seed(tmp_path, monkeypatch):
    from hqlt.orchestration import trial as trial_mod

    (tmp_path / "spec.yaml").write_text(textwrap.dedent(SPEC))
    spec = load_spec(tmp_path / "spec.yaml", hooks=HOOKS)
    config = {"model.mixer.kv.window": 2, "hqlt.optuna_number": 0}
    whole = run_sampled(config, spec=spec, objectives=OBJECTIVES, seeds=2, seed_aggregate="mean",
                        report=lambda m: None)
    records = SeedRecords(tmp_path / "results", "tr1")
    seen = []

    def kill_in_seed_1(metrics):
        seen.append((metrics["seed_index"], metrics["step"]))
        if metrics["seed_index"] == 1 and metrics["step"] >= 10 + 8:  # seed 1's step 8 (steps count on across seeds)
            raise Interrupted

    with pytest.raises(Interrupted):
        run_sampled(config, spec=spec, objectives=OBJECTIVES, seeds=2, seed_aggregate="mean", report=kill_in_seed_1,
                    records=records)
    names = sorted(p.name for p in records.folder.iterdir())
    assert names == ["tr1.seed0.json", "tr1.seed1.snapshot.pt"]  # seed 0's snapshot went with its record

    calls = []
    original = trial_mod.run_trial
    monkeypatch.setattr(trial_mod, "run_trial", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = run_sampled(config, spec=spec, objectives=OBJECTIVES, seeds=2, seed_aggregate="mean",
                        report=lambda m: None, records=records)
    assert len(calls) == 1  # seed 0 from its record, seed 1 from its snapshot
    assert sorted(p.name for p in records.folder.iterdir()) == ["tr1.seed0.json", "tr1.seed1.json"]
    seed1 = json.loads((records.folder / "tr1.seed1.json").read_text())["result"]["metrics"]
    # the sweep holds each report back by one: step 8's reached `report` at step 10, after step 8's snapshot
    assert seed1[RESUMED_STEP] == 8.0
    for key in ("val/acc", "val/loss", "test/acc", "seed1/val/loss", "seed0/val/loss"):
        assert again[key] == whole[key], key


def test_snapshot_minutes_is_operational_and_checked(tmp_path):
    (tmp_path / "spec.yaml").write_text(textwrap.dedent(SPEC))
    on = load_spec(tmp_path / "spec.yaml", hooks=HOOKS)
    off = load_spec(tmp_path / "spec.yaml", ["sweep.snapshot_minutes=null"], hooks=HOOKS)
    assert on.sweep.snapshot_minutes == 0 and off.sweep.snapshot_minutes is None
    assert on.hash == off.hash  # a sweep can be resumed with snapshots switched on
    for bad in ("-1", "soon"):
        with pytest.raises(ConfigError) as err:
            load_spec(tmp_path / "spec.yaml", [f"sweep.snapshot_minutes={bad}"], hooks=HOOKS)
        line = str(err.value)
        assert "sweep.snapshot_minutes" in line and "\n" not in line, line


def test_a_trial_that_ended_loses_its_snapshots_in_the_driver(tmp_path, monkeypatch):
    """SnapshotCleanup (the driver's Ray callback): a trial that completed or was pruned has its seed snapshots
    deleted (and only its own); one that errored keeps them (a resume runs it again); a resume deletes those of
    trials Ray no longer knows; `remove_snapshots` with no trial clears the folder at the end."""
    from types import SimpleNamespace

    from hqlt.orchestration.seed_snapshot import remove_snapshots, remove_unknown_snapshots
    from hqlt.orchestration.snapshot_cleanup import SnapshotCleanup
    from hqlt.orchestration.sweep_folder import SWEEP_DIR_ENV

    results = tmp_path / "results"
    results.mkdir()
    for name in ("a.seed0.snapshot.pt", "a.seed1.snapshot.pt.77.tmp", "b.seed0.snapshot.pt", "c.seed2.snapshot.pt",
                 "d.seed0.snapshot.pt", "a.seed0.json"):
        (results / name).write_bytes(b"x")
    monkeypatch.setenv(SWEEP_DIR_ENV, str(tmp_path))  # what the driver sets (sweep_folder.use_sweep_dir)
    cleanup = SnapshotCleanup()
    cleanup.on_trial_complete(0, [], SimpleNamespace(trial_id="a"))
    assert sorted(p.name for p in results.iterdir()) == ["a.seed0.json", "b.seed0.snapshot.pt", "c.seed2.snapshot.pt",
                                                         "d.seed0.snapshot.pt"]
    cleanup.on_trial_error(0, [], SimpleNamespace(trial_id="b"))  # Ray's no-op: an errored trial runs again
    assert (results / "b.seed0.snapshot.pt").exists()
    assert remove_unknown_snapshots(results, {"a", "b", "c"}) == 1  # d: orphaned by a hard kill
    assert remove_snapshots(results) == 2
    assert [p.name for p in results.iterdir()] == ["a.seed0.json"]
