"""Spec validation: malformed specs fail before anything runs, with one line naming file and key path."""
from __future__ import annotations

import copy
import os

import pytest
import yaml

from hqlt.blocks.validation import ConfigError
from hqlt.search_space import SpecError, describe, load_spec, space_size, survey, validate

from hqlt.orchestration.space_hooks import HOOKS, estimate_trial

GOOD = {
    "base": {
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "layers": "H",
                  "mixer": {"kv": {"name": "softmax", "window": 8}, "fw": {"name": "delta", "beta_range": 2},
                            "blend": "sync", "mix": "vector"}},
        "task": {"name": "parity", "eval_size": 512},
        "train": {"steps": 300, "lr": 3e-3, "batch_size": 64},
    },
    "space": {
        "model.mixer.kv.window": {"choice": [4, 8, 16]},
        "model.mixer.blend": {"choice": ["sync", "delayed_stream", "delayed_chunk"]},
        "model.mixer.mix": {"choice": ["sum", "vector"]},
        "model.layers": {"choice": ["H", "K", "F", "HK"]},
        "model.d_model": {"int": [32, 128], "step": 32},
        "train.lr": {"float": [1.0e-4, 1.0e-2], "log": True},
        "model.mixer.fw.beta_range": {"choice": [1, 2], "when": {"model.layers": ["H", "F", "HK"]}},
    },
    "sweep": {
        "name": "quickstart",
        "objectives": [{"metric": "val/acc", "mode": "max"}, {"metric": "perf/train_tok_s", "mode": "max"}],
        "sampler": "tpe", "scheduler": "fifo", "asha": {"max_t": 10, "grace_period": 1, "reduction_factor": 3},
        "num_samples": 8, "seeds": 1, "seed_aggregate": "max", "sampler_seed": 0,
        "resources": {"cpu": 1, "gpu": 0}, "max_concurrent": 2,
        "budgets": {"max_params": None, "max_fw_state_bytes": None, "max_kv_cache_bytes": None},
    },
}


def write(tmp_path, doc, name="spec.yaml") -> str:
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return str(p)


def mutated(fn):
    doc = copy.deepcopy(GOOD)
    fn(doc)
    return doc


def setp(section, key, value):
    return lambda d: d[section].__setitem__(key, value)


def setin(keys, value):
    def fn(d):
        node = d
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return fn


def space_only(**entries):
    """Replace the whole space."""
    return lambda d: d.__setitem__("space", {k.replace("__", "."): v for k, v in entries.items()})


RAW_STRING_BOUNDS = """
base:
  model: {d_model: 64, n_heads: 4, layers: H}
  task: {name: parity}
space:
  train.lr: {float: ['1e-4', 1.0e-2], log: true}
"""

RAW_PYTHON_TAG = """
base:
  model: !!python/object/apply:os.system ['echo hacked']
space: {}
"""

