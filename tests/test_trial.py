"""Trainer, throughput probe, trial runner and `hqlt train` (CPU)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest
import torch

from hqlt.blocks import HybridLM
from hqlt.orchestration import trainer
from hqlt.orchestration.probe import probe_throughput
from hqlt.orchestration.tasks import make_task
from hqlt.orchestration.trial import run_trial
from hqlt.orchestration.trial_config import ProbeConfig, TrainConfig, trial_config

TINY = {
    "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "layers": "H",
              "mixer": {"kv": {"name": "softmax", "window": 4}}},
    "task": {"name": "even_pairs", "eval_size": 64, "eval_max_len": 64},
    "train": {"steps": 20, "batch_size": 16, "eval_every": 10, "eval_batch_size": 64, "warmup_steps": 2},
    "probe": {"warmup_steps": 1, "steps": 1, "seq_len": 16},
}
OBJECTIVE_KEYS = ("val/acc", "perf/train_tok_s", "perf/peak_mem_mb", "model/params", "model/fw_state_bytes",
                  "model/kv_cache_bytes")


def merged(**overrides):
    cfg = json.loads(json.dumps(TINY))
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return cfg


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(steps=100, lr=1e-2, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [trainer.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))  # rising during warm-up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then falling
    assert trainer.lr_at(100, cfg) == pytest.approx(1e-3)  # the floor at the horizon
    assert lrs[55] == pytest.approx(1e-3 + 0.5 * 9e-3, rel=1e-2)  # half-way through the cosine


def test_param_groups_exclude_vectors_from_decay():
    cfg = trial_config(TINY)
    cfg.model.vocab_size = 8
    model = HybridLM(cfg.model)
    decay, no_decay = trainer.param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_gradient_clipping_is_applied():
    cfg = trial_config(TINY)
    task = make_task("even_pairs", cfg.task_config)
    cfg.model.vocab_size = task.vocab_size
    torch.manual_seed(0)
    model = HybridLM(cfg.model)
    tcfg = TrainConfig(steps=5, lr=1e-3, grad_clip=1e-3)
    opt = trainer.make_optimizer(model, tcfg)
    batch = task.train_batch(16, np.random.default_rng(0))
    _, norm_before = trainer.train_step(model, opt, batch, tcfg, 0, torch.device("cpu"))
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert norm_before > 1e-2  # the raw gradient is far above the threshold ...
    assert float(after) == pytest.approx(1e-3, rel=1e-3)  # ... and the step used the clipped one


def test_loss_falls_on_an_easy_task():
    """MAD memorization: a fixed key→value map over 16 keys, learnable in a few dozen steps."""
    cfg = merged(task={"name": "mad_memorization", "vocab_size": 33, "seq_len": 16, "num_train_examples": 64,
                       "num_test_examples": 64},
                 model__d_model=32, train__steps=60, train__eval_every=20, train__lr=1e-2, train__log_every=5)
    reports, progress = [], []
    result = run_trial(cfg, report=reports.append, progress=lambda step, m: progress.append((step, m["train/loss"])))
    assert result.status == "completed"
    assert progress[0] == (5, pytest.approx(progress[0][1])) and progress[0][1] > 1.0  # near ln(16) at first
    assert reports[-1]["train/loss"] < 0.1 and result.metrics["val/acc"] > 0.9
    for r in reports:  # every report carries every objective key
        assert all(k in r and math.isfinite(r[k]) for k in OBJECTIVE_KEYS)


def test_formal_language_metrics_are_scaled_and_sliced():
    result = run_trial(merged())
    assert result.metrics["val/acc_scaled"] == pytest.approx((result.metrics["val/acc"] - 0.5) / 0.5)
    assert {k for k in result.metrics if k.startswith("val/acc@len_")} >= {"val/acc@len_41-64"}


def test_probe_reports_positive_figures():
    cfg = trial_config(TINY)
    cfg.model.vocab_size = 8
    model = HybridLM(cfg.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = probe_throughput(model, ProbeConfig(warmup_steps=1, steps=2, seq_len=32), cfg.train, vocab_size=8,
                           seq_len=64, device=torch.device("cpu"), flops_per_token=1e6)
    assert out["perf/train_tok_s"] > 0 and out["perf/step_ms"] > 0 and out["perf/peak_mem_mb"] > 0
    assert out["perf/probe_seq_len"] == 32
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights restored


@pytest.mark.parametrize("fault,status,needle", [("nan", "nan", "nan"), ("oom", "oom", "out of memory"),
                                                 ("raise", "failed", "injected failure")])
def test_failures_become_statuses(fault, status, needle):
    reports = []
    result = run_trial(merged(fault=fault, fault_step=3), report=reports.append)
    assert result.status == status
    assert needle in result.reason.lower()
    assert result.metrics["trial/status"] == status
    assert result.metrics["perf/train_tok_s"] > 0 and result.metrics["model/params"] > 0  # still reported
    assert reports == []  # failed before the first evaluation


def test_oom_from_torch_is_recognised(monkeypatch):
    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "train_step", boom)
    result = run_trial(merged(probe__enabled=False))
    assert result.status == "oom" and "2.00 GiB" in result.reason


def test_early_stop_at_target():
    result = run_trial(merged(train__steps=40, train__early_stop={"metric": "val/acc", "value": 0.0}))
    assert result.status == "completed" and result.metrics["step"] == 10
    assert result.metrics["trial/stopped_early"] == 1.0


def hqlt(*args, cwd):
    return subprocess.run([sys.executable, "-m", "hqlt.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_hqlt_train_end_to_end(tmp_path):
    import yaml

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    start = time.time()
    out = hqlt("train", cfg_path, "train.steps=30", "--out", tmp_path / "run", "--tracking-uri",
               f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    wall = time.time() - start
    assert out.returncode == 0, out.stderr[-2000:]
    assert wall < 120  # a hang guard, not a benchmark: ~9 s on an idle 2-core machine, 40+ s under load
    payload = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert payload["status"] == "completed" and payload["config"]["train"]["steps"] == 30
    assert [h["step"] for h in payload["history"]] == [10, 20, 30]
    assert "val/acc" in payload["metrics"] and "train" in out.stderr  # the progress bar
    cl = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = cl.search_runs([cl.get_experiment_by_name("hqlt-train").experiment_id])
    assert run.data.tags["status"] == "completed" and run.data.params["train.steps"] == "30"
    assert len(cl.get_metric_history(run.info.run_id, "val/acc")) == 3


@pytest.mark.parametrize("override,path", [("model.mixer.mix=vectr", "model.mixer.mix"),
                                           ("train.lrr=1", "train.lrr"),
                                           ("task.name=parrity", "task.name")])
def test_hqlt_train_rejects_bad_config_before_any_work(tmp_path, override, path):
    import yaml

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    out = hqlt("train", cfg_path, override, "--out", tmp_path / "run", cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and path in lines[0] and "allowed" in lines[0]
    assert not (tmp_path / "run").exists()


def test_example_configs_validate():
    from importlib.resources import files

    from hqlt.orchestration.configio import load_yaml, to_plain

    examples = sorted(p for p in files("hqlt.orchestration").joinpath("examples").iterdir() if p.name.endswith(".yaml"))
    assert len(examples) >= 6
    for path in examples:
        if path.name == "byte_lm.yaml":
            continue  # needs task.path set by the user (a local text file)
        trial_config(to_plain(load_yaml(path)))


def test_bf16_autocast_trains_on_cpu():
    """precision: bf16 autocasts the model; the pure-torch kernels run with autocast off (no bf16 solve)."""
    result = run_trial(merged(train__precision="bf16", train__steps=10))
    assert result.status == "completed", result.reason
    assert math.isfinite(result.metrics["train/loss"])


# ----------------------------------------------------------------------------- recipe train options (issue #18)
def test_cosine_horizon_beyond_the_run():
    """`cosine_steps`: the cosine reaches its floor at that step (warm-up included), so a 100k horizon stops a 20k
    run part-way down (the HQLT modular-arithmetic recipe); null is the run's own length."""
    lr, floor = 5e-3, 5e-6
    cfg = TrainConfig(steps=20000, lr=lr, warmup_steps=10000, min_lr_ratio=1e-3, cosine_steps=100000)
    assert trainer.lr_at(9999, cfg) == pytest.approx(lr)
    want = floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * 9999 / 90000))
    assert trainer.lr_at(19999, cfg) == pytest.approx(want, rel=1e-12)
    assert trainer.lr_at(19999, cfg) > 0.96 * lr                       # still near the peak at the end of the run
    assert trainer.lr_at(100000, cfg) == trainer.lr_at(150000, cfg) == pytest.approx(floor)
    same = TrainConfig(steps=300, lr=lr, warmup_steps=30, cosine_steps=300)
    default = TrainConfig(steps=300, lr=lr, warmup_steps=30)
    assert [trainer.lr_at(s, same) for s in range(300)] == [trainer.lr_at(s, default) for s in range(300)]
    with pytest.raises(Exception, match="train.cosine_steps.*> warmup_steps"):
        trial_config({"train": {"warmup_steps": 100, "cosine_steps": 100}})


