"""The torch-side checks the search space needs, as module-level functions (injected into hqlt.search_space).

    from hqlt.orchestration.space_hooks import HOOKS
    spec = load_spec("space.yaml", overrides, hooks=HOOKS)
    space_fn = compile_space(spec, HOOKS)

- `check_trial(plain)`: `trial_config(plain)`; raises ConfigError naming the dotted path;
- `estimate_trial(plain)`: validates too, then the analytic sizes {"model/params", "model/fw_state_bytes",
  "model/kv_cache_bytes", "model/flops_per_token"} at the task's sequence length, with the task's vocab_size
  when ``model.vocab_size`` is 0 — exactly what the trial runner reports (both name them with `model_metrics`);
- `config_paths(plain)`: every dotted key path the trial config schema knows for `plain` (dataclass fields, the
  named registry parts' options, the named task's options) — what a space may sample.

They are plain module-level functions, so a compiled space holding them pickles (by qualified name). Task
objects are built once per distinct task config and cached: every registered task's constructor is cheap (data
is generated lazily; byte_lm only checks its file and memory-maps it).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from functools import lru_cache
from typing import Any, Iterable

from hqlt.blocks.estimators import Estimate, estimate
from hqlt.blocks.model_schema import MixerConfig
from hqlt.blocks.registry import REGISTRIES
from hqlt.search_space.hooks import Hooks
from hqlt.search_space.vocabulary import FLOPS_PER_TOKEN, FW_STATE_BYTES, KV_CACHE_BYTES, PARAMS

from .tasks import TASKS, make_task
from .trial_config import TrialConfig, trial_config


def check_trial(plain: dict) -> None:
    """Raise ConfigError (dotted key path, allowed values) if `plain` is not a valid trial config."""
    trial_config(plain)


@lru_cache(maxsize=256)
def _task_dims(name: str, options_json: str) -> tuple[int, int]:
    task = make_task(name, json.loads(options_json), "task")
    return int(task.vocab_size), int(task.seq_len)


def task_dims(task: dict) -> tuple[int, int]:
    """(vocab_size, seq_len) of a task mapping {name: ..., options} (cached per distinct config)."""
    options = {k: v for k, v in task.items() if k != "name"}
    return _task_dims(task["name"], json.dumps(options, sort_keys=True, default=str))


def estimate_trial(plain: dict) -> dict:
    """Validate `plain` and return its analytic model sizes (what the trial runner reports as model/*)."""
    cfg = trial_config(plain)
    vocab, seq_len = task_dims(cfg.task)
    model = cfg.model
    if model.vocab_size == 0:
        model.vocab_size = vocab
    return model_metrics(estimate(model, seq_len))


def model_metrics(est: Estimate) -> dict:
    """The metric names of an analytic estimate's fields (the one mapping; `hqlt.blocks` knows no metrics)."""
    return {PARAMS: est.params, FW_STATE_BYTES: est.fw_state_bytes, KV_CACHE_BYTES: est.kv_cache_bytes,
            FLOPS_PER_TOKEN: est.flops_per_token}


def _field_paths(cls: type, prefix: str) -> Iterable[str]:
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        path = f"{prefix}.{f.name}" if prefix else f.name
        yield path
        tp = _hints(cls).get(f.name)
        if dataclasses.is_dataclass(tp):
            yield from _field_paths(tp, path)


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 — unresolvable annotations: no nested fields
        return {}


def _part_name(spec: Any) -> Any:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict):
        return spec.get("name")
    return None


def config_paths(plain: dict) -> list[str]:
    """Dotted key paths of the trial config schema for `plain` (unknown names contribute nothing; never raises)."""
    paths = set(_field_paths(TrialConfig, ""))
    model = plain.get("model") if isinstance(plain.get("model"), dict) else {}
    mixer = model.get("mixer") if isinstance(model.get("mixer"), dict) else {}
    default_mixer = MixerConfig()
    for kind, registry in REGISTRIES.items():
        spec = mixer.get(kind, getattr(default_mixer, kind))
        name = _part_name(spec)
        base = f"model.mixer.{kind}"
        if not isinstance(name, str) or name not in registry.names():
            continue
        paths.add(f"{base}.name")
        entry = registry.get(name)
        if dataclasses.is_dataclass(entry.config):
            paths.update(_field_paths(entry.config, base))
    task = plain.get("task") if isinstance(plain.get("task"), dict) else {"name": "parity"}
    name = task.get("name")
    paths.add("task.name")
    if isinstance(name, str) and name in TASKS:
        paths.update(_field_paths(TASKS[name].config, "task"))
    return sorted(paths)


HOOKS = Hooks(check=check_trial, estimate=estimate_trial, paths=config_paths)

__all__ = ["HOOKS", "check_trial", "config_paths", "estimate_trial", "model_metrics", "task_dims"]
