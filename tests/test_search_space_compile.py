"""Compiled spaces: define-by-run sampling, conditions, budgets, materialisation, samplers, pickling."""
from __future__ import annotations

import ast
import copy
import pathlib
import pickle
import subprocess
import sys
import time

import optuna
import pytest
import yaml

from hqlt.search_space import (INFEASIBLE_KEY, SpaceFunction, SpecError, compile_space, load_spec, make_sampler,
                               materialize, nsga2_population, study_name)
from hqlt.search_space.compile import grid_space
from hqlt.search_space.tree import _omegaconf_resolve, resolve_config

from hqlt.orchestration import space_hooks
from hqlt.orchestration.space_hooks import HOOKS, estimate_trial

optuna.logging.set_verbosity(optuna.logging.WARNING)

BASE = {
    "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "layers": "H",
              "mixer": {"kv": {"name": "softmax", "window": 8}, "fw": {"name": "delta", "beta_range": 2},
                        "blend": "sync", "mix": "vector"}},
    "task": {"name": "parity", "eval_size": 64},
    "train": {"steps": 10, "lr": 3e-3, "batch_size": 64},
}

SPEC = {
    "base": BASE,
    "space": {
        "model.layers": {"choice": ["H", "K", "F", "HK"]},
        "model.mixer.kv.window": {"choice": [4, 8, 16], "when": {"model.layers": ["H", "K", "HK"]}},
        # AND of two conditions, one of them on a conditional parameter (a chain)
        "model.mixer.kv.pos": {"choice": ["rope", "none"], "when": {"model.layers": ["K", "HK"], "model.mixer.kv.window": [8, 16]}},
        "model.mixer.fw.beta_range": {"choice": [1, 2], "when": {"model.layers": ["H", "F", "HK"]}},
        "model.d_model": {"int": [32, 128], "step": 32},
        "train.lr": {"float": [1.0e-4, 1.0e-2], "log": True},
    },
    "sweep": {"objectives": [{"metric": "val/acc", "mode": "max"}], "sampler": "tpe", "num_samples": 30},
}


