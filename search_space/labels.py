"""Readable labels of trials: short values, run names, task labels and numbers with units.

Shared by the sweep (MLflow run names and params, `hqlt status`) and the report (tables, plots, fronts per task),
so a trial reads the same everywhere. Standard library only (used by `hqlt.reports` without torch or Ray).

    flat_params({"model": '{"d_model": 64, ...}', "train.lr": 0.001}, arms)  # model.d_model=64, ..., model=arm2
    run_name("S8-dn2-vec", {"train.lr": 0.001, "task.name": "parity"})      # 'S8-dn2-vec lr=0.001 · parity'
    format_metric("perf/train_tok_s", 2556000.0)                             # '2.56M tok/s'
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Iterable, Mapping, Optional

from .vocabulary import ARM_ID_PREFIX, BOOKKEEPING_PREFIX, TASK_PARAM_PREFIX

# Searched keys that the architecture id (`S64-dn2-vec`, `HHKH_S64-dn2-vec_T`) already shows.
ARCH_ID_KEYS = ("model.mixer", "model.layers")
MAX_VALUE_CHARS = 24


def short_value(value: Any) -> str:
    """A compact text of a searched value: 0.0012 -> '0.0012', 3e-05 -> '3e-05', True -> 'true'."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, dict)):
        value = json.dumps(value, separators=(",", ":"))
    text = str(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def decode_arm(value: Any) -> Optional[dict]:
    """The mapping of a whole-arm choice (logged and shown to Optuna as its JSON text), else None."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.startswith("{"):
        try:
            decoded = json.loads(value)
        except ValueError:
            return None
        return decoded if isinstance(decoded, dict) else None
    return None


def flatten(data: Mapping, prefix: str = "") -> dict:
    out: dict = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def arm_id(key: str, value: Any, arms: Optional[Mapping[str, Iterable[str]]] = None) -> str:
    """`arm<i>` (position in the spec's choice list of `key`, from 0), else `arm-<6 hex>` of its JSON text."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    labels = list((arms or {}).get(key, ()))
    if text in labels:
        return f"{ARM_ID_PREFIX}{labels.index(text)}"
    return f"{ARM_ID_PREFIX}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


def searched(config: Mapping) -> dict:
    """The sampled keys of a Ray trial config (sweep bookkeeping `hqlt.*` dropped)."""
    return {k: v for k, v in config.items() if not str(k).startswith(BOOKKEEPING_PREFIX)}


def flat_params(config: Mapping, arms: Optional[Mapping[str, Iterable[str]]] = None) -> dict:
    """MLflow params of a trial: every sampled key; a whole arm as its leaves (`model.mixer.kv.window`) plus its id
    under the key itself (`model` = `arm2`). A sampled key inside an arm (`model.d_model`) wins over the arm's."""
    out: dict = {}
    for key, value in config.items():
        arm = None if str(key).startswith(BOOKKEEPING_PREFIX) else decode_arm(value)
        if arm is not None:
            out.update(flatten(arm, key))
            out[key] = arm_id(key, value, arms)
    for key, value in config.items():
        if str(key).startswith(BOOKKEEPING_PREFIX) or decode_arm(value) is None:
            out[key] = value
    return out


def is_task_key(key: str) -> bool:
    return key == TASK_PARAM_PREFIX or key.startswith(TASK_PARAM_PREFIX + ".")


def task_label(values: Mapping, keys: Optional[Iterable[str]] = None) -> str:
    """The task of a trial from its searched `task.*` values: 'parity', 'mod_arith', 'parity eval_max_len=128'.
    `keys` picks which (default: every `task.*` key given, an arm's id left out when its leaves are there)."""
    if keys is None:
        keys = [k for k in values if is_task_key(k)]
        if any(k != TASK_PARAM_PREFIX for k in keys):
            keys = [k for k in keys if k != TASK_PARAM_PREFIX]
    parts = []
    for key in sorted(keys, key=lambda k: (not k.endswith(".name"), k)):
        value = values.get(key)
        arm = decode_arm(value)
        if arm is not None:  # a task arm logged as JSON (sweeps before flat params)
            parts.append(str(arm.get("name", short_value(value))))
        elif key.endswith(".name") or key == TASK_PARAM_PREFIX:
            parts.append(short_value(value))
        else:
            parts.append(f"{key.rsplit('.', 1)[-1]}={short_value(value)}")
    return " ".join(parts)


def run_name(arch: str, config: Mapping) -> str:
    """A trial's MLflow run name: its architecture id, the searched values the id does not show, its task —
    'S8-dn2-vec d_model=128 lr=0.003 · parity'."""
    values = searched(config)
    extras = []
    for key, value in values.items():
        if is_task_key(key) or decode_arm(value) is not None or key.startswith(ARCH_ID_KEYS):
            continue
        extras.append(f"{key.rsplit('.', 1)[-1]}={short_value(value)}")
    task = task_label(values)
    return " ".join([arch, *extras]) + (f" · {task}" if task else "")


# ------------------------------------------------------------------------------------------------ numbers
_UNITS = (("_tok_s", "tok/s"), ("_mb", "MB"), ("_ms", "ms"), ("_bytes", "B"), ("_s", "s"))


def metric_unit(metric: str) -> str:
    leaf = metric.rsplit("/", 1)[-1]
    for suffix, unit in _UNITS:
        if leaf.endswith(suffix):
            return unit
    return ""


def is_fraction(metric: str) -> bool:
    """Accuracies and utilisations, shown with 4 decimals."""
    leaf = metric.rsplit("/", 1)[-1].split("@", 1)[0].lower()
    return leaf == "acc" or leaf.startswith(("acc_", "accuracy")) or leaf in ("mfu", "busy_frac")


def format_number(value: Any, unit: str = "") -> str:
    """2556000 -> '2.56M', 0.5 -> '0.5', 1234 -> '1234'; with `unit` appended ('2.56M tok/s')."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "n/a" if value is None else str(value)
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        text = "inf" if v > 0 else "-inf"
    else:
        a = abs(v)
        for threshold, scale, suffix in ((1e12, 1e12, "T"), (1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
            if a >= threshold:
                text = f"{v / scale:.3g}{suffix}"
                break
        else:
            text = str(int(v)) if v.is_integer() else f"{v:.4g}"
    return f"{text} {unit}" if unit else text


def format_metric(metric: str, value: Any) -> str:
    """A metric's value with its unit: 'perf/train_tok_s' 2.556e6 -> '2.56M tok/s', 'val/acc' -> '0.9731'."""
    if is_fraction(metric):
        try:
            v = float(value)
        except (TypeError, ValueError):
            return "n/a"
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    return format_number(value, metric_unit(metric))


__all__ = ["ARCH_ID_KEYS", "arm_id", "decode_arm", "flat_params", "flatten", "format_metric", "format_number",
           "is_fraction", "is_task_key", "metric_unit", "run_name", "searched", "short_value", "task_label"]
