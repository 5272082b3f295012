"""Trustworthy Pareto axes (#14): the cost probe at a target size, measured alone and once per architecture,
consistent seed aggregation, and selection (validation) kept apart from the score (test)."""
from __future__ import annotations

import json
import math
import textwrap
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch

from hqlt.blocks import model_config, param_count
from hqlt.blocks.sizes import SIZE_PRESETS, resized
from hqlt.blocks.validation import ConfigError
from hqlt.orchestration import cost, probe as probe_mod, trainer
from hqlt.orchestration.space_hooks import HOOKS
from hqlt.orchestration.tasks import make_task
from hqlt.orchestration.trainable import run_sampled, summarize_seeds
from hqlt.orchestration.trial import TrialResult, run_trial
from hqlt.orchestration.trial_config import trial_config
from hqlt.search_space import SpecError, load_spec

TINY = {
    "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "layers": "H",
              "mixer": {"kv": {"name": "softmax", "window": 4}}},
    "task": {"name": "parity", "eval_size": 32, "eval_max_len": 48},
    "train": {"steps": 10, "batch_size": 8, "eval_every": 5, "eval_batch_size": 32, "warmup_steps": 1},
    "probe": {"warmup_steps": 0, "steps": 1, "seq_len": 16},
}
# The three `hqlt bench model` architectures, at a trial's tiny size.
ARMS = {
    "transformer": {"layers": "K", "mixer": {"kv": {"name": "softmax", "window": None, "pos": "rope"}}},
    "deltanet": {"layers": "F", "mixer": {"fw": {"name": "delta", "beta_range": 1}}},
    "sync_hqlt": {"layers": "H", "mixer": {"kv": {"name": "softmax", "window": 64, "pos": "rope"},
                                           "fw": {"name": "delta", "beta_range": 2}, "blend": "sync", "mix": "vector"}},
}


def tiny(**over) -> dict:
    cfg = json.loads(json.dumps(TINY))
    for dotted, value in over.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return cfg


# ---------------------------------------------------------------------------------------------- 1. probe size
def test_340m_preset_gives_the_bench_models_from_the_trials_architecture():
    from hqlt.benchmarks.model import CONFIGS

    expected = {"transformer": 373.9e6, "deltanet": 374.1e6, "sync_hqlt": 399.2e6}  # docs/hqlt-math.md §6.1
    for name, arm in ARMS.items():
        small = model_config({"vocab_size": 2, "d_model": 32, "n_layers": 2, "n_heads": 4, **arm})
        big = resized(small, "340M")
        assert (big.d_model, big.n_layers, big.vocab_size) == (1024, 24, 32000)
        assert big.n_heads == (16 if name == "transformer" else 8)  # 16x64 for the Transformer, 8x128 otherwise
        assert param_count(big) == pytest.approx(expected[name], rel=5e-4)
        bench = model_config(CONFIGS[name][0])
        assert param_count(bench) == param_count(big)  # `hqlt bench model` builds the same models
    assert SIZE_PRESETS["1.3B"].d_model == 2048


def test_resizing_keeps_the_architecture_and_repeats_the_layer_pattern():
    small = model_config({"vocab_size": 5, "d_model": 64, "n_layers": 4, "n_heads": 4, "layers": "HHKF",
                          "mixer": {"kv": {"name": "softmax", "window": 8, "pos": "none"}, "blend": "delayed_chunk",
                                    "mix": "sum", "short_conv": True, "output_gate": True}})
    big = resized(small, {"d_model": 256, "n_layers": 6, "n_heads": 2})
    assert big.pattern == "HHKFHH" and big.vocab_size == 5  # a field left out keeps the trial's value
    assert big.mixer.part("kv")[1].window == 8 and big.mixer.part("kv")[1].pos == "none"
    assert big.mixer.blend == "delayed_chunk" and big.mixer.mix == "sum"
    assert big.mixer.short_conv and big.mixer.output_gate
    assert resized(small, None) is small
    with pytest.raises(ConfigError, match="probe.size: .*not valid.*n_heads"):
        resized(small, {"n_heads": 3}, "probe.size")


