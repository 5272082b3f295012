"""The sweep's trial function without Ray: seeds in one trial, aggregation, one final report."""
from __future__ import annotations

import math
import textwrap

import pytest

from hqlt.orchestration.space_hooks import HOOKS
from hqlt.orchestration.trainable import DONE_KEY, INFEASIBLE_KEY, run_sampled
from hqlt.search_space import load_spec

OBJECTIVES = [("val/acc", "max"), ("perf/train_tok_s", "max")]


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
        sweep: {name: t, num_samples: 2}
        """))
    return load_spec(path, hooks=HOOKS)


@pytest.mark.parametrize("how", ["max", "mean"])
def test_seeds_run_in_one_trial_and_aggregate(spec, how):
    reports = []
    final = run_sampled({"model.mixer.kv.window": 2, "hqlt.optuna_number": 0}, spec=spec, objectives=OBJECTIVES,
                        seeds=2, seed_aggregate=how, report=reports.append)
    assert len(reports) == 4  # 2 seeds x 2 evaluations; the last evaluation is also the final report
    assert [r[DONE_KEY] for r in reports] == [0.0, 0.0, 0.0, 1.0]
    assert [r["step"] for r in reports] == [5, 10, 15, 20]  # steps continue across seeds
    assert final is reports[-1] and final["trial/status"] == "completed" and final["trial/seeds"] == "7,8"
    per_seed = [final["seed0/val/acc"], final["seed1/val/acc"]]
    expected = max(per_seed) if how == "max" else sum(per_seed) / 2
    assert final["val/acc"] == pytest.approx(expected)
    assert final["trial/arch"] == "S2-dn2-vec"
    for r in reports:
        assert all(math.isfinite(r[m]) for m, _ in OBJECTIVES)


def test_infeasible_candidates_are_not_trained(spec):
    reports = []
    final = run_sampled({"model.mixer.kv.window": 2, INFEASIBLE_KEY: "model/params 9e9 > max_params 1e6"},
                        spec=spec, objectives=OBJECTIVES, seeds=3, seed_aggregate="max", report=reports.append)
    assert reports == [final] and final["trial/status"] == "infeasible" and final[DONE_KEY] == 1.0
    assert "max_params" in final["trial/reason"] and math.isnan(final["val/acc"])


def test_a_failed_trial_reports_its_status_once(spec):
    spec = load_spec(spec.file, ["base.fault=nan", "base.fault_step=2"], hooks=HOOKS)
    reports = []
    final = run_sampled({"model.mixer.kv.window": 4}, spec=spec, objectives=OBJECTIVES, seeds=2,
                        seed_aggregate="max", report=reports.append)
    assert final["trial/status"] == "nan" and "step 2" in final["trial/reason"]
    assert final["trial/n_failed_seeds"] == 2.0
    assert reports == [final] and final[DONE_KEY] == 1.0


def test_a_restarted_trial_takes_its_completed_seeds_from_disk(spec, tmp_path, monkeypatch):
    from hqlt.orchestration import trial as trial_mod
    from hqlt.orchestration.trainable import SeedRecords

    config = {"model.mixer.kv.window": 2, "hqlt.optuna_number": 0}
    records = SeedRecords(tmp_path / "results", "abc123")
    first = run_sampled(config, spec=spec, objectives=OBJECTIVES, seeds=2, seed_aggregate="max",
                        report=lambda m: None, records=records)
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["abc123.seed0.json", "abc123.seed1.json"]

    def no_training(*a, **k):
        raise AssertionError("a recorded seed was trained again")
    monkeypatch.setattr(trial_mod, "run_trial", no_training)
    reports = []
    again = run_sampled(config, spec=spec, objectives=OBJECTIVES, seeds=2, seed_aggregate="max",
                        report=reports.append, records=records)
    assert reports == [again] and again[DONE_KEY] == 1.0
    for key in ("val/acc", "seed0/val/acc", "seed1/val/acc", "trial/seeds", "trial/arch"):
        assert again[key] == first[key]
    # a record made for another config (here: another window) is not taken
    assert records.load(0, {"model": "something else"}) is None
    with pytest.raises(AssertionError, match="trained again"):
        run_sampled({**config, "model.mixer.kv.window": 4}, spec=spec, objectives=OBJECTIVES, seeds=1,
                    seed_aggregate="max", report=lambda m: None, records=records)


def test_failed_seeds_are_not_recorded(spec, tmp_path):
    from hqlt.orchestration.trainable import SeedRecords

    spec = load_spec(spec.file, ["base.fault=nan", "base.fault_step=2"], hooks=HOOKS)
    records = SeedRecords(tmp_path / "results", "t1")
    final = run_sampled({"model.mixer.kv.window": 2}, spec=spec, objectives=OBJECTIVES, seeds=1,
                        seed_aggregate="max", report=lambda m: None, records=records)
    assert final["trial/status"] == "nan" and not (tmp_path / "results").exists()
