"""The config of one trial: model + task + train + probe + seeds, validated into typed dataclasses.

The same plain mapping is what `hqlt train CONFIG.yaml` reads and what a sweep samples into; the YAML
file is authoritative (no CLI defaults override it — only explicit `key=value` overrides do).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional

from hqlt.blocks import ModelConfig
from hqlt.blocks.sizes import size_fields
from hqlt.blocks.validation import build, join, require
from hqlt.search_space.vocabulary import TEST_PREFIX, VAL_ACC, VAL_PREFIX

from .tasks import TASKS, task_config


@dataclass
class EarlyStopConfig:
    metric: str = VAL_ACC
    value: Optional[float] = None  # stop once metric >= value (null: never)

    def check(self, path: str) -> None:
        require(not self.metric.startswith(TEST_PREFIX), join(path, "metric"),
                f"got {self.metric!r}; allowed: a validation (val/...) or training metric: the test set is scored "
                f"once, after training")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at step cosine_steps
    # The step at which the cosine reaches its floor (counted from step 0, warm-up included); null = steps. A
    # horizon beyond the run stops it part-way down the cosine (the HQLT modular-arithmetic recipe: 100k at 20k steps).
    cosine_steps: Optional[int] = None
    weight_decay: float = 0.1
    # Which parameters decay: matrices and embeddings only (vectors, scalars, norm gains do not), or all of them
    # (torch's AdamW over model.parameters(), as the HQLT and Zoology training scripts do).
    weight_decay_groups: Literal["matrices", "all"] = "matrices"
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: Optional[float] = 1.0  # 0 or null disables clipping (null is stored as 0)
    eval_every: int = 200
    eval_batch_size: int = 256
    log_every: int = 10
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    # auto: graph on CUDA (falls back to static if capture fails), eager elsewhere; static: graph's code path
    # uncaptured (any device); graph: CUDA only (orchestration/engine.py)
    engine: Literal["auto", "eager", "static", "graph"] = "auto"
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    # The weights the test set scores: those at the end of training, or those of the best validation evaluation
    # (by checkpoint_metric; null: val/acc, val/loss for language modelling). orchestration/selection.py.
    checkpoint: Literal["final", "best_val"] = "final"
    checkpoint_metric: Optional[str] = None

    def check(self, path: str) -> None:
        for key in ("steps", "batch_size", "eval_every", "eval_batch_size", "log_every"):
            require(getattr(self, key) >= 1, join(path, key), f"got {getattr(self, key)}; allowed: an integer >= 1")
        require(self.lr > 0, join(path, "lr"), f"got {self.lr}; allowed: > 0")
        require(self.warmup_steps >= 0, join(path, "warmup_steps"), f"got {self.warmup_steps}; allowed: >= 0")
        require(0 <= self.min_lr_ratio <= 1, join(path, "min_lr_ratio"), f"got {self.min_lr_ratio}; allowed: 0..1")
        require(self.cosine_steps is None or self.cosine_steps > self.warmup_steps, join(path, "cosine_steps"),
                f"got {self.cosine_steps}; allowed: an integer > warmup_steps ({self.warmup_steps}), or null (= steps)")
        require(self.weight_decay >= 0, join(path, "weight_decay"), f"got {self.weight_decay}; allowed: >= 0")
        if self.grad_clip is None:
            self.grad_clip = 0.0
        require(self.grad_clip >= 0, join(path, "grad_clip"), f"got {self.grad_clip}; allowed: >= 0 (0 or null = off)")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), join(path, "betas"),
                f"got {self.betas}; allowed: two numbers in [0, 1)")
        require(self.checkpoint_metric is None or self.checkpoint_metric.startswith(VAL_PREFIX),
                join(path, "checkpoint_metric"),
                f"got {self.checkpoint_metric!r}; allowed: a validation metric (val/...), or null")


@dataclass
class ProbeConfig:
    """The throughput probe (orchestration/probe.py, cost.py). `probe: 340M` is short for `probe: {size: 340M}`."""

    enabled: bool = True
    warmup_steps: int = 3  # absorb compilation / autotuning before timing
    steps: int = 5
    batch_size: Optional[int] = None  # null: batch_tokens // seq_len when batch_tokens is set, else train.batch_size
    batch_tokens: Optional[int] = None  # tokens per probe step (batch_size = max(1, batch_tokens // seq_len))
    seq_len: Optional[int] = None  # null: the task's sequence length
    # The size the probe measures the trial's architecture at: null (the trial's own model), a preset
    # (340M, 1.3B: hqlt.blocks.sizes) or {d_model, n_layers, n_heads, vocab_size} (a key left out: the trial's).
    size: Any = None
    # On a GPU in a sweep: other trials on the card pause at their next step boundary while this probe measures
    # (the probes of a card always take turns). false: only the probes take turns; the value is labelled contended.
    exclusive: bool = True
    cache: bool = True  # in a sweep: measure once per architecture, reuse it (sweep folder, probes/)
    lock_timeout_s: float = 1800.0  # waiting longer for the card measures anyway, labelled contended

    def check(self, path: str) -> None:
        require(self.warmup_steps >= 0, join(path, "warmup_steps"), f"got {self.warmup_steps}; allowed: >= 0")
        require(self.steps >= 1, join(path, "steps"), f"got {self.steps}; allowed: >= 1")
        for key in ("batch_size", "seq_len", "batch_tokens"):
            v = getattr(self, key)
            require(v is None or v >= 1, join(path, key), f"got {v}; allowed: >= 1 or null")
        require(self.batch_size is None or self.batch_tokens is None, join(path, "batch_tokens"),
                f"got batch_tokens {self.batch_tokens} and batch_size {self.batch_size}; allowed: one of them")
        require(self.lock_timeout_s >= 0, join(path, "lock_timeout_s"), f"got {self.lock_timeout_s}; allowed: >= 0")
        if self.size is not None:
            size_fields(self.size, None, join(path, "size"))


@dataclass
class TrialConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: Any = field(default_factory=lambda: {"name": "parity"})
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    seed: int = 0
    data_seed: Optional[int] = None  # null: seed  (training data stream and fixed datasets)
    model_seed: Optional[int] = None  # null: seed  (initial weights)
    order_seed: Optional[int] = None  # null: seed  (order of fixed training sets)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    name: Optional[str] = None
    # Fault injection for testing the failure paths end to end (also inside Ray workers):
    # at train step `fault_step` raise an error, produce a NaN loss, or raise a CUDA-style OOM.
    fault: Optional[Literal["raise", "nan", "oom"]] = None
    fault_step: int = 1

    def check(self, path: str) -> None:
        task = self.task if isinstance(self.task, dict) else None
        require(task is not None and "name" in task, join(path, "task.name"),
                f"missing; allowed: {', '.join(sorted(TASKS))}")
        self.task_config = task_config(task["name"], {k: v for k, v in task.items() if k != "name"}, join(path, "task"))
        require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), join(path, "device"),
                f"got {self.device!r}; allowed: auto, cpu, cuda, cuda:N")
        require(not (self.train.engine == "graph" and self.device == "cpu"), join(path, "train.engine"),
                "got 'graph' with device: cpu (CUDA graphs need a CUDA device); allowed on cpu: 'auto', 'eager', 'static'")

    def seeds(self) -> dict:
        pick = lambda s: self.seed if s is None else s  # noqa: E731
        return {"data": pick(self.data_seed), "model": pick(self.model_seed), "order": pick(self.order_seed)}


def trial_config(data, path: str = "") -> TrialConfig:
    if isinstance(data, dict) and isinstance(data.get("probe"), str):  # `probe: 340M`
        data = {**data, "probe": {"size": data["probe"]}}
    return build(TrialConfig, data, path)


def seed_config(plain: dict, i: int) -> dict:
    """The plain config of seed i of a plain trial config: a trial trains seeds `seed`, `seed`+1, ... in turn."""
    return {**plain, "seed": int(plain.get("seed", 0)) + i}


def config_hash(data: dict) -> str:
    """Stable short hash of a plain config mapping (identifies a trial's exact config)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def plain(cfg: TrialConfig) -> dict:
    return asdict(cfg)