def test_probe_size_in_the_trial_config():
    assert trial_config({"probe": "340M"}).probe.size == "340M"  # `probe: 340M` is short for probe.size
    cfg = trial_config({"probe": {"size": "1.3B", "seq_len": 2048, "batch_tokens": 16384}})
    assert probe_mod.probe_batch_size(cfg.probe, cfg.train, 2048) == 8
    for bad, path in (({"probe": "3B"}, "probe.size"), ({"probe": {"size": {"width": 4}}}, "probe.size.width"),
                      ({"probe": {"batch_size": 4, "batch_tokens": 64}}, "probe.batch_tokens")):
        with pytest.raises(ConfigError) as e:
            trial_config(bad)
        assert e.value.path == path
    spec_overrides = ["base.probe=340M"]
    from importlib.resources import files

    spec = load_spec(str(files("hqlt.search_space").joinpath("presets/paper_expressivity.yaml")), spec_overrides,
                     hooks=HOOKS)
    assert spec.base["probe"] == "340M"


def test_a_probe_at_another_size_is_labelled_and_leaves_training_alone(tmp_path):
    sized = run_trial(tiny(probe__size={"d_model": 32, "n_layers": 2, "n_heads": 4}))
    plain = run_trial(tiny(probe__enabled=False))
    assert sized.status == plain.status == "completed"
    m = sized.metrics
    assert (m["probe/d_model"], m["probe/n_layers"], m["probe/n_heads"]) == (32, 2, 4)
    assert m["probe/size"] == "d32-L2-H4-V3" and m["probe/device"] == "cpu" and m["perf/probe_seq_len"] == 16
    assert m["probe/contended"] == 1.0 and m["probe/cached"] == 0.0  # CPU: never "alone"
    small = trial_config(tiny())
    small.model.vocab_size = 3
    assert m["probe/params"] == param_count(resized(small.model, {"d_model": 32, "n_layers": 2, "n_heads": 4}))
    assert m["model/params"] == param_count(small.model)  # the trial's own size stays the model axis
    assert m["perf/train_tok_s"] > 0 and m["perf/step_ms"] > 0
    for key in ("val/acc", "val/loss", "test/acc", "train/loss"):  # the probe's model never touched the trial's
        assert m[key] == plain.metrics[key]
    own = run_trial(tiny())
    assert own.metrics["probe/size"] == "own" and own.metrics["probe/d_model"] == 16


# ------------------------------------------------------------------------------------ 2. alone, once, cached
def test_the_probe_times_the_engines_step(monkeypatch):
    """Under the static / graph engine the probe's step reads nothing back to the host (as those engines train,
    and as `hqlt bench model` times) and makes the same update as the trainer's step; eager probes eagerly."""
    from hqlt.blocks import HybridLM

    cfg = trial_config(tiny(train__engine="static", train__grad_clip=0.5))
    task = make_task("parity", cfg.task_config)
    cfg.model.vocab_size = task.vocab_size
    torch.manual_seed(0)
    a = HybridLM(cfg.model)
    b = HybridLM(cfg.model)
    b.load_state_dict(a.state_dict())
    batch = next(iter(task.eval_batches(8)))
    opt_a, opt_b = trainer.make_optimizer(a, cfg.train), trainer.make_optimizer(b, cfg.train)
    trainer.train_step(a, opt_a, batch, cfg.train, 3, torch.device("cpu"))

    # CPU's AdamW reads its step counter back (CUDA's fused, capturable one does not): only the optimizer may
    in_optimizer = []
    real_item, real_float, real_step = torch.Tensor.item, torch.Tensor.__float__, opt_b.step

    def guarded(real):
        def read(self, *args):
            assert in_optimizer, "the probe's step read a value back to the host"
            return real(self, *args)
        return read

    def optimizer_step(*args, **kwargs):
        in_optimizer.append(1)
        try:
            return real_step(*args, **kwargs)
        finally:
            in_optimizer.pop()

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", guarded(real_item))
        m.setattr(torch.Tensor, "__float__", guarded(real_float))
        m.setattr(opt_b, "step", optimizer_step)
        probe_mod.device_step(b, opt_b, batch, cfg.train, 3, torch.device("cpu"))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-5, atol=1e-7), name

    timed = []
    monkeypatch.setattr(probe_mod, "device_step", lambda *a, **k: timed.append("device"))
    monkeypatch.setattr(probe_mod, "train_step", lambda *a, **k: timed.append("eager"))
    for engine, expected in (("static", "device"), ("eager", "eager")):
        timed.clear()
        c = trial_config(tiny(train__engine=engine))
        probe_mod.probe_throughput(a, c.probe, c.train, vocab_size=task.vocab_size, seq_len=16,
                                   device=torch.device("cpu"), flops_per_token=1.0)
        assert timed == [expected] * (c.probe.warmup_steps + c.probe.steps)


