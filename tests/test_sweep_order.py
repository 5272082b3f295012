"""`sweep.order`: a grid's points start longest first (predicted training FLOPs) or as listed; the key is
validated before anything runs; a resumed or extended sweep goes on with the points it has not run, in order."""
from __future__ import annotations

import itertools
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from hqlt.orchestration import startup
from hqlt.orchestration.space_hooks import HOOKS
from hqlt.orchestration.sweep import ordered_sampler
from hqlt.search_space import SpecError, compile_space, load_spec, make_sampler, materialize
from hqlt.search_space.grid import OrderedGridSampler
from hqlt.search_space.spec import label
from hqlt.search_space.vocabulary import OPTUNA_ORPHANED_ATTR, PREDICTED_FLOPS

optuna.logging.set_verbosity(optuna.logging.WARNING)

SMALL = {"d_model": 16, "n_layers": 1, "n_heads": 2, "layers": "H", "mixer": {"kv": {"name": "softmax", "window": 4}}}
BIG = {"d_model": 64, "n_layers": 2, "n_heads": 2, "layers": "HK", "mixer": {"kv": {"name": "softmax", "window": 8}}}
BASE = {"model": SMALL, "task": {"name": "parity", "eval_size": 32, "eval_max_len": 48},
        "train": {"steps": 4, "batch_size": 8, "eval_every": 4, "eval_batch_size": 32, "warmup_steps": 1},
        "probe": {"warmup_steps": 0, "steps": 1, "seq_len": 16}}
# YAML order: the small arm first, few steps first — ascending cost, the opposite of longest first
SPACE = {"model": {"choice": [SMALL, BIG]}, "train.steps": {"choice": [4, 12]}, "train.lr": {"choice": [1.0e-3, 3.0e-3]}}


def spec_file(tmp_path: Path, **sweep) -> str:
    path = tmp_path / "spec.yaml"
    doc = {"base": BASE, "space": SPACE, "sweep": {"name": "order", "sampler": "grid", "num_samples": 8, **sweep}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def cost_of(spec, params: dict) -> float:
    return startup.predicted_flops(materialize(spec, params), spec.sweep.seeds)


def run_grid(spec, sampler, n: int) -> list[dict]:
    """Ask n trials of the compiled space in turn (as Ray's searcher does), completing each; their params."""
    study = optuna.create_study(sampler=sampler)
    fn = compile_space(spec, HOOKS)
    for _ in range(n):
        trial = study.ask()
        fn(trial)
        try:
            study.tell(trial, 0.0)
        except RuntimeError:  # GridSampler stops the study after the last point (outside study.optimize)
            pass
    return [t.params for t in study.trials]


def as_listed() -> list[tuple]:
    arms = [label(a) for a in (SMALL, BIG)]  # Optuna sees a mapping choice as its json label
    return list(itertools.product(arms, [4, 12], [1.0e-3, 3.0e-3]))


def key(params: dict) -> tuple:
    return (params["model"], params["train.steps"], params["train.lr"])


def test_default_grid_order_is_longest_first(tmp_path):
    spec = load_spec(spec_file(tmp_path), hooks=HOOKS)
    assert spec.sweep.order is None and spec.sweep.grid_order == "longest_first"
    order = run_grid(spec, ordered_sampler(spec), 8)
    costs = [cost_of(spec, p) for p in order]
    assert sorted(map(key, order)) == sorted(as_listed())  # the whole grid, once
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1]
    first = materialize(spec, order[0])
    assert first["model"]["d_model"] == 64 and first["train"]["steps"] == 12  # the big arm, the most steps
    # the cost: FLOPs per token at the training length x batch x length x steps (x seeds), linear in steps
    assert startup.predicted_flops(first, 3) == pytest.approx(3 * startup.predicted_flops(first))
    shorter = {**first, "train": {**first["train"], "steps": 4}}
    assert startup.predicted_flops(shorter) == pytest.approx(startup.predicted_flops(first) / 3)
    # equal cost (the learning rate costs nothing): the spec's order
    assert [p["train.lr"] for p in order[:2]] == [1.0e-3, 3.0e-3]


def test_as_listed_keeps_the_spec_order_and_shuffled_is_optunas(tmp_path):
    spec = load_spec(spec_file(tmp_path, order="as_listed"), hooks=HOOKS)
    sampler = ordered_sampler(spec)
    assert isinstance(sampler, OrderedGridSampler)
    assert [key(p) for p in run_grid(spec, sampler, 8)] == as_listed()
    shuffled = load_spec(spec_file(tmp_path, order="shuffled"), hooks=HOOKS)
    sampler = make_sampler(shuffled.sweep, shuffled.params)
    assert type(sampler) is optuna.samplers.GridSampler  # the order hqlt had before the key
    assert sorted(key(p) for p in run_grid(shuffled, sampler, 8)) == sorted(as_listed())
    # without a cost function (search_space alone), longest_first keeps the spec's order
    plain = load_spec(spec_file(tmp_path), hooks=HOOKS)
    assert [key(p) for p in run_grid(plain, make_sampler(plain.sweep, plain.params), 8)] == as_listed()


def test_order_in_the_spec_hash_only_when_it_changes_the_default(tmp_path):
    default = load_spec(spec_file(tmp_path)).hash
    assert load_spec(spec_file(tmp_path, order="longest_first")).hash == default  # older sweeps keep their hash
    assert load_spec(spec_file(tmp_path, order="as_listed")).hash != default  # a resume may not change it