# (id, doc mutation or raw YAML text, overrides, substrings the one-line message must contain)
CASES = [
    ("unknown-section", setp("sweep", "x", 1) and (lambda d: d.__setitem__("swep", {})), (), ["swep", "unknown section", "did you mean 'sweep'"]),
    ("sweep-misspelt-key", setp("sweep", "samplr", "tpe"), (), ["sweep.samplr", "did you mean 'sampler'"]),
    ("space-misspelt-path", setp("space", "model.mixer.kv.windw", {"choice": [4, 8]}), (),
     ["space.model.mixer.kv.windw", "did you mean 'model.mixer.kv.window'", "allowed under model.mixer.kv"]),
    ("space-unknown-top", setp("space", "modle.d_model", {"int": [32, 64]}), (), ["space.modle.d_model", "did you mean 'model.d_model'"]),
    ("no-kind", setp("space", "model.d_model", {"step": 32}), (), ["space.model.d_model", "no distribution"]),
    ("several-kinds", setp("space", "model.d_model", {"choice": [32], "int": [32, 64]}), (), ["space.model.d_model", "several"]),
    ("misspelt-dist-key", setp("space", "model.mixer.mix", {"choise": ["sum"]}), (), ["space.model.mixer.mix.choise", "did you mean 'choice'"]),
    ("choice-not-list", setp("space", "model.mixer.mix", {"choice": "sum"}), (), ["space.model.mixer.mix.choice", "list"]),
    ("choice-empty", setp("space", "model.mixer.mix", {"choice": []}), (), ["space.model.mixer.mix.choice", "empty"]),
    ("choice-duplicates", setp("space", "model.mixer.mix", {"choice": ["sum", "sum"]}), (), ["space.model.mixer.mix.choice", "duplicate"]),
    ("string-bounds", RAW_STRING_BOUNDS, (), ["space.train.lr.float", "string"]),
    ("int-float-bound", setp("space", "model.d_model", {"int": [32.5, 64]}), (), ["space.model.d_model.int", "integer"]),
    ("low-ge-high", setp("space", "model.d_model", {"int": [128, 32]}), (), ["space.model.d_model.int", "low 128 >= high 32"]),
    ("log-nonpositive", setp("space", "train.lr", {"float": [0.0, 0.1], "log": True}), (), ["space.train.lr.log", "low > 0"]),
    ("step-nonpositive", setp("space", "model.d_model", {"int": [32, 128], "step": 0}), (), ["space.model.d_model.step", "got 0"]),
    ("step-not-dividing", setp("space", "model.d_model", {"int": [32, 128], "step": 30}), (), ["space.model.d_model.step", "does not divide"]),
    ("float-step-not-dividing", setp("space", "train.lr", {"float": [0.001, 0.01], "step": 0.004}), (), ["space.train.lr.step", "does not divide"]),
    ("step-with-log", setp("space", "train.lr", {"float": [0.001, 0.01], "step": 0.001, "log": True}), (), ["space.train.lr.step", "log"]),
    ("when-unknown-key", setp("space", "model.mixer.fw.beta_range", {"choice": [1, 2], "when": {"model.layer": ["H"]}}), (),
     ["space.model.mixer.fw.beta_range.when.model.layer", "did you mean 'model.layers'"]),
    ("when-not-space-param", setp("space", "model.mixer.fw.beta_range", {"choice": [1, 2], "when": {"model.n_layers": [2]}}), (),
     ["space.model.mixer.fw.beta_range.when.model.n_layers", "not a space parameter"]),
    ("when-impossible-value", setp("space", "model.mixer.fw.beta_range", {"choice": [1, 2], "when": {"model.layers": ["H", "X"]}}), (),
     ["space.model.mixer.fw.beta_range.when.model.layers", "never take 'X'"]),
    ("when-int-off-grid", setp("space", "model.mixer.fw.beta_range", {"choice": [1, 2], "when": {"model.d_model": [48]}}), (),
     ["when.model.d_model", "never take 48"]),
    ("when-continuous", setp("space", "model.mixer.fw.beta_range", {"choice": [1, 2], "when": {"train.lr": [0.001]}}), (),
     ["when.train.lr", "continuous"]),
    ("cyclic-when", lambda d: (d["space"].__setitem__("model.mixer.kv.window", {"choice": [4, 8], "when": {"model.mixer.mix": ["sum"]}}),
                               d["space"].__setitem__("model.mixer.mix", {"choice": ["sum", "vector"], "when": {"model.mixer.kv.window": [4]}})),
     (), ["space.model.mixer", "cyclic"]),
    ("registry-name", setp("space", "model.mixer.mix", {"choice": ["sum", "vectr"]}), (),
     ["space.model.mixer.mix", "'vectr'", "allowed:", "vector", "did you mean 'vector'"]),
    ("registry-kv-name", setp("space", "model.mixer.kv.name", {"choice": ["softmax", "sofmax"]}), (), ["space.model.mixer.kv.name", "sofmax", "allowed:"]),
    ("task-name", setp("space", "task.name", {"choice": ["parity", "parityy"]}), (), ["space.task.name", "parityy", "did you mean 'parity'"]),
    ("never-valid-combination", setp("space", "model.n_heads", {"choice": [4, 5]}), (), ["space.model.n_heads", "5", "must divide"]),
    ("base-invalid", setin(["base", "train", "steps"], 0), (), ["base.train.steps", "got 0"]),
    ("base-unknown-key", setin(["base", "train", "stepz"], 10), (), ["base.train.stepz", "did you mean 'steps'"]),
    ("objective-mode", setin(["sweep", "objectives"], [{"metric": "val/acc", "mode": "maximize"}]), (), ["sweep.objectives[0].mode", "'max'"]),
    ("objective-metric", setin(["sweep", "objectives"], [{"metric": "val/acc", "mode": "max"}, {"metric": "perf/train_toks", "mode": "max"}]), (),
     ["sweep.objectives[1].metric", "did you mean 'perf/train_tok_s'"]),
    ("objectives-empty", setin(["sweep", "objectives"], []), (), ["sweep.objectives", "empty"]),
    ("unknown-sampler", setin(["sweep", "sampler"], "cmaes"), (), ["sweep.sampler", "'tpe'"]),
    ("unknown-scheduler", setin(["sweep", "scheduler"], "hyperband"), (), ["sweep.scheduler", "'asha'"]),
    ("asha-two-objectives", setin(["sweep", "scheduler"], "asha"), (), ["sweep.scheduler", "one objective"]),
    ("asha-grace", lambda d: (d["sweep"].__setitem__("scheduler", "asha"), d["sweep"].__setitem__("objectives", [{"metric": "val/acc"}]),
                              d["sweep"]["asha"].__setitem__("grace_period", 20)), (), ["sweep.asha.grace_period", "1..max_t"]),
    ("grid-continuous", setin(["sweep", "sampler"], "grid"), (), ["space.train.lr", "grid"]),
    ("grid-too-large", lambda d: (d["sweep"].__setitem__("sampler", "grid"), d["space"].__setitem__("train.lr", {"float": [0.001, 0.1], "step": 0.001}),
                                  d["space"].__setitem__("model.d_model", {"int": [32, 4096]})), (), ["sweep.sampler", "grid of", "points"]),
    ("num-samples", setin(["sweep", "num_samples"], 0), (), ["sweep.num_samples", "got 0"]),
    ("seeds", setin(["sweep", "seeds"], 0), (), ["sweep.seeds", "got 0"]),
    ("seed-aggregate", setin(["sweep", "seed_aggregate"], "median"), (), ["sweep.seed_aggregate", "'mean'"]),
    ("negative-cpu", setin(["sweep", "resources", "cpu"], -1), (), ["sweep.resources.cpu", ">= 0"]),
    ("odd-gpu", setin(["sweep", "resources", "gpu"], 1.5), (), ["sweep.resources.gpu", "fraction"]),
    ("no-resources", setin(["sweep", "resources"], {"cpu": 0, "gpu": 0}), (), ["sweep.resources", "both 0"]),
    ("unknown-resource", setin(["sweep", "resources"], {"cpu": 1, "tpu": 1}), (), ["sweep.resources.tpu", "unknown key"]),
    ("max-concurrent", setin(["sweep", "max_concurrent"], 0), (), ["sweep.max_concurrent", ">= 1"]),
    ("bad-name", setin(["sweep", "name"], "my sweep/1"), (), ["sweep.name", "letters"]),
    ("budget-negative", setin(["sweep", "budgets", "max_params"], -5), (), ["sweep.budgets.max_params", "> 0"]),
    ("budget-unmeetable", setin(["sweep", "budgets", "max_params"], 1000), (), ["sweep.budgets.max_params", "57712", "minimum achievable model/params"]),
    ("budget-kv-unmeetable", lambda d: (d["space"].__setitem__("model.layers", {"choice": ["H", "K", "HK"]}),
                                        d["space"].pop("model.mixer.fw.beta_range"),
                                        d["sweep"]["budgets"].__setitem__("max_kv_cache_bytes", 100)), (),
     ["sweep.budgets.max_kv_cache_bytes", "minimum achievable model/kv_cache_bytes"]),
    ("target-key", setin(["base", "model", "_target_"], "os.system"), (), ["base.model._target_", "not allowed"]),
    ("target-in-space", setp("space", "model.mixer.kv", {"choice": [{"_target_": "x"}]}), (), ["_target_", "not allowed"]),
    ("custom-resolver", setin(["base", "train", "lr"], "${eval:'__import__(\"os\").system(\"true\")'}"), (), ["base.train.lr", "resolver 'eval'"]),
    ("python-tag", RAW_PYTHON_TAG, (), ["not valid YAML"]),
    ("space-not-distribution", setp("space", "model.d_model", 64), (), ["space.model.d_model", "expected a distribution"]),
    ("bad-interpolation", setin(["base", "model", "n_heads"], "${model.nheads}"), (), ["base.model.n_heads", "model.nheads"]),
    ("missing-value", setin(["base", "model", "n_layers"], "???"), (), ["base.model.n_layers", "missing"]),
    ("override-unknown-section", None, ["swep.num_samples=4"], ["swep", "unknown section", "override"]),
    ("override-bad-value", None, ["sweep.num_samples=-1"], ["sweep.num_samples", "got -1"]),
    ("override-misspelt-space", None, ["space.model.mixer.mix.choice=[sum,vectr]"], ["space.model.mixer.mix", "vectr", "did you mean 'vector'"]),
]