def test_cache_key_is_the_architecture_not_the_training():
    device = torch.device("cpu")

    def key(**over):
        cfg = trial_config(tiny(**over))
        cfg.model.vocab_size = 3
        return cost.plan_probe(cfg, 47, device).key(cfg.train)

    base = key()
    assert key(train__lr=0.1) == key(seed=5) == key(train__steps=99) == key(task__eval_size=8) == base
    assert key(model__mixer__kv__window=8) != base and key(probe__seq_len=32) != base
    assert key(probe__batch_size=3) != base and key(train__precision="bf16") != base
    assert key(probe__size="340M") != base


@pytest.fixture()
def spec(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent("""
        base:
          model: {d_model: 16, n_layers: 1, n_heads: 2, layers: H, mixer: {kv: {name: softmax, window: 4}}}
          task: {name: parity, eval_size: 32, eval_max_len: 48}
          train: {steps: 10, batch_size: 8, eval_every: 5, eval_batch_size: 32, warmup_steps: 1}
          probe: {warmup_steps: 0, steps: 1, seq_len: 16}
          seed: 7
        space:
          model.mixer.kv.window: {choice: [2, 4]}
          train.lr: {choice: [1.0e-3, 3.0e-3]}
        sweep: {name: t, num_samples: 2, objectives: [{metric: test/acc, mode: max}, {metric: perf/train_tok_s, mode: max}]}
        """))
    return load_spec(path, hooks=HOOKS)


def test_a_cached_probe_is_reused_across_seeds_learning_rates_and_a_resume(spec, tmp_path, monkeypatch):
    from hqlt.orchestration.trainable import SeedRecords

    objectives = [("test/acc", "max"), ("perf/train_tok_s", "max")]
    probes = tmp_path / "probes"
    measured = []
    real = probe_mod.probe_throughput
    monkeypatch.setattr(probe_mod, "probe_throughput", lambda *a, **k: measured.append(1) or real(*a, **k))
    reports = []
    first = run_sampled({"model.mixer.kv.window": 2, "train.lr": 1e-3}, spec=spec, objectives=objectives, seeds=2,
                        seed_aggregate="max", report=reports.append, records=SeedRecords(tmp_path / "r", "a"),
                        probe_dir=probes)
    assert len(measured) == 1  # seed 0 measured, seed 1 read it
    assert [r["probe/cached"] for r in reports[:3]] == [0.0, 0.0, 1.0]  # seed 0's evaluations, seed 1's first
    assert len(list(probes.glob("*.json"))) == 1
    tok_s = first["perf/train_tok_s"]
    assert {r["perf/train_tok_s"] for r in reports} == {tok_s}
    # another learning rate and another seed of the same architecture: a cache hit, the same value
    lr = run_sampled({"model.mixer.kv.window": 2, "train.lr": 3e-3}, spec=spec, objectives=objectives, seeds=1,
                     seed_aggregate="max", report=lambda m: None, probe_dir=probes)
    assert lr["probe/cached"] == 1.0 and lr["perf/train_tok_s"] == tok_s and len(measured) == 1
    # a resumed trial (seed 0 recorded, seed 1 of a third seed count not): the new seed reads the cache
    resumed = run_sampled({"model.mixer.kv.window": 2, "train.lr": 1e-3}, spec=spec, objectives=objectives, seeds=3,
                          seed_aggregate="max", report=lambda m: None, records=SeedRecords(tmp_path / "r", "a"),
                          probe_dir=probes)
    assert len(measured) == 1 and resumed["seed2/perf/train_tok_s"] == tok_s
    # another architecture measures anew
    run_sampled({"model.mixer.kv.window": 4, "train.lr": 1e-3}, spec=spec, objectives=objectives, seeds=1,
                seed_aggregate="max", report=lambda m: None, probe_dir=probes)
    assert len(measured) == 2 and len(list(probes.glob("*.json"))) == 2


