"""Sweep start-up (orchestration/startup.py), on CPU: kernel shapes (the probe's at its target size too), the
kernel-cache warm-up's bookkeeping (in one process, and on parallel worker processes with an injected worker
function: the real warm-up is a no-op without CUDA), the memory estimate and the GPU fractions of
`sweep.resources.gpu: auto`."""
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
    assert startup.warm_kernel_cache(configs, "cpu") == {"shapes": 0, "seconds": 0.0, "skipped": 0, "errors": [],
                                                         "workers": 0, "per_shape": []}
    out = startup.warm_kernel_cache(configs, "cpu", cpu=True)  # CUDA only; cpu=True runs it here (smoke test)
    assert out["shapes"] == 2 and out["errors"] == [] and out["skipped"] == 0 and out["workers"] == 1
    assert [s["error"] for s in out["per_shape"]] == [None, None] and all(s["seconds"] >= 0 for s in out["per_shape"])
    capped = startup.warm_kernel_cache(configs, "cpu", cpu=True, max_shapes=1)
    assert capped["shapes"] == 1 and capped["skipped"] == 1


# ---- the probe's target size among the warmed shapes ------------------------------------------------------
PROBED = cfg(model__layers="F", probe={"enabled": True, "size": "340M", "seq_len": 256, "batch_tokens": 2048})


def test_the_warm_up_covers_the_probe_at_its_target_size():
    jobs, extra = startup.plan_warm_up([PROBED])
    assert extra == 0 and [job.target for job in jobs] == [True, False]  # probe shapes first: the slowest
    probe = json.loads(jobs[0].key)
    assert (probe["n_heads"], probe["head_dim"], probe["lengths"]) == (8, 128, {"probe": 256})  # 340M: d 1024, 8 heads
    assert jobs[0].runs == ((256, 8, True),)  # batch_tokens // seq_len sequences, forward + backward
    assert jobs[0].label.startswith("probe 340M F d1024 h8x128") and "fwd+bwd 8x256" in jobs[0].label
    own = json.loads(jobs[1].key)
    assert (own["n_heads"], own["head_dim"], own["lengths"][2]) == (2, 16, None)  # no own-size probe length
    # the reduced model the worker builds: the target's width and heads, one layer, the task's vocabulary
    trial = startup.trial_config(PROBED)
    task = startup.make_task(trial.task["name"], trial.task_config)
    reduced = startup._reduced_model(jobs[0], trial, task)
    assert (reduced.d_model, reduced.n_heads, reduced.n_layers, reduced.vocab_size) == (1024, 8, 1, task.vocab_size)
    # the architecture's other arms and learning rates share it; another target size does not
    same = [PROBED, cfg(model__layers="F", train__lr=3e-3, probe=PROBED["probe"])]
    assert len(startup.plan_warm_up(same)[0]) == 2
    other = cfg(model__layers="F", probe={**PROBED["probe"], "size": {"d_model": 256, "n_heads": 2}})
    assert len(startup.plan_warm_up([PROBED, other])[0]) == 3
    assert startup.plan_warm_up([PROBED, other], max_shapes=2) == (jobs, 1)


def test_no_separate_probe_shape_at_the_trials_own_size_or_without_a_probe():
    own = cfg(probe={"enabled": True, "seq_len": 64, "batch_size": 4})
    jobs, _ = startup.plan_warm_up([own])
    assert len(jobs) == 1 and not jobs[0].target and (64, 4, True) in jobs[0].runs  # the training shape has it
    off = cfg(probe={"enabled": False, "size": "340M"})
    assert [job.target for job in startup.plan_warm_up([off])[0]] == [False]
    # a target size the architecture cannot take (3 heads do not divide 1024) is left to the trial
    bad = cfg(probe={"enabled": True, "size": {"n_heads": 3}})
    assert [job.target for job in startup.plan_warm_up([bad])[0]] == [False]


# ---- the parallel warm-up (a fake worker function: the real one is a no-op without CUDA) ------------------
def fake_warm(job, device):
    """Module-level (the spawned workers import it): fails on one shape, sleeps a little on the others."""
    import time

    if json.loads(job.key).get("n_heads") == 4:
        raise RuntimeError("this shape does not compile\nsecond line")
    time.sleep(0.2)


def test_parallel_warm_up_runs_each_shape_once_and_reports_a_failing_one():
    configs = [cfg(), cfg(train__lr=3e-3), cfg(model__d_model=64), cfg(model__n_heads=4), PROBED, PROBED]
    out = startup.warm_kernel_cache(configs, "cpu", cpu=True, workers=3, warm_fn=fake_warm)
    labels = [s["label"] for s in out["per_shape"]]
    assert out["workers"] == 3 and len(labels) == len(set(labels)) == 5  # 4 trial shapes + the probe's
    assert out["shapes"] == 4 and out["skipped"] == 0
    assert len(out["errors"]) == 1 and "h4x8" in out["errors"][0]
    assert out["errors"][0].endswith("RuntimeError: this shape does not compile")
    failed = [s for s in out["per_shape"] if s["error"]]
    assert len(failed) == 1 and failed[0]["seconds"] is not None
    lines = startup.warm_report(out)
    assert len(lines) == 6 and lines[-1].startswith("kernel cache warmed: 4 kernel shapes in ")
    assert "(3 workers;" in lines[-1] and "1 failed:" in lines[-1]
    assert sum("FAILED: RuntimeError" in line for line in lines) == 1
    assert any(line.startswith("kernel cache warm-up ") and "probe 340M" in line for line in lines)