@pytest.mark.parametrize("case_id,mutation,overrides,needles", CASES, ids=[c[0] for c in CASES])
def test_malformed_spec_is_rejected_with_file_and_key_path(tmp_path, monkeypatch, case_id, mutation, overrides, needles):
    monkeypatch.chdir(tmp_path)
    doc = mutation if isinstance(mutation, str) else mutated(mutation) if mutation else copy.deepcopy(GOOD)
    name = f"spec_{case_id}.yaml"
    path = write(tmp_path, doc, name)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides, hooks=HOOKS)
    msg = str(info.value)
    assert isinstance(info.value, ConfigError)
    assert "\n" not in msg, msg
    assert msg.startswith(path + ": "), msg
    assert name in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in: {msg}"
    assert sorted(os.listdir(tmp_path)) == before  # validation writes nothing


def test_enough_malformed_cases():
    assert len(CASES) >= 20


def test_good_spec_passes_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, GOOD)
    spec = load_spec(path, hooks=HOOKS)
    assert os.listdir(tmp_path) == ["spec.yaml"]
    assert [p.path for p in spec.params][-1] == "model.mixer.fw.beta_range"
    assert spec.name == "quickstart"


def test_unknown_file_and_non_mapping(tmp_path):
    with pytest.raises(SpecError, match="nope.yaml: no such file"):
        load_spec(str(tmp_path / "nope.yaml"))
    p = write(tmp_path, "- 1\n- 2\n", "list.yaml")
    with pytest.raises(SpecError, match="list.yaml: expected a mapping"):
        load_spec(p)