def test_probes_measured_before_the_trials_are_read_from_the_cache_by_them(spec, tmp_path, monkeypatch):
    """The warm-up's probe pass (startup.measure_probes): one measurement per architecture of the whole grid (the
    learning rates share it), written where the trials look; the trials then measure nothing themselves."""
    from hqlt.orchestration import startup

    configs, complete = startup.sweep_candidates(spec, with_complete=True)
    assert complete and len(configs) == 4  # 2 windows x 2 learning rates
    plans = startup.probe_plans(configs, "cpu")
    assert len(plans) == 2 and len({job.key for job in plans}) == 2
    probes = tmp_path / "probes"
    measured = []
    real = probe_mod.probe_throughput
    monkeypatch.setattr(probe_mod, "probe_throughput", lambda *a, **k: measured.append(1) or real(*a, **k))
    none = startup.measure_probes(plans, "cpu", probes, deadline=time.perf_counter() - 1)
    assert none["skipped"] == 2 and none["measured"] == 0 and not measured
    done = startup.measure_probes(plans, "cpu", probes, deadline=time.perf_counter() + 600)
    assert done["measured"] == 2 and not done["errors"] and len(measured) == 2
    assert len(list(probes.glob("*.json"))) == 2
    again = startup.measure_probes(plans, "cpu", probes, deadline=time.perf_counter() + 600)  # a resumed sweep
    assert again["cached"] == 2 and again["measured"] == 0 and len(measured) == 2
    objectives = [("test/acc", "max"), ("perf/train_tok_s", "max")]
    for window in (2, 4):
        final = run_sampled({"model.mixer.kv.window": window, "train.lr": 3e-3}, spec=spec, objectives=objectives,
                            seeds=1, seed_aggregate="max", report=lambda m: None, probe_dir=probes)
        assert final["probe/cached"] == 1.0 and final["perf/train_tok_s"] > 0
    assert len(measured) == 2  # the trials measured nothing
    lines = startup.warm_report({"shapes": 0, "seconds": 0.0, "skipped": 0, "errors": [], "probes": done})
    assert lines[-1].startswith("throughput probes measured before the trials: 2 in ")


