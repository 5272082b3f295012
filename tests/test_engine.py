"""Trial engines on CPU: the static engine is the graph engine's code path without capture (orchestration/engine.py).

Checked here: padding to the static shape leaves the loss of real tokens unchanged; losses and grad norms kept on
the device and read at log points are exactly the per-step values (and match eager's); the data stream does not
depend on the engine or on the prefetch thread; a NaN is found at the next log point with the step range; the
engine that ran is recorded; `graph` off CUDA is a one-line config error naming train.engine.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hqlt.blocks import HybridLM
from hqlt.blocks.validation import ConfigError
from hqlt.orchestration import trainer
from hqlt.orchestration.engine import StaticStep, resolve_engine
from hqlt.orchestration.prefetch import BatchStream
from hqlt.orchestration.tasks import concat_batches, make_task
from hqlt.orchestration.trial import run_trial
from hqlt.orchestration.trial_config import TrainConfig, trial_config

CPU = torch.device("cpu")
TINY = {
    "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "layers": "H",
              "mixer": {"kv": {"name": "softmax", "window": 4}}},
    "task": {"name": "even_pairs", "eval_size": 32, "eval_max_len": 48},
    "train": {"steps": 12, "batch_size": 8, "eval_every": 6, "eval_batch_size": 32, "warmup_steps": 2,
              "log_every": 4},
    "probe": {"enabled": False},
}


def config(**train):
    cfg = json.loads(json.dumps(TINY))
    cfg["train"].update(train)
    return cfg


def tiny_model(task, seed: int = 0) -> HybridLM:
    cfg = trial_config(TINY)
    cfg.model.vocab_size = task.vocab_size
    torch.manual_seed(seed)
    return HybridLM(cfg.model)


@pytest.fixture(scope="module")
def task():
    return make_task("even_pairs", {k: v for k, v in TINY["task"].items() if k != "name"})


def run_steps(task, engine_name: str, steps: int, flush_at, **train):
    """Per-step losses / grad norms of `steps` steps from seed 0, flushing at the steps in `flush_at`."""
    tcfg = TrainConfig(**{**TINY["train"], "steps": steps, "engine": engine_name, **train})
    model = tiny_model(task)
    engine = trainer.make_engine(model, tcfg, CPU, seq_len=task.train_seq_len)
    rng = np.random.default_rng(0)
    losses, norms = [], []
    for step in range(steps):
        engine.step(task.train_batch(tcfg.batch_size, rng), step)
        if step + 1 in flush_at:
            new, norm = engine.flush(step + 1)
            losses += new
            norms.append(norm)
    return engine, losses, norms


# ---- static shapes ------------------------------------------------------------------------------------
def test_every_task_gives_constant_train_shapes():
    """The graph engine's static batch: every training batch of every task is (batch_size, train_seq_len)."""
    from test_tasks_base import SMALL

    for name, options in SMALL.items():
        t = make_task(name, options)
        rng = np.random.default_rng(3)
        assert {tuple(t.train_batch(5, rng).inputs.shape) for _ in range(3)} == {(5, t.train_seq_len)}, name


def test_padding_leaves_the_loss_of_real_tokens_unchanged(task):
    model = tiny_model(task).eval()
    batch = task.train_batch(8, np.random.default_rng(1))
    with torch.no_grad():
        base = trainer.lm_loss(model(batch.inputs), batch.targets)
        padded = concat_batches([batch], T=batch.inputs.shape[1] + 9)
        assert (padded.targets[:, -9:] == -100).all()
        assert torch.allclose(trainer.lm_loss(model(padded.inputs), padded.targets), base, rtol=1e-6, atol=1e-7)
        # ... and equals the loss of each example alone, cut just after its answer position (no padding at all)
        per_example = []
        for b in range(batch.size):
            a = int((batch.targets[b] != -100).nonzero().max()) + 1
            logits = model(batch.inputs[b:b + 1, :a])
            per_example.append(torch.nn.functional.cross_entropy(logits[0, a - 1:a], batch.targets[b, a - 1:a]))
    assert torch.allclose(torch.stack(per_example).mean(), base, rtol=1e-5, atol=1e-6)


def test_static_engine_pads_a_shorter_batch_into_its_buffers(task):
    tcfg = TrainConfig(**{**TINY["train"], "engine": "static"})
    engine = trainer.make_engine(tiny_model(task), tcfg, CPU, seq_len=task.train_seq_len + 5)
    batch = task.train_batch(8, np.random.default_rng(0))
    engine.load(batch)
    T = batch.inputs.shape[1]
    assert torch.equal(engine.inputs[:, :T], batch.inputs) and (engine.inputs[:, T:] == 0).all()
    assert torch.equal(engine.targets[:, :T], batch.targets) and (engine.targets[:, T:] == -100).all()
    with pytest.raises(ValueError, match="shape"):
        engine.load(task.train_batch(4, np.random.default_rng(0)))


