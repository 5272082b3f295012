"""Task registry: name -> (config dataclass, task class, short id).

    @register_task("parity", ParityConfig, "par")
    class Parity(FormalLanguageTask): ...

``make_task(name, cfg, path)`` validates `cfg` (a mapping or the config dataclass) with
``hqlt.blocks.validation.build`` and constructs the task; a wrong key or value raises ``ConfigError`` naming the
dotted path (``task.train_max_len``), an unknown task name lists the registered names.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

from hqlt.blocks.validation import ConfigError, build, closest, join

from .base import Task


class TaskEntry(NamedTuple):
    config: type  # the config dataclass
    cls: type  # the Task subclass
    short: str  # short id for run names


TASKS: dict[str, TaskEntry] = {}


def register_task(name: str, config: type, short: str):
    """Class decorator: register a Task subclass under `name` with its config dataclass and short id."""

    def deco(cls):
        if name in TASKS:
            raise ValueError(f"task '{name}' is registered twice")
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"@register_task('{name}') decorates a Task subclass, got {cls!r}")
        cls.name = name
        cls.short_id = short
        TASKS[name] = TaskEntry(config, cls, short)
        return cls

    return deco


def task_names() -> list[str]:
    return sorted(TASKS)


def get_entry(name: Any, path: str = "task") -> TaskEntry:
    if not isinstance(name, str) or name not in TASKS:
        raise ConfigError(join(path, "name"),
                          f"unknown task {name!r}; allowed: {', '.join(task_names())}{closest(name, task_names())}")
    return TASKS[name]


def task_config(name: str, cfg: Mapping | Any = None, path: str = "task"):
    """Validate the options of task `name` into its config dataclass (no data generated)."""
    entry = get_entry(name, path)
    if cfg is not None and not isinstance(cfg, (Mapping, entry.config)):
        raise ConfigError(path, f"got a {type(cfg).__name__}; expected a mapping or {entry.config.__name__} for task '{name}'")
    return build(entry.config, cfg, path)


def make_task(name: str, cfg: Mapping | Any = None, path: str = "task") -> Task:
    """Build the task `name` from its options `cfg` (mapping without 'name', or the config dataclass)."""
    entry = get_entry(name, path)
    return entry.cls(task_config(name, cfg, path), path)


def task_from_dict(spec: Mapping, path: str = "task") -> Task:
    """`{name: parity, train_max_len: 40, ...}` -> Task."""
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(join(path, "name"), f"missing; allowed: {', '.join(task_names())}")
    return make_task(spec["name"], {k: v for k, v in spec.items() if k != "name"}, path)


__all__ = ["TASKS", "TaskEntry", "get_entry", "make_task", "register_task", "task_config", "task_from_dict", "task_names"]