def test_a_probe_waits_for_training_trials_to_reach_a_step_boundary(tmp_path):
    lock = cost.CardLock(tmp_path, "GPU-test")
    gate = lock.trainer(torch.device("cpu")).open()
    gate.boundary(0)  # no probe waiting: no pause
    assert gate.pauses == 0
    seen = {}

    waits = []

    def probe():
        with lock.probing(exclusive=True, timeout=30, waits=waits) as alone:
            seen["alone"], seen["at"] = alone, time.monotonic()
            time.sleep(0.2)
        seen["done"] = time.monotonic()

    waited_before = gate.waited_s
    t = threading.Thread(target=probe)
    t.start()
    time.sleep(0.3)
    assert "at" not in seen  # the trainer holds the card: the probe waits ...
    gate.boundary(1)  # ... until the trainer's next step boundary, where the trainer waits for the probe
    t.join(10)
    assert seen["alone"] is True and gate.pauses == 1
    assert time.monotonic() >= seen["done"]  # the trainer went on only after the probe let go
    # both sides count their waits: the probe waited >= 0.3 s for the boundary, the trainer ~0.2 s for the probe
    assert len(waits) == 1 and waits[0] >= 0.25
    assert 0.1 <= gate.waited_s - waited_before < 5
    # without the boundary the probe gives up waiting and says so
    with lock.probing(exclusive=True, timeout=0.2) as alone:
        assert alone is False
    gate.close()
    with lock.probing(exclusive=False, timeout=0.2) as alone:  # only probes take turns: labelled contended
        assert alone is False
    with lock.probing(exclusive=True, timeout=0.2) as alone:
        assert alone is True


def test_probes_of_one_card_take_turns(tmp_path):
    lock = cost.CardLock(tmp_path, "GPU-test")
    spans = []

    def probe():
        with lock.probing(exclusive=True, timeout=30):
            start = time.monotonic()
            time.sleep(0.15)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=probe) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    spans.sort()
    assert len(spans) == 3 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


# --------------------------------------------------------------------------------------- 3. seed aggregation
def _result(seed: int, acc: float, slices: dict, loss: float, status: str = "completed") -> TrialResult:
    m = {"val/acc": acc, "val/acc_scaled": (acc - 0.5) / 0.5, "val/loss": loss, "train/loss": loss + 0.01,
         "test/acc": acc - 0.01, "test/acc_scaled": (acc - 0.51) / 0.5, "perf/train_tok_s": 1000.0,
         "model/params": 5.0, "step": 100, "probe/device": "cpu"}
    m.update({f"val/acc@{k}": v for k, v in slices.items()})
    return TrialResult(status, metrics=m, config={"seed": seed}, arch="S8-dn2-vec", config_hash="h")


GOOD = dict(acc=0.9705, slices={"len_3-40": 1.0, "len_41-64": 0.99}, loss=0.08)  # val/acc_scaled 0.941
BAD = dict(acc=0.511, slices={"len_3-40": 0.62, "len_41-64": 0.50}, loss=0.69)   # val/acc_scaled 0.022


@pytest.mark.parametrize("order", ["best_first", "best_last"])
def test_best_seed_gives_the_whole_record_no_0511_beside_0941(order):
    """A Delayed-Chunk parity trial once showed val/acc 0.511 (the last seed) beside val/acc_scaled 0.941 (the
    best seed): the objective came from one seed, everything else from another."""
    seeds = [_result(0, **GOOD), _result(1, **BAD), _result(2, **BAD)]
    if order == "best_last":
        seeds = [_result(0, **BAD), _result(1, **BAD), _result(2, **GOOD)]
    best = 0 if order == "best_first" else 2
    final = summarize_seeds(seeds, [("val/acc_scaled", "max"), ("perf/train_tok_s", "max")], "max")
    assert final["val/acc_scaled"] == pytest.approx(0.941)
    assert final["val/acc"] == pytest.approx(0.9705)  # not 0.511
    assert final["val/acc_scaled"] == pytest.approx((final["val/acc"] - 0.5) / 0.5)
    for key in ("val/acc@len_3-40", "val/acc@len_41-64", "val/loss", "train/loss", "test/acc"):
        assert final[key] == seeds[best].metrics[key]
    assert final["trial/selected_seed"] == best and final["seed_of/val/acc_scaled"] == best
    assert final["seed_of/perf/train_tok_s"] == best  # ties with the selected seed: attributed to it
    assert final["seeds_median/val/acc_scaled"] == pytest.approx(0.022)
    assert final["seeds_min/val/acc_scaled"] == pytest.approx(0.022)
    assert final["seeds_max/val/acc_scaled"] == pytest.approx(0.941)
    assert [final[f"seed{i}/val/acc_scaled"] for i in range(3)] == [s.metrics["val/acc_scaled"] for s in seeds]