# ---- device-side metrics ------------------------------------------------------------------------------
def test_device_accumulation_equals_per_step_values(task):
    every, per_step_norms = run_steps(task, "static", 10, flush_at=set(range(1, 11)))[1:]
    engine, sparse, sparse_norms = run_steps(task, "static", 10, flush_at={4, 8, 10})
    assert sparse == every and len(every) == 10  # the same values, read at 3 points instead of 10
    assert sparse_norms == [per_step_norms[3], per_step_norms[7], per_step_norms[9]]
    assert engine.history() == (every, per_step_norms)
    # and the values are eager's: the first step exactly (same weights, same batch), later ones to float rounding
    _, eager, eager_norms = run_steps(task, "eager", 10, flush_at=set(range(1, 11)))
    assert every[0] == eager[0] and per_step_norms[0] == pytest.approx(eager_norms[0], rel=1e-6)
    assert np.allclose(every, eager, rtol=1e-4) and np.allclose(per_step_norms, eager_norms, rtol=1e-3)


def test_static_engine_clips_decays_and_follows_the_schedule(task):
    tcfg = TrainConfig(**{**TINY["train"], "engine": "static", "grad_clip": 1e-3, "steps": 5})
    model = tiny_model(task)
    engine = trainer.make_engine(model, tcfg, CPU, seq_len=task.train_seq_len)
    groups = engine.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [tcfg.weight_decay, 0.0]
    assert [len(g["params"]) for g in groups] == [len(g["params"]) for g in trainer.param_groups(model, 0.1)]
    rng = np.random.default_rng(0)
    for step in range(3):
        engine.step(task.train_batch(8, rng), step)
        assert float(engine.lr) == pytest.approx(trainer.lr_at(step, tcfg), rel=1e-6)
    _, norm = engine.flush(3)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in engine.params if p.grad is not None]))
    assert norm > 1e-2 and float(clipped) == pytest.approx(1e-3, rel=1e-3)


def test_trainer_reports_the_same_window_means_for_both_engines():
    reports = {}
    for engine in ("eager", "static"):
        seen = []
        result = run_trial(config(engine=engine), progress=lambda step, m: seen.append((step, m["train/loss"]))
                           if "train/loss" in m else None)  # (calls without it announce a phase)
        assert result.status == "completed", result.reason
        reports[engine] = (seen, result.metrics)
    (eager, m_eager), (static, m_static) = reports["eager"], reports["static"]
    assert [s for s, _ in eager] == [s for s, _ in static] == [4, 6, 8, 12]
    assert np.allclose([v for _, v in eager], [v for _, v in static], rtol=1e-4)
    assert m_static["train/grad_norm"] == pytest.approx(m_eager["train/grad_norm"], rel=1e-3)
    assert m_static["trial/engine"] == "static" and m_static["train/cuda_graph"] == 0.0
    assert m_eager["trial/engine"] == "eager"


# ---- data --------------------------------------------------------------------------------------------
def test_data_stream_is_identical_across_engines_and_prefetching(monkeypatch):
    seen = {}

    class Spy(BatchStream):
        def next(self):
            batch = super().next()
            seen.setdefault(key, []).append((batch.inputs.clone(), batch.targets.clone()))
            return batch

    monkeypatch.setattr(trainer, "BatchStream", Spy)
    for key in ("eager", "static"):
        assert run_trial(config(engine=key, steps=6)).status == "completed"
    task = make_task("even_pairs", {k: v for k, v in TINY["task"].items() if k != "name"})
    rng = np.random.default_rng([0, 0])  # seed 0: data and order seeds 0
    direct = [task.train_batch(8, rng) for _ in range(6)]
    for key in ("eager", "static"):
        assert len(seen[key]) == 6
        for (x, y), b in zip(seen[key], direct):
            assert torch.equal(x, b.inputs) and torch.equal(y, b.targets)


@pytest.mark.parametrize("name,options", [("mod_arith", {"eval_size": 8}),
                                          ("mqar", {"vocab_size": 128, "seq_len": 64, "num_kv_pairs": 4, "eval_size": 8,
                                                    "train": [{"seq_len": 32, "num_kv_pairs": 2},
                                                              {"seq_len": 64, "num_kv_pairs": 4}]})])
