"""The one validator that builds typed config dataclasses from plain dicts, and `ConfigError`.

Every config in hqlt is a dataclass. `build(cls, data, path)` turns a plain mapping (from YAML, a CLI
dotlist or a sweep sample) into that dataclass, checking keys, types and allowed values, and raises
`ConfigError` naming the dotted key path and what is allowed. Checks beyond types live in each class's
`check(path)` method, so a config is validated in one place whatever built it.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Union


class ConfigError(ValueError):
    """A config value is wrong. `path` is the dotted key path (e.g. ``model.mixer.kv.window``)."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


def closest(name: str, options) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    match = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        return "a list"
    return getattr(tp, "__name__", str(tp))


def coerce(tp, value, path: str):
    """Check `value` against the annotation `tp`; return the (possibly converted) value."""
    origin = typing.get_origin(tp)
    if tp in (list, tuple, dict):  # bare annotations have no origin but are checked like list[Any] etc.
        origin = tp
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        for option in allowed:  # bool is not int here (True == 1), and 2.0 becomes the allowed 2
            if value == option and isinstance(value, bool) == isinstance(option, bool):
                return option
        raise ConfigError(path, f"got {value!r}; allowed: {', '.join(map(repr, allowed))}{closest(value, allowed)}")
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1 or all("allowed:" in e.message for e in errors):
            raise errors[-1]
        raise ConfigError(path, f"got {value!r}; expected {_type_name(tp)}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(path, f"got {value!r}; expected null")
        return None
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"got {value!r}; expected a list")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"got {value!r}; expected a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"got {value!r}; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(path, f"got {value!r}; expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"got {value!r}; expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"got {value!r}; expected a string")
        return value
    return value


def build(cls, data, path: str = ""):
    """Build dataclass `cls` from a mapping (or return `data` if it already is one), validated."""
    if isinstance(data, cls):
        obj = data
    else:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(path, f"got {data!r}; expected a mapping with keys {', '.join(f.name for f in dataclasses.fields(cls))}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        kwargs = {}
        for key, value in data.items():
            if key not in names:
                raise ConfigError(join(path, key), f"unknown key; allowed: {', '.join(names)}{closest(key, names)}")
            kwargs[key] = coerce(hints[key], value, join(path, key))
        obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(path)
    return obj


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def require(cond: bool, path: str, message: str) -> None:
    if not cond:
        raise ConfigError(path, message)


__all__ = ["ConfigError", "build", "coerce", "closest", "join", "require", "to_dict", "dataclass", "field"]