def test_two_objectives_from_different_seeds_say_where_each_came_from():
    a, b = _result(0, **GOOD), _result(1, **BAD)
    b.metrics["val/loss"] = 0.01  # seed 1 has the lower loss, seed 0 the higher accuracy
    final = summarize_seeds([a, b], [("val/acc", "max"), ("val/loss", "min")], "max")
    assert final["val/acc"] == GOOD["acc"] and final["seed_of/val/acc"] == 0 and final["trial/selected_seed"] == 0
    assert final["val/loss"] == 0.01 and final["seed_of/val/loss"] == 1
    assert final["val/acc@len_41-64"] == GOOD["slices"]["len_41-64"]  # the rest: the first objective's seed


def test_an_architecture_metric_first_does_not_pick_the_seed():
    a, b = _result(0, **BAD), _result(1, **GOOD)
    final = summarize_seeds([a, b], [("perf/train_tok_s", "max"), ("val/acc", "max")], "max")
    assert final["trial/selected_seed"] == 1 and final["val/loss"] == GOOD["loss"]


def test_mean_means_every_metric_over_the_seeds():
    seeds = [_result(0, **GOOD), _result(1, **BAD), _result(2, **BAD, status="nan")]
    final = summarize_seeds(seeds, [("val/acc_scaled", "max")], "mean")  # the failed seed does not count
    for key in ("val/acc", "val/acc_scaled", "val/acc@len_3-40", "val/loss", "test/acc"):
        assert final[key] == pytest.approx((seeds[0].metrics[key] + seeds[1].metrics[key]) / 2)
    assert final["val/acc_scaled"] == pytest.approx((final["val/acc"] - 0.5) / 0.5)
    assert final["probe/device"] == "cpu" and final["trial/n_failed_seeds"] == 1.0
    assert final["seeds_median/val/acc_scaled"] == pytest.approx((0.941 + 0.022) / 2)
    assert "trial/selected_seed" not in final


def test_a_real_multi_seed_trial_reports_one_seed_consistently(spec):
    reports = []
    final = run_sampled({"model.mixer.kv.window": 2, "train.lr": 3e-3}, spec=spec,
                        objectives=[("val/acc_scaled", "max")], seeds=2, seed_aggregate="max", report=reports.append)
    assert final["val/acc_scaled"] == pytest.approx((final["val/acc"] - 0.5) / 0.5)
    best = int(final["trial/selected_seed"])
    assert final["val/acc_scaled"] == final[f"seed{best}/val/acc_scaled"]
    assert final["step"] == 20 and final is reports[-1]


# -------------------------------------------------------------------------------- 4. selection and the score
@pytest.mark.parametrize("name,options", [
    ("parity", {"eval_size": 64, "eval_max_len": 64}),
    ("mod_arith_brackets", {"eval_size": 16, "eval_min_len": 8, "eval_max_len": 32}),
    ("mqar", {"vocab_size": 128, "seq_len": 32, "num_kv_pairs": 4, "eval_size": 16,
              "eval": [{"seq_len": 32, "num_kv_pairs": 4}, {"seq_len": 64, "num_kv_pairs": 8}]}),
    ("mad_in_context_recall", {"seq_len": 32, "num_test_examples": 16, "num_train_examples": 16}),
    ("mad_memorization", {"vocab_size": 33, "seq_len": 16, "num_test_examples": 16, "num_train_examples": 16}),
])
def test_every_task_has_a_test_set_apart_from_validation(name, options):
    task = make_task(name, options)
    val, test = task.eval_batches(8), task.test_batches(8)
    assert [b.inputs.shape for b in val] == [b.inputs.shape for b in test]  # same distribution, same layout
    assert list(val[0].slices) == list(test[0].slices)
    assert not all(torch.equal(a.inputs, b.inputs) for a, b in zip(val, test))  # another seed
    assert task.test_batches(8) is test  # cached
    again = make_task(name, options).test_batches(8)
    assert all(torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) for a, b in zip(test, again))