def test_prefetch_thread_gives_the_synchronous_stream(name, options):
    task = make_task(name, options)
    sync = list(BatchStream(task, 16, np.random.default_rng(5), count=7, device=CPU, depth=0))
    with BatchStream(task, 16, np.random.default_rng(5), count=7, device=CPU, depth=2) as stream:
        threaded = list(stream)
    assert len(sync) == len(threaded) == 7
    for a, b in zip(sync, threaded):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)


def test_prefetch_thread_hands_errors_over_and_stops():
    class Boom:
        def __init__(self):
            self.calls = 0

        def stream_state(self, rng):
            return {}

        def train_batch(self, batch_size, rng):
            self.calls += 1
            if self.calls == 3:
                raise ValueError("generator broke")
            return concat_batches([make_task("parity", {"eval_size": 4}).train_batch(batch_size, rng)])

    stream = BatchStream(Boom(), 4, np.random.default_rng(0), count=10, device=CPU, depth=1)
    stream.next(), stream.next()
    with pytest.raises(ValueError, match="generator broke"):
        stream.next()
    stream.close()
    blocked = BatchStream(make_task("parity", {"eval_size": 4}), 4, np.random.default_rng(0), count=100, device=CPU,
                          depth=1)
    blocked.next()
    blocked.close()  # the producer was blocked on a full queue
    assert blocked._thread is None and blocked.closed
    with pytest.raises(StopIteration):
        blocked.next()


# ---- failures ----------------------------------------------------------------------------------------
def test_nan_is_found_at_the_next_log_point_with_the_step_range():
    result = run_trial(config(engine="static", eval_every=12) | {"fault": "nan", "fault_step": 6})
    assert result.status == "nan"
    assert "at step 6" in result.reason and "steps 5-8" in result.reason and "static engine" in result.reason
    assert result.metrics["train/nan_step"] == 6 and result.metrics["step"] == 8
    assert result.metrics["trial/engine"] == "static"
    # eager still stops at the step itself
    eager = run_trial(config(engine="eager", eval_every=12) | {"fault": "nan", "fault_step": 6})
    assert eager.status == "nan" and eager.reason.endswith("at step 6") and eager.metrics["step"] == 6


@pytest.mark.parametrize("fault,status", [("raise", "failed"), ("oom", "oom")])
def test_host_faults_reach_the_static_engine(fault, status):
    result = run_trial(config(engine="static") | {"fault": fault, "fault_step": 2})
    assert result.status == status and "step 2" in result.reason


def test_graph_engine_off_cuda_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as err:
        trial_config(config(engine="graph") | {"device": "cpu"})
    assert err.value.path == "train.engine" and "allowed" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="allowed on cpu: 'auto', 'eager', 'static'"):
        resolve_engine("graph", "cpu")
    with pytest.raises(ConfigError, match="train.engine"):
        trial_config(config(engine="grph"))
    assert resolve_engine("auto", "cpu") == "eager" and resolve_engine("auto", "cuda") == "graph"
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device"):
        StaticStep(None, [], TrainConfig(), CPU, batch_shape=(1, 1), schedule=[1e-3], loss_fn=None, autocast=None,
                   capture=True)
    if not torch.cuda.is_available():  # device: auto resolves at run time: the trial fails with the same message
        result = run_trial(config(engine="graph"))
        assert result.status == "failed" and "train.engine" in result.reason


def test_static_engine_with_bf16_autocast_trains():
    result = run_trial(config(engine="static", precision="bf16", steps=4, eval_every=4))
    assert result.status == "completed", result.reason
    assert math.isfinite(result.metrics["train/loss"]) and result.metrics["trial/engine"] == "static"


def test_engine_benchmark_runs_tiny(tmp_path):
    """Smoke test of `python -m hqlt.benchmarks.engine` (a tiny CPU run; nothing is timed against a bound)."""
    from hqlt.benchmarks import engine as bench

    out = tmp_path / "engine.json"
    rows = bench.main(["--tiny", "--arms", "transformer", "--warmup", "1", "--steps", "2", "--json", str(out)])
    assert [r["engine"] for r in rows] == ["eager", "static"] and all(r["loop_ms"] > 0 for r in rows)
    assert json.loads(out.read_text())["results"][1]["engine"] == "static"
    # the GPU kernel column sums the device-side events of a profile (kernels apart from memcpy / memset)
    from types import SimpleNamespace as NS

    def event(kind, name, us):
        return NS(device_type=kind, name=name, time_range=NS(elapsed_us=lambda: us))

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    prof = NS(events=lambda: [event(cuda, "gemm", 1000.0), event(cuda, "Memcpy HtoD", 50.0), event(cpu, "aten::mm", 9.0)])
    assert bench.kernel_ms(prof, 2) == (0.5, 0.025)
