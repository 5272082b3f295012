"""Sweep start-up (orchestration/startup.py), on CPU: kernel shapes, the kernel-cache warm-up's bookkeeping, the
memory estimate and the GPU fractions of `sweep.resources.gpu: auto`."""
from __future__ import annotations

import json

import pytest
import yaml

from hqlt.orchestration import startup
from hqlt.orchestration.space_hooks import HOOKS
from hqlt.search_space import INFEASIBLE_KEY, SpecError, load_spec

BASE = {
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "layers": "H", "mixer": {"kv": {"name": "softmax", "window": 4}}},
    "task": {"name": "parity", "eval_size": 16, "eval_max_len": 48},
    "train": {"steps": 4, "batch_size": 4, "eval_batch_size": 16, "lr": 1e-3},
    "probe": {"enabled": False},
}


def cfg(**changes):
    out = json.loads(json.dumps(BASE))
    for dotted, value in changes.items():
        node = out
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return out


def test_kernel_shape_ignores_what_the_kernels_do_not_see():
    same = [cfg(), cfg(train__lr=3e-3), cfg(model__n_layers=4), cfg(train__batch_size=64), cfg(seed=3)]
    assert len({startup.kernel_shape(c) for c in same}) == 1
    different = [cfg(), cfg(model__d_model=64), cfg(model__n_heads=4), cfg(model__mixer={"kv": {"name": "softmax", "window": 8}}),
                 cfg(model__layers="F"), cfg(task__train_max_len=20), cfg(train__precision="fp32")]
    assert len({startup.kernel_shape(c) for c in different}) == len(different)


def test_warm_kernel_cache_runs_once_per_shape():
    configs = [cfg(), cfg(train__lr=3e-3), cfg(model__layers="K", model__mixer={"kv": {"name": "softmax", "window": None}}),
               {"model": {"d_model": 30, "n_heads": 4}}]  # the last one is invalid: skipped
    assert startup.warm_kernel_cache(configs, "cpu") == {"shapes": 0, "seconds": 0.0, "skipped": 0, "errors": []}
    out = startup.warm_kernel_cache(configs, "cpu", cpu=True)  # CUDA only; cpu=True runs it here (smoke test)
    assert out["shapes"] == 2 and out["errors"] == [] and out["skipped"] == 0
    capped = startup.warm_kernel_cache(configs, "cpu", cpu=True, max_shapes=1)
    assert capped["shapes"] == 1 and capped["skipped"] == 1


def test_memory_estimate_grows_with_the_work_and_sets_the_gpu_fraction():
    small, wide, big_batch = (startup.memory_estimate(c) for c in (cfg(), cfg(model__d_model=256), cfg(train__batch_size=4096)))
    assert startup.CONTEXT_BYTES < small < wide and small < big_batch
    probed = cfg(probe={"enabled": True, "seq_len": 512, "batch_size": 512})
    assert startup.memory_estimate(probed) > startup.memory_estimate(cfg())
    assert startup.gpu_fraction(cfg(), 1e15) == 1.0 / startup.MAX_PER_GPU
    assert startup.gpu_fraction(cfg(), 1e6) == 1.0
    need = startup.memory_estimate(cfg(train__batch_size=4096))
    assert startup.gpu_fraction(cfg(train__batch_size=4096), 2.5 * need) == 0.5  # 2 fit, not 3


def spec_file(tmp_path, gpu) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"base": BASE, "space": {"model.d_model": {"choice": [32, 512]}},
                                    "sweep": {"sampler": "grid", "num_samples": 2, "resources": {"cpu": 1, "gpu": gpu}}}))
    return str(path)


def test_gpu_auto_gives_each_trial_its_fraction(tmp_path):
    spec = load_spec(spec_file(tmp_path, "auto"), hooks=HOOKS)
    assert spec.sweep.resources.gpu == "auto" and startup.uses_gpus(spec)
    per_trial = startup.trial_resources(spec, gpu_mem_bytes=4e9)
    assert isinstance(per_trial, startup.TrialResources)
    small, large = per_trial({"model.d_model": 32}), per_trial({"model.d_model": 512})
    assert small["cpu"] == 1 and 0 < large["gpu"] <= 1 and small["gpu"] <= large["gpu"]
    assert per_trial({"model.d_model": 32, INFEASIBLE_KEY: "too big"})["gpu"] == 1 / startup.MAX_PER_GPU
    assert startup.trial_resources(spec)({"model.d_model": 32}) == {"cpu": 1, "gpu": 1.0}  # memory unknown
    assert len(startup.sweep_candidates(spec)) == 2


def test_numeric_gpu_resources_are_passed_through_and_cpu_sweeps_skip_the_warm_up(tmp_path):
    spec = load_spec(spec_file(tmp_path, 0), hooks=HOOKS)
    assert startup.trial_resources(spec) == {"cpu": 1, "gpu": 0}
    assert not startup.uses_gpus(spec) and startup.warm_sweep(spec) == {}  # no Ray call at all
    with pytest.raises(SpecError, match="sweep.resources.gpu"):
        load_spec(spec_file(tmp_path, "most"), hooks=HOOKS)