def test_every_registered_task_implements_the_test_set():
    from hqlt.orchestration.tasks import TASKS

    assert all("_build_test_sets" not in getattr(e.cls, "__abstractmethods__", ()) for e in TASKS.values())


def test_byte_lm_test_part_lies_between_training_and_validation(tmp_path):
    data = bytes(np.random.default_rng(0).integers(32, 127, size=4000).astype(np.uint8))
    path = tmp_path / "c.txt"
    path.write_bytes(data)
    task = make_task("byte_lm", {"path": str(path), "seq_len": 16, "val_fraction": 0.1, "test_fraction": 0.1})
    assert (task.n_train, task.n_test, task.n_val) == (3200, 400, 400)
    first_test = task.test_batches(4)[0].inputs[0]
    first_val = task.eval_batches(4)[0].inputs[0]
    assert bytes(first_test.tolist()) == data[3200:3216] and bytes(first_val.tolist()) == data[3600:3616]
    assert int(task.train_batch(64, np.random.default_rng(1)).inputs.shape[1]) == 16
    with pytest.raises(ConfigError) as e:
        make_task("byte_lm", {"path": str(path), "val_fraction": 0.5, "test_fraction": 0.5})
    assert e.value.path == "task.test_fraction"


def test_trials_score_the_test_set_once_after_training(monkeypatch):
    calls = []
    real = trainer.evaluate
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: calls.append(k.get("split", "val")) or real(*a, **k))
    result = run_trial(tiny(train__steps=15))
    assert calls == ["val", "val", "val", "test"]
    m = result.metrics
    assert m["test/acc_scaled"] == pytest.approx((m["test/acc"] - 0.5) / 0.5)
    assert {k for k in m if k.startswith("test/acc@len_")} == {k.replace("val/", "test/") for k in m
                                                                if k.startswith("val/acc@len_")}
    assert m["trial/checkpoint"] == "final" and m["train/selected_step"] == 15


def test_best_val_scores_the_test_set_on_the_best_validation_weights(monkeypatch):
    seen = []
    real = trainer.evaluate

    def spy(model, task, *a, **k):
        out = real(model, task, *a, **k)
        seen.append((k.get("split", "val"), [p.detach().clone() for p in model.parameters()], out))
        return out

    monkeypatch.setattr(trainer, "evaluate", spy)
    reports = []
    result = run_trial(tiny(train__steps=30, train__checkpoint="best_val", train__lr=3e-2), report=reports.append)
    vals = [r["val/acc"] for r in reports]
    best = int(np.argmax(vals))  # the first best
    m = result.metrics
    assert m["train/selected_step"] == reports[best]["step"] and m["trial/checkpoint"] == "best_val"
    assert m["val/acc"] == vals[best] and m["val/loss"] == reports[best]["val/loss"]  # the selected evaluation's
    test_split, test_params, _ = seen[-1]
    assert test_split == "test"
    assert all(torch.equal(a, b) for a, b in zip(test_params, seen[best][1]))  # scored on the best weights
    with pytest.raises(ConfigError, match="train.checkpoint_metric"):
        trial_config(tiny(train__checkpoint_metric="test/acc"))