@pytest.mark.parametrize("sweep,needles", [
    ({"order": "longest"}, ["sweep.order", "got 'longest'", "allowed: longest_first, as_listed, shuffled",
                            "did you mean 'longest_first'"]),
    ({"order": 3}, ["sweep.order", "got 3", "allowed: longest_first, as_listed, shuffled"]),
    ({"order": "longest_first", "sampler": "tpe"}, ["sweep.order", "sampler tpe", "allowed: null, or sampler grid"]),
    ({"order": "as_listed", "sampler": "random"}, ["sweep.order", "sampler random"]),
])
def test_a_bad_order_is_one_line_naming_the_key(tmp_path, sweep, needles):
    with pytest.raises(SpecError) as info:
        load_spec(spec_file(tmp_path, **sweep), hooks=HOOKS)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / "spec.yaml") + ": ")
    for needle in needles:
        assert needle in msg, msg


def test_tpe_keeps_its_own_order(tmp_path):
    spec = load_spec(spec_file(tmp_path, sampler="tpe"), hooks=HOOKS)
    assert spec.sweep.grid_order is None
    assert isinstance(ordered_sampler(spec), optuna.samplers.TPESampler)


def test_a_resumed_study_goes_on_with_the_points_not_run_in_order(tmp_path):
    """What a resume sees: the sampler unpickled from Ray's searcher state, the study from the journal, with
    completed, pruned and failed trials (their points taken), one still running (Ray resumes it) and one closed
    as an orphan of a hard kill (never trained: its point is free again)."""
    spec = load_spec(spec_file(tmp_path), hooks=HOOKS)
    journal = str(tmp_path / "optuna.log")
    study = optuna.create_study(study_name="s", storage=JournalStorage(JournalFileBackend(journal)),
                                sampler=ordered_sampler(spec))
    fn = compile_space(spec, HOOKS)
    trials = []
    for _ in range(5):
        trials.append(study.ask())
        fn(trials[-1])
    study.tell(trials[0], 0.5)
    study.tell(trials[1], state=TrialState.PRUNED)
    study.tell(trials[2], state=TrialState.FAIL)
    # trials[3]: running (Ray knows it); trials[4]: an orphan, closed as sweep._reconcile_orphans does
    study._storage.set_trial_user_attr(trials[4]._trial_id, OPTUNA_ORPHANED_ATTR, True)
    study._storage.set_trial_state_values(trials[4]._trial_id, TrialState.FAIL)
    first_five = [key(t.params) for t in trials]

    sampler = pickle.loads(pickle.dumps(study.sampler))
    resumed = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(journal)), sampler=sampler)
    again = []
    for _ in range(4):
        t = resumed.ask()
        fn(t)
        again.append(t)
    asked = [key(t.params) for t in again]
    assert asked[0] == first_five[4]  # the orphan's point: the longest not run
    assert not set(asked) & set(first_five[:4])  # no finished point again, nor the running one
    assert sorted(first_five[:4] + asked) == sorted(as_listed())  # together: the whole grid, once
    costs = [cost_of(spec, t.params) for t in again]
    assert costs == sorted(costs, reverse=True)


# ---- a real sweep (local Ray, CPU) -------------------------------------------------------------------
def hqlt(*args, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "hqlt.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_sweep_runs_the_longest_first_and_an_extension_goes_on_in_order(tmp_path):
    space = {"model": {"choice": [SMALL, BIG]}, "train.steps": {"choice": [4, 12]}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"base": BASE, "space": space}, sort_keys=False) + textwrap.dedent("""
        sweep:
          name: longest
          sampler: grid
          num_samples: 2
          max_concurrent: 1
        """))
    sw = tmp_path / "sw"
    out = hqlt("sweep", path, "--dir", sw, "--verbose", "0", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "grid order: longest first" in out.stderr
    spec = load_spec(str(path), hooks=HOOKS)
    grid = sorted((cost_of(spec, {"model": label(m), "train.steps": s}) for m in (SMALL, BIG) for s in (4, 12)),
                  reverse=True)

    def trials():
        storage = JournalStorage(JournalFileBackend(str(sw / "optuna.log")))
        (summary,) = optuna.get_all_study_summaries(storage)
        ts = optuna.load_study(study_name=summary.study_name, storage=storage).trials
        return [cost_of(spec, t.params) for t in sorted(ts, key=lambda t: t.number)], ts

    costs, ts = trials()
    assert costs == grid[:2] and all(t.state == TrialState.COMPLETE for t in ts)  # the two longest, longest first
    cl = mlflow.MlflowClient(f"sqlite:///{sw / 'mlflow.db'}")
    exp = cl.get_experiment_by_name("longest")
    runs = cl.search_runs([exp.experiment_id], "tags.`hqlt.role` = 'trial'")
    assert sorted((r.data.metrics[PREDICTED_FLOPS] for r in runs), reverse=True) == pytest.approx(grid[:2])

    more = hqlt("sweep", path, "--dir", sw, "--verbose", "0", "sweep.num_samples=4", cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    costs, ts = trials()
    assert costs == grid and all(t.state == TrialState.COMPLETE for t in ts)  # the rest, in order; none twice
    runs = cl.search_runs([exp.experiment_id], "tags.`hqlt.role` = 'trial'")
    assert len(runs) == 4 and all(r.data.tags["status"] == "completed" for r in runs)
    assert sorted((r.data.metrics[PREDICTED_FLOPS] for r in runs), reverse=True) == pytest.approx(grid)