def write(tmp_path, doc, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return str(p)


@pytest.fixture
def spec(tmp_path):
    return load_spec(write(tmp_path, SPEC), hooks=HOOKS)


def run_study(fn, sampler, n, directions=("maximize",)):
    study = optuna.create_study(directions=list(directions), sampler=sampler)
    results = []

    def objective(trial):
        results.append(fn(trial))
        return 0.5 if len(directions) == 1 else tuple(0.5 for _ in directions)

    study.optimize(objective, n_trials=n)
    return study, results


# ---- conditions ----------------------------------------------------------------------------------------
def test_topological_order(spec):
    order = [p.path for p in spec.params]
    assert order.index("model.layers") < order.index("model.mixer.kv.window") < order.index("model.mixer.kv.pos")


@pytest.mark.parametrize("sampler_name", ["tpe", "random", "nsga2"])
def test_conditional_parameters_sampled_only_when_active(spec, sampler_name):
    spec.sweep.sampler = sampler_name
    fn = compile_space(spec, HOOKS)
    study, _ = run_study(fn, make_sampler(spec.sweep, spec.params), 30)
    layers_seen, pos_seen = set(), 0
    for t in study.trials:
        p = t.params
        layers = p["model.layers"]
        layers_seen.add(layers)
        assert ("model.mixer.kv.window" in p) == (layers in ("H", "K", "HK")), p
        assert ("model.mixer.fw.beta_range" in p) == (layers in ("H", "F", "HK")), p
        active_pos = layers in ("K", "HK") and p.get("model.mixer.kv.window") in (8, 16)
        assert ("model.mixer.kv.pos" in p) == active_pos, p
        pos_seen += active_pos
        assert 32 <= p["model.d_model"] <= 128 and p["model.d_model"] % 32 == 0
        assert 1e-4 <= p["train.lr"] <= 1e-2
    assert len(layers_seen) >= 3 and pos_seen >= 1


def test_space_function_is_fast(spec):
    fn = compile_space(spec, HOOKS)
    study = optuna.create_study(sampler=make_sampler(spec.sweep, spec.params))
    worst = 0.0
    for _ in range(15):
        trial = study.ask()
        t0 = time.perf_counter()
        fn(trial)
        worst = max(worst, time.perf_counter() - t0)
        study.tell(trial, 0.0)
    assert worst < 0.5, worst  # Ray warns above 1 s


# ---- materialise / interpolation -----------------------------------------------------------------------
def test_interpolation_resolves_after_sampling(tmp_path):
    doc = copy.deepcopy(SPEC)
    doc["base"] = copy.deepcopy(BASE)
    doc["base"]["train"]["eval_batch_size"] = "${train.batch_size}"
    doc["base"]["probe"] = {"batch_size": "${train.batch_size}", "seq_len": "${model.mixer.kv.window}"}
    doc["base"]["name"] = "d${model.d_model}-${model.layers}"  # string interpolation: the OmegaConf path
    doc["space"] = {"train.batch_size": {"choice": [16, 32]}, "model.d_model": {"int": [32, 64], "step": 32},
                    "model.mixer.kv.window": {"choice": [4, 8]}}
    s = load_spec(write(tmp_path, doc), hooks=HOOKS)
    assert s.base["train"]["eval_batch_size"] == "${train.batch_size}"  # kept unresolved in the spec
    fn = compile_space(s, HOOKS)
    study, results = run_study(fn, make_sampler(s.sweep, s.params), 8)
    for t in study.trials:
        cfg = materialize(s, t.params)
        assert cfg["train"]["batch_size"] == t.params["train.batch_size"]
        assert cfg["train"]["eval_batch_size"] == t.params["train.batch_size"]
        assert cfg["probe"]["batch_size"] == t.params["train.batch_size"]
        assert cfg["probe"]["seq_len"] == t.params["model.mixer.kv.window"]
        assert cfg["name"] == f"d{t.params['model.d_model']}-H"
        space_hooks.check_trial(cfg)
    assert results == [{}] * 8


def test_fast_resolver_matches_omegaconf():
    cfg = {"a": {"b": 3, "c": "${a.b}", "l": [1, "${a.b}"]}, "d": "${a}", "e": "${d.c}", "f": {"g": "${e}"}}
    assert resolve_config(cfg) == _omegaconf_resolve(cfg)
    assert resolve_config(cfg)["f"]["g"] == 3 and resolve_config(cfg)["d"] == {"b": 3, "c": 3, "l": [1, 3]}
    with pytest.raises(Exception, match="cycle|nterpolation"):
        resolve_config({"a": "${b}", "b": "${a}"})


def test_materialize_plain_base_and_registry_name_expansion():
    base = copy.deepcopy(BASE)
    base["model"]["mixer"]["kv"] = "softmax"
    cfg = materialize(base, {"model.mixer.kv.window": 16, "model.d_model": 96, "hqlt.infeasible": "x"})
    assert cfg["model"]["mixer"]["kv"] == {"name": "softmax", "window": 16}
    assert cfg["model"]["d_model"] == 96 and "hqlt" not in cfg
    assert base["model"]["mixer"]["kv"] == "softmax"  # base untouched


def test_mapping_choices_are_encoded_for_optuna(tmp_path):
    doc = copy.deepcopy(SPEC)
    doc["space"] = {"model.mixer.kv": {"choice": [{"name": "softmax", "window": 4}, {"name": "softmax", "window": 16, "pos": "none"}]},
                    "model.layers": {"choice": [["H", "K"], "HH"]}}
    s = load_spec(write(tmp_path, doc), hooks=HOOKS)
    fn = compile_space(s, HOOKS)
    study, results = run_study(fn, make_sampler(s.sweep, s.params), 6)
    for t in study.trials:
        assert all(isinstance(v, str) for v in t.params.values())  # json labels inside Optuna
        cfg = materialize(s, t.params)
        assert cfg["model"]["mixer"]["kv"]["window"] in (4, 16)
        assert cfg["model"]["layers"] in (["H", "K"], "HH")
    assert results == [{}] * 6


# ---- overrides -----------------------------------------------------------------------------------------
def test_overrides_merge_on_top(tmp_path):
    path = write(tmp_path, SPEC)
    plain = load_spec(path)
    s = load_spec(path, ["sweep.num_samples=4", "base.train.steps=50", "space.model.d_model.int=[32,256]",
                         "space.train.lr=null", "space.model.n_layers={choice: [1, 2]}", "sweep.sampler=random"],
                  hooks=HOOKS)
    assert s.sweep.num_samples == 4 and s.sweep.sampler == "random"
    assert s.base["train"]["steps"] == 50 and s.base["train"]["lr"] == 3e-3  # merged, not replaced
    d = s.param("model.d_model")
    assert (d.low, d.high, d.step) == (32, 256, 32)  # bounds overridden, step kept
    assert "train.lr" not in s.paths and s.param("model.n_layers").choices == [1, 2]
    assert "steps: 50" in s.text and "num_samples: 4" in s.text
    assert s.overrides[0] == "sweep.num_samples=4"
    # the hash follows what is searched, not how many samples / which resources
    assert load_spec(path, ["sweep.num_samples=100", "sweep.resources.cpu=2"]).hash == plain.hash
    assert load_spec(path, ["base.train.steps=50"]).hash != plain.hash
    assert load_spec(path, ["sweep.sampler_seed=1"]).hash != plain.hash


def test_override_changing_distribution_kind(tmp_path):
    s = load_spec(write(tmp_path, SPEC), ["space.model.d_model={choice: [48, 96]}"], hooks=HOOKS)
    p = s.param("model.d_model")
    assert p.kind == "choice" and p.choices == [48, 96] and p.step is None


def test_spec_pickles_and_hash_is_stable(spec, tmp_path):
    again = pickle.loads(pickle.dumps(spec))
    assert again.hash == spec.hash and again.params == spec.params
    reordered = dict(SPEC)
    reordered["space"] = dict(reversed(list(SPEC["space"].items())))
    assert load_spec(write(tmp_path, reordered, "r.yaml")).hash == spec.hash
    assert study_name(spec) == f"spec-{spec.hash}"
    err = pickle.loads(pickle.dumps(SpecError("sweep.seeds", "got 0", "f.yaml")))
    assert str(err) == "f.yaml: sweep.seeds: got 0" and err.path == "sweep.seeds"


# ---- budgets -------------------------------------------------------------------------------------------
def test_budget_infeasible_trials_are_marked(tmp_path):
    doc = copy.deepcopy(SPEC)
    doc["sweep"]["budgets"] = {"max_params": 150_000}
    s = load_spec(write(tmp_path, doc), hooks=HOOKS)
    fn = compile_space(s, HOOKS)
    study, results = run_study(fn, optuna.samplers.RandomSampler(seed=3), 30)
    n_bad = 0
    for t, out in zip(study.trials, results):
        n = estimate_trial(materialize(s, t.params))["model/params"]
        if n > 150_000:
            n_bad += 1
            assert INFEASIBLE_KEY in out and out[INFEASIBLE_KEY].startswith("model/params ")
            assert "> max_params 1.5e+05" in out[INFEASIBLE_KEY]
            assert t.constraints["max_params"] > 0
        else:
            assert out == {}
            assert t.constraints["max_params"] <= 0
    assert 0 < n_bad < 30


def test_invalid_combination_is_marked_infeasible(tmp_path):
    """A combination the validator cannot exclude (n_heads 8 with d_model 36) is marked, not crashed on."""
    doc = copy.deepcopy(SPEC)
    doc["space"] = {"model.d_model": {"choice": [32, 36]}, "model.n_heads": {"choice": [4, 8]}}
    s = load_spec(write(tmp_path, doc), hooks=HOOKS)
    fn = compile_space(s, HOOKS)
    study, results = run_study(fn, make_sampler(s.sweep, s.params), 20)
    for t, out in zip(study.trials, results):
        bad = t.params["model.d_model"] % t.params["model.n_heads"] != 0
        assert (INFEASIBLE_KEY in out) == bad
        if bad:
            assert out[INFEASIBLE_KEY].startswith("invalid config: model.n_heads")


# ---- samplers ------------------------------------------------------------------------------------------
def test_make_sampler_kinds(spec):
    s = spec.sweep
    tpe = make_sampler(s, spec.params)
    assert isinstance(tpe, optuna.samplers.TPESampler)
    assert tpe._multivariate and tpe._group
    s.sampler = "nsga2"
    assert isinstance(make_sampler(s, spec.params), optuna.samplers.NSGAIISampler)
    s.sampler = "random"
    assert isinstance(make_sampler(s, spec.params), optuna.samplers.RandomSampler)
    assert [nsga2_population(n) for n in (1, 8, 16, 100, 1000)] == [4, 4, 4, 25, 50]


def test_grid_sampler_covers_the_grid(tmp_path):
    doc = copy.deepcopy(SPEC)
    doc["space"] = {"model.mixer.mix": {"choice": ["sum", "vector"]}, "model.d_model": {"int": [32, 96], "step": 32},
                    "train.lr": {"float": [0.001, 0.002], "step": 0.001}}
    doc["sweep"]["sampler"] = "grid"
    s = load_spec(write(tmp_path, doc), hooks=HOOKS)
    assert grid_space(s.params) == {"model.mixer.mix": ["sum", "vector"], "model.d_model": [32, 64, 96],
                                    "train.lr": [0.001, 0.002]}
    study, _ = run_study(compile_space(s, HOOKS), make_sampler(s.sweep, s.params), 12)
    points = {(t.params["model.mixer.mix"], t.params["model.d_model"], round(t.params["train.lr"], 6)) for t in study.trials}
    assert len(points) == 12


def test_multi_objective_nsga2_runs(spec):
    spec.sweep.sampler = "nsga2"
    spec.sweep.num_samples = 8
    study, _ = run_study(compile_space(spec, HOOKS), make_sampler(spec.sweep, spec.params), 12, ("maximize", "maximize"))
    assert len(study.trials) == 12


# ---- pickling ------------------------------------------------------------------------------------------
def test_pickled_space_function_gives_the_same_suggestions(spec):
    fn = compile_space(spec, HOOKS)
    blob = pickle.dumps(fn)
    assert b"space_hooks" in blob and len(blob) < 20_000  # hooks by reference, plain data only
    fn2 = pickle.loads(blob)
    assert isinstance(fn2, SpaceFunction) and fn2.hooks.estimate is estimate_trial

    def params_of(f):
        study, results = run_study(f, make_sampler(spec.sweep, spec.params), 15)
        return [t.params for t in study.trials], results

    assert params_of(fn) == params_of(fn2)


def test_ray_optuna_search_accepts_the_space(spec):
    """The real integration point: Ray's OptunaSearch with the compiled define-by-run function (no cluster)."""
    optuna_search = pytest.importorskip("ray.tune.search.optuna")
    spec.sweep.budgets.max_params = 150_000
    fn = compile_space(spec, HOOKS)
    searcher = optuna_search.OptunaSearch(fn, metric=["val/acc", "perf/train_tok_s"], mode=["max", "max"],
                                          sampler=make_sampler(spec.sweep, spec.params))
    configs = [searcher.suggest(f"t{i}") for i in range(6)]
    for cfg in configs:
        assert "model.layers" in cfg and "train.lr" in cfg  # dotted names stay flat keys
        trial_cfg = materialize(spec, cfg)
        n = estimate_trial(trial_cfg)["model/params"]
        assert (INFEASIBLE_KEY in cfg) == (n > 150_000)
    restored = pickle.loads(pickle.dumps(searcher._space))
    assert [p.path for p in restored.params] == [p.path for p in spec.params]


# ---- layering ------------------------------------------------------------------------------------------
SEARCH_SPACE = pathlib.Path(__file__).resolve().parents[1] / "search_space"


def test_search_space_imports_no_torch_ray_or_orchestration():
    for file in SEARCH_SPACE.glob("*.py"):
        tree = ast.parse(file.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert not name.split(".")[0] in ("torch", "ray"), f"{file.name} imports {name}"
                assert not name.startswith("hqlt.orchestration"), f"{file.name} imports {name}"


def test_importing_search_space_loads_no_ray_or_torch():
    code = ("import sys, hqlt.search_space; "
            "print('ray' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_builtin_resolvers_and_sweep_interpolation(tmp_path, monkeypatch):
    monkeypatch.setenv("HQLT_TEST_STEPS", "7")
    doc = copy.deepcopy(SPEC)
    doc["base"] = copy.deepcopy(BASE)
    doc["base"]["train"]["steps"] = "${oc.decode:${oc.env:HQLT_TEST_STEPS}}"  # built-ins are allowed
    doc["sweep"]["name"] = "${base.task.name}-screen"  # sweep/space resolve at load, against the whole file
    s = load_spec(write(tmp_path, doc), hooks=HOOKS)
    assert s.name == "parity-screen"
    assert s.base["train"]["steps"].startswith("${oc.decode")  # base stays unresolved until materialize
    cfg = materialize(s, {"model.layers": "K", "model.mixer.kv.window": 4, "model.d_model": 32, "train.lr": 1e-3})
    assert cfg["train"]["steps"] == 7 and cfg["model"]["mixer"]["kv"]["window"] == 4