def test_structural_checks_need_no_hooks(tmp_path):
    """load_spec without hooks still rejects everything that needs no trial-config schema."""
    p = write(tmp_path, mutated(setp("space", "model.d_model", {"int": [32, 128], "step": 30})))
    with pytest.raises(SpecError, match="space.model.d_model.step"):
        load_spec(p)
    # ... but cannot know registry names: that needs the injected check
    p = write(tmp_path, mutated(setp("space", "model.mixer.mix", {"choice": ["sum", "vectr"]})), "b.yaml")
    spec = load_spec(p)
    with pytest.raises(SpecError, match="space.model.mixer.mix"):
        validate(spec, HOOKS)


def test_nested_space_equals_flat(tmp_path):
    flat = load_spec(write(tmp_path, GOOD, "flat.yaml"))
    nested = copy.deepcopy(GOOD)
    nested["space"] = {"model": {"mixer": {"kv": {"window": {"choice": [4, 8, 16]}},
                                           "blend": {"choice": ["sync", "delayed_stream", "delayed_chunk"]},
                                           "mix": {"choice": ["sum", "vector"]},
                                           "fw": {"beta_range": {"choice": [1, 2], "when": {"model": {"layers": ["H", "F", "HK"]}}}}},
                                 "layers": {"choice": ["H", "K", "F", "HK"]},
                                 "d_model": {"int": [32, 128], "step": 32}},
                       "train": {"lr": {"float": [1.0e-4, 1.0e-2], "log": True}}}
    spec = load_spec(write(tmp_path, nested, "nested.yaml"))
    assert spec.hash == flat.hash
    assert spec.param("model.mixer.fw.beta_range").when == {"model.layers": ["H", "F", "HK"]}


# ---- describe -------------------------------------------------------------------------------------------
SMALL = {
    "base": {"model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "layers": "H",
                       "mixer": {"kv": {"name": "softmax", "window": 8}, "fw": {"name": "delta", "beta_range": 2},
                                 "blend": "sync", "mix": "sum"}},
             "task": {"name": "parity", "eval_size": 64}},
    "space": {
        "model.layers": {"choice": ["H", "K", "F"]},
        "model.mixer.kv.window": {"choice": [4, 8], "when": {"model.layers": ["H", "K"]}},
        "model.d_model": {"int": [32, 64], "step": 32},
    },
    "sweep": {"objectives": [{"metric": "val/acc", "mode": "max"}]},
}


def _by_hand(base, assignments):
    from hqlt.search_space import materialize
    return [estimate_trial(materialize(base, a))["model/params"] for a in assignments]