def dying_warm(job, device):
    """A worker that dies (as on a CUDA fault) on the probe's shape; out of memory on the d 64 shape."""
    import os

    if job.target:
        os._exit(3)
    if json.loads(job.key).get("head_dim") == 32:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_a_dead_worker_or_out_of_memory_retries_alone_and_the_rest_is_warmed():
    configs = [cfg(), cfg(model__d_model=64), PROBED]
    out = startup.warm_kernel_cache(configs, "cpu", cpu=True, workers=2, warm_fn=dying_warm)
    by_kind = {("probe" if s["label"].startswith("probe") else s["label"].split()[2]): s for s in out["per_shape"]}
    assert set(by_kind) == {"probe", "d32", "d64"} and len(out["per_shape"]) == 4  # the trial F shape of PROBED too
    assert by_kind["probe"]["seconds"] is None and "worker process died" in by_kind["probe"]["error"]
    assert "(alone, after a failure beside others)" in by_kind["probe"]["label"]
    assert "out of memory" in by_kind["d64"]["error"] and "(alone" in by_kind["d64"]["label"]
    assert by_kind["d32"]["error"] is None and out["shapes"] == 2 and len(out["errors"]) == 2


def test_the_time_budget_leaves_shapes_to_the_trials():
    configs = [cfg(), cfg(model__d_model=64), cfg(model__d_model=128)]
    out = startup.warm_kernel_cache(configs, "cpu", cpu=True, workers=1, warm_fn=fake_warm, time_budget_s=0.0)
    assert out["shapes"] == 0 and out["skipped"] == 3 and out["per_shape"] == []
    assert startup.warm_report(out)[-1] == "kernel cache warmed: 0 kernel shapes in 0s (3 left to the trials)"


def test_warm_workers_knob_and_default(monkeypatch):
    monkeypatch.delenv(startup.WARM_WORKERS_ENV, raising=False)
    assert startup.warm_workers_setting() is None
    monkeypatch.setenv(startup.WARM_WORKERS_ENV, "3")
    assert startup.warm_workers_setting() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(startup.WARM_WORKERS_ENV, bad)
        with pytest.raises(startup.ConfigError, match="HQLT_WARM_WORKERS: got .*allowed: an integer >= 1"):
            startup.warm_workers_setting()
    assert [startup.default_warm_workers(n, cpus=16) for n in (1, 5, 20)] == [1, 5, 8]
    assert startup.default_warm_workers(6, cpus=2) == 1 and startup.default_warm_workers(0, cpus=2) == 1


def test_autotuning_timings_take_turns(tmp_path):
    calls = []

    def real(fn, *args, **kwargs):
        calls.append(("timed", args, kwargs))
        return fn()

    bench = startup._serialized_bench(real, str(tmp_path / "autotune.lock"))
    assert bench(lambda: calls.append("run") or 1.5, quantiles=(0.5,)) == 1.5
    assert calls == ["run", ("timed", (), {"quantiles": (0.5,)}), "run"]  # compiled + run once before the lock
    assert (tmp_path / "autotune.lock").exists() and bench.hqlt_serialized


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


def test_compile_caches_live_in_the_sweep_folder_unless_the_environment_names_them(tmp_path, monkeypatch):
    from hqlt.orchestration.sweep import compile_cache_env

    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    env = compile_cache_env(tmp_path)
    assert env == {"TRITON_CACHE_DIR": str(tmp_path.resolve() / "cache" / "triton"),
                   "TORCHINDUCTOR_CACHE_DIR": str(tmp_path.resolve() / "cache" / "inductor")}
    monkeypatch.setenv("TRITON_CACHE_DIR", "/shared/triton")
    env = compile_cache_env(tmp_path)
    assert env["TRITON_CACHE_DIR"] == "/shared/triton"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path.resolve() / "cache" / "inductor")


def test_a_resumed_sweep_warms_only_the_trials_still_to_run(tmp_path):
    """`trainable.finished_configs` (trials with a final result and a seed-0 record) and `startup.remaining`: the
    warm-up of a resumed grid leaves out the points already finished, and only those."""
    from hqlt.orchestration.trainable import SeedRecords, finished_configs, run_sampled, write_json_atomic

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({"base": {**BASE, "seed": 5}, "space": {"model.mixer.kv.window": {"choice": [2, 4, 8]}},
                                         "sweep": {"name": "g", "sampler": "grid", "num_samples": 3, "seeds": 2}}))
    spec = load_spec(spec_file, hooks=HOOKS)
    configs = startup.sweep_candidates(spec)
    assert len(configs) == 3
    results = tmp_path / "results"
    assert finished_configs(results) == set() and startup.remaining(configs, set()) == configs
    objectives = [("val/acc", "max")]
    for trial_id, window, final in (("done", 4, True), ("halfway", 8, False)):  # halfway: no final result yet
        records = SeedRecords(results, trial_id)
        out = run_sampled({"model.mixer.kv.window": window}, spec=spec, objectives=objectives, seeds=2,
                          seed_aggregate="max", report=lambda m: None, records=records)
        if final:
            write_json_atomic(results / f"{trial_id}.json", out)
        else:
            (results / f"{trial_id}.seed1.json").unlink()
    finished = finished_configs(results)
    assert len(finished) == 1
    left = startup.remaining(configs, finished)
    assert sorted(c["model"]["mixer"]["kv"]["window"] for c in left) == [2, 8]