def test_weight_decay_on_all_parameters():
    cfg = trial_config(TINY)
    cfg.model.vocab_size = 8
    model = HybridLM(cfg.model)
    (group,) = trainer.param_groups(model, 0.1, "all")
    assert group["weight_decay"] == 0.1 and len(group["params"]) == len(list(model.parameters()))
    tcfg = trial_config({**TINY, "train": {**TINY["train"], "weight_decay_groups": "all"}}).train
    opt = trainer.make_optimizer(model, tcfg)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1]
    assert trial_config(TINY).train.weight_decay_groups == "matrices"
    with pytest.raises(Exception, match="train.weight_decay_groups"):
        trial_config({"train": {"weight_decay_groups": "vectors"}})


@pytest.mark.parametrize("off", [0, None])
def test_no_gradient_clipping(off):
    """grad_clip 0 or null: the step uses the raw gradient (null is stored as 0)."""
    cfg = trial_config({**TINY, "train": {**TINY["train"], "grad_clip": off}})
    assert cfg.train.grad_clip == 0.0
    task = make_task("even_pairs", cfg.task_config)
    cfg.model.vocab_size = task.vocab_size
    torch.manual_seed(0)
    model = HybridLM(cfg.model)
    opt = trainer.make_optimizer(model, cfg.train)
    batch = task.train_batch(16, np.random.default_rng(0))
    _, norm = trainer.train_step(model, opt, batch, cfg.train, 0, torch.device("cpu"))
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert float(after) == pytest.approx(norm, rel=1e-6) and norm > 0


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_recipe_train_options_run_in_every_cpu_engine(engine):
    result = run_trial(merged(train__engine=engine, train__weight_decay_groups="all", train__grad_clip=None,
                              train__cosine_steps=200, train__betas=[0.9, 0.999], probe__enabled=False))
    assert result.status == "completed", result.reason
    assert result.config["train"]["cosine_steps"] == 200 and result.config["train"]["grad_clip"] == 0.0