def test_describe_small_finite_space(tmp_path):
    spec = load_spec(write(tmp_path, SMALL, "small.yaml"), hooks=HOOKS)
    d = describe(spec, HOOKS)
    # layers H or K: 2 windows x 2 d_model = 4 each; layers F: window inactive -> 2 d_model  => 4 + 4 + 2 = 10
    assert d["parameters"] == 3 and d["conditional"] == 1
    assert d["space_size"] == 10
    assert d["candidates_checked"] == 10 and d["candidates_valid"] == 10 and d["enumerated"] is True
    by_hand = [{"model.layers": lay, "model.d_model": dm, **({"model.mixer.kv.window": w} if w else {})}
               for lay in "HKF" for dm in (32, 64) for w in ((4, 8) if lay != "F" else (None,))]
    assert len(by_hand) == 10
    params = _by_hand(spec.base, by_hand)
    assert d["params_range"] == (min(params), max(params))
    assert d["name"] == "small" and d["objectives"] == ["val/acc (max)"]


def test_describe_continuous_and_unhooked(tmp_path):
    doc = copy.deepcopy(SMALL)
    doc["space"]["train.lr"] = {"float": [1.0e-4, 1.0e-2], "log": True}
    doc["base"]["train"] = {"lr": 1e-3}
    spec = load_spec(write(tmp_path, doc, "c.yaml"), hooks=HOOKS)
    d = describe(spec, HOOKS)
    assert d["space_size"] == "infinite (continuous: train.lr)"
    assert d["candidates_checked"] == 20  # floats at their two endpoints
    bare = describe(spec)  # no hooks: counts only
    assert bare["candidates_checked"] == 0 and bare["params_range"] is None and bare["parameters"] == 4


def test_stepped_float_size(tmp_path):
    doc = copy.deepcopy(SMALL)
    doc["space"] = {"train.lr": {"float": [0.001, 0.005], "step": 0.001}, "model.d_model": {"int": [32, 96], "step": 32}}
    spec = load_spec(write(tmp_path, doc, "s.yaml"))
    assert space_size(spec) == 5 * 3


def test_large_space_is_sampled_not_enumerated(tmp_path):
    doc = copy.deepcopy(SMALL)
    doc["space"] = {"model.d_model": {"int": [32, 512], "step": 4}, "model.n_layers": {"int": [1, 8]},
                    "model.mixer.kv.window": {"int": [1, 64]}}
    spec = load_spec(write(tmp_path, doc, "big.yaml"))
    sv = survey(spec, HOOKS, limit=500)
    assert not sv.enumerated and 0 < sv.checked <= 500
    # the corners are always among the candidates: the smallest model is found exactly
    smallest = _by_hand(spec.base, [{"model.d_model": 32, "model.n_layers": 1, "model.mixer.kv.window": 1}])[0]
    assert sv.minimum["model/params"][0] == smallest


def test_huge_int_range_and_empty_space(tmp_path):
    doc = copy.deepcopy(SMALL)
    doc["space"] = {"model.mixer.kv.window": {"int": [1, 1_000_000_000]}, "model.layers": {"choice": ["H", "K"]}}
    spec = load_spec(write(tmp_path, doc, "huge.yaml"), hooks=HOOKS)
    d = describe(spec, HOOKS, limit=400)
    assert d["space_size"] == 2_000_000_000 and not d["enumerated"] and d["candidates_checked"] <= 400
    doc["space"] = {}
    spec = load_spec(write(tmp_path, doc, "empty.yaml"), hooks=HOOKS)
    d = describe(spec, HOOKS)
    assert d["parameters"] == 0 and d["space_size"] == 1 and d["candidates_checked"] == 1


def test_condition_on_stepped_float(tmp_path):
    doc = copy.deepcopy(SMALL)
    doc["base"]["train"] = {"lr": 0.001}
    doc["space"] = {"train.lr": {"float": [0.001, 0.003], "step": 0.001},
                    "model.mixer.kv.window": {"choice": [4, 8], "when": {"train.lr": [0.002]}}}
    spec = load_spec(write(tmp_path, doc, "f.yaml"), hooks=HOOKS)
    assert space_size(spec) == 2 + 2  # lr 0.001, 0.003 alone; lr 0.002 x 2 windows
    # the survey takes floats at their endpoints plus the values conditions name: the same 4 points here
    assert describe(spec, HOOKS)["candidates_checked"] == 4