def test_mqar_early_stop_reads_the_validation_set_only(monkeypatch):
    from hqlt.orchestration.tasks.mqar import MQAR

    with pytest.raises(ConfigError) as e:
        trial_config(tiny(task={"name": "mqar"}, train__early_stop={"metric": "test/acc", "value": 0.5}))
    assert e.value.path == "train.early_stop.metric"
    events = []
    real_val, real_test = MQAR.eval_batches, MQAR.test_batches
    monkeypatch.setattr(MQAR, "eval_batches", lambda self, n: events.append("val") or real_val(self, n))
    monkeypatch.setattr(MQAR, "test_batches", lambda self, n: events.append("test") or real_test(self, n))
    cfg = tiny(task={"name": "mqar", "vocab_size": 64, "seq_len": 32, "num_kv_pairs": 4, "eval_size": 16},
               train__steps=20, train__early_stop={"metric": "val/acc", "value": 0.0})
    result = run_trial(cfg)
    assert result.metrics["trial/stopped_early"] == 1.0 and result.metrics["step"] == 5
    assert events == ["val", "test"]  # the stop saw the validation set; the test set came after, once


def test_spec_objectives_may_name_test_metrics_but_asha_needs_validation(tmp_path):
    from hqlt.search_space.parse import _known_metric

    assert _known_metric("test/acc") and _known_metric("test/acc@len_41-64") and _known_metric("test/bpb")
    assert not _known_metric("test/accuracy") and not _known_metric("test/acc@")
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent("""
        base: {model: {d_model: 16, n_layers: 1, n_heads: 2}, task: {name: parity}}
        space: {model.mixer.kv.window: {choice: [2, 4]}}
        sweep: {name: a, scheduler: asha, objectives: [{metric: test/acc, mode: max}]}
        """))
    with pytest.raises(SpecError, match="sweep.scheduler.*validation"):
        load_spec(str(path))


def test_presets_report_test_metrics():
    from importlib.resources import files

    for path in files("hqlt.search_space").joinpath("presets").iterdir():
        if path.name.endswith(".yaml"):
            spec = load_spec(str(path), ["base.task.path=/dev/null"] if "lm_pareto" in path.name else [])
            assert spec.sweep.metrics[0].startswith("test/"), path.name


# ----------------------------------------------------------------------------------------- 5. the report side
def test_throughput_axis_names_the_probe():
    from hqlt.reports.objectives import Objective
    from hqlt.reports.plots import _label, probe_note

    trials = pd.DataFrame({"tags.probe.size": ["340M", "340M"], "tags.probe.device": ["NVIDIA H200"] * 2,
                           "metrics.perf/probe_seq_len": [2048.0, 2048.0], "metrics.probe/contended": [0.0, 0.0]})
    assert probe_note(trials) == "probe 340M, T=2048, NVIDIA H200"
    label = _label(Objective("perf/train_tok_s", "max"), trials)
    assert label.endswith("\nprobe 340M, T=2048, NVIDIA H200") and "throughput" in label
    assert "probe" not in _label(Objective("test/acc", "max"), trials)
    trials.loc[1, "metrics.probe/contended"] = 1.0
    assert probe_note(trials).endswith("(1 of 2 contended)")
    cpu = pd.DataFrame({"tags.probe.size": ["own"], "tags.probe.device": ["cpu"], "metrics.probe/contended": [1.0]})
    assert probe_note(cpu) == "probe own size, cpu (contended)"
    assert probe_note(pd.DataFrame({"x": [1]})) == ""


def test_hqlt_train_run_carries_the_probe_and_checkpoint_tags(tmp_path):
    import mlflow

    from hqlt.orchestration.tracking import log_single_trial

    result = run_trial(tiny())
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    rid = log_single_trial(uri, "e", result, [], run_name="x")
    run = mlflow.MlflowClient(uri).get_run(rid)
    assert run.data.tags["probe.device"] == "cpu" and run.data.tags["probe.size"] == "own"
    assert run.data.tags["checkpoint"] == "final"
    assert run.data.metrics["probe/contended"] == 1.0 and "test/acc" in run.data.metrics
    assert math.isfinite(run.data.metrics["perf/train_tok_s"])
