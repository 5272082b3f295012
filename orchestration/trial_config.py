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
from hqlt.blocks.configs import build, join, require

from .tasks import TASKS, task_config


@dataclass
class EarlyStopConfig:
    metric: str = "val/acc"
    value: Optional[float] = None  # stop once metric >= value (null: never)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 200
    eval_batch_size: int = 256
    log_every: int = 10
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)

    def check(self, path: str) -> None:
        for key in ("steps", "batch_size", "eval_every", "eval_batch_size", "log_every"):
            require(getattr(self, key) >= 1, join(path, key), f"got {getattr(self, key)}; allowed: an integer >= 1")
        require(self.lr > 0, join(path, "lr"), f"got {self.lr}; allowed: > 0")
        require(self.warmup_steps >= 0, join(path, "warmup_steps"), f"got {self.warmup_steps}; allowed: >= 0")
        require(0 <= self.min_lr_ratio <= 1, join(path, "min_lr_ratio"), f"got {self.min_lr_ratio}; allowed: 0..1")
        require(self.weight_decay >= 0, join(path, "weight_decay"), f"got {self.weight_decay}; allowed: >= 0")
        require(self.grad_clip >= 0, join(path, "grad_clip"), f"got {self.grad_clip}; allowed: >= 0 (0 = off)")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), join(path, "betas"),
                f"got {self.betas}; allowed: two numbers in [0, 1)")


@dataclass
class ProbeConfig:
    enabled: bool = True
    warmup_steps: int = 3  # absorb compilation / autotuning before timing
    steps: int = 5
    batch_size: Optional[int] = None  # null: train.batch_size
    seq_len: Optional[int] = None  # null: the task's sequence length

    def check(self, path: str) -> None:
        require(self.warmup_steps >= 0, join(path, "warmup_steps"), f"got {self.warmup_steps}; allowed: >= 0")
        require(self.steps >= 1, join(path, "steps"), f"got {self.steps}; allowed: >= 1")
        for key in ("batch_size", "seq_len"):
            v = getattr(self, key)
            require(v is None or v >= 1, join(path, key), f"got {v}; allowed: >= 1 or null")


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

    def seeds(self) -> dict:
        pick = lambda s: self.seed if s is None else s  # noqa: E731
        return {"data": pick(self.data_seed), "model": pick(self.model_seed), "order": pick(self.order_seed)}


def trial_config(data, path: str = "") -> TrialConfig:
    return build(TrialConfig, data, path)


def config_hash(data: dict) -> str:
    """Stable short hash of a plain config mapping (identifies a trial's exact config)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def plain(cfg: TrialConfig) -> dict:
    return asdict(cfg)
