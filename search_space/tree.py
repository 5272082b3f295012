"""Dotted key paths over plain nested dicts, and `materialize`: base + sampled values -> resolved trial config.

Interpolation (`${model.d_model}`) in base is resolved only here, after the sampled values are set, so derived
values follow sampled ones. The common case — whole-string references to absolute key paths — is resolved by
a small pure-Python resolver (microseconds; validation materialises thousands of candidates); anything else
(string concatenation, OmegaConf's built-in resolvers, escapes) goes through OmegaConf itself. Both give the
same result (a test compares them).
"""
from __future__ import annotations

import copy
import re
from typing import Any, Iterable, Mapping

from hqlt.blocks.validation import ConfigError, join

MISSING = "???"
_WHOLE = re.compile(r"^\$\{([A-Za-z_][\w\-]*(?:\.[\w\-]+)*)\}$")


def flatten_paths(obj: Any, prefix: str = "") -> list[str]:
    """Every node path of nested dicts (intermediate mappings included; lists are leaves)."""
    out = []
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            path = join(prefix, str(key))
            out.append(path)
            out.extend(flatten_paths(value, path))
    return out


def flatten_values(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted leaf path: value} of nested dicts (lists are leaves)."""
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping) and obj:
        for key, value in obj.items():
            out.update(flatten_values(value, join(prefix, str(key))))
    elif prefix:
        out[prefix] = obj
    return out


def get_path(obj: Any, path: str, default: Any = KeyError) -> Any:
    node = obj
    for part in path.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif default is KeyError:
            raise KeyError(path)
        else:
            return default
    return node


def has_path(obj: Any, path: str) -> bool:
    marker = object()
    return get_path(obj, path, marker) is not marker


def set_path(cfg: dict, path: str, value: Any) -> None:
    """Set `path` in nested dicts, creating mappings on the way.

    A registry part given by name (``kv: softmax``) becomes ``{name: softmax}`` when one of its options is set
    (``model.mixer.kv.window``), matching the registries' `name or {name: ..., options}` convention.
    """
    parts = path.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str):
            child = node[part] = {"name": child}
        elif not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), f"got {child!r}; cannot set {path} inside a non-mapping value")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def _scan(obj: Any) -> tuple[bool, bool]:
    """(has any interpolation, every interpolation is a whole-string absolute reference)."""
    if isinstance(obj, str):
        if "${" not in obj and "\\$" not in obj:
            return False, True
        return True, bool(_WHOLE.match(obj))
    items = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, list) else ()
    any_i, simple = False, True
    for v in items:
        a, s = _scan(v)
        any_i, simple = any_i or a, simple and s
    return any_i, simple


def _fast_resolve(cfg: dict) -> dict:
    def lookup(target: str, stack: tuple) -> Any:
        if target in stack:
            raise ConfigError(target, f"interpolation cycle: {' -> '.join(stack + (target,))}")
        node: Any = cfg
        walked = []
        for part in target.split("."):
            if isinstance(node, str) and _WHOLE.match(node):
                node = lookup(_WHOLE.match(node).group(1), stack + (target,))
            if not (isinstance(node, Mapping) and part in node):
                raise ConfigError(stack[-1] if stack else target,
                                  f"interpolation ${{{target}}}: no key '{join('.'.join(walked), part)}' in the trial config")
            walked.append(part)
            node = node[part]
        return resolve(node, stack + (target,), target)

    def resolve(node: Any, stack: tuple, here: str) -> Any:
        if isinstance(node, str):
            if node == MISSING:
                raise ConfigError(here, "missing value (???); set it in base or sample it in space")
            m = _WHOLE.match(node)
            return lookup(m.group(1), stack + ((here,) if here not in stack else ())) if m else node
        if isinstance(node, Mapping):
            return {k: resolve(v, stack, join(here, str(k))) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v, stack, f"{here}[{i}]") for i, v in enumerate(node)]
        return node

    return resolve(cfg, (), "")


def _omegaconf_resolve(cfg: dict) -> dict:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(OmegaConf.create(cfg), resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = str(getattr(exc, "full_key", "") or "")
        raise ConfigError(key, f"cannot resolve: {str(exc).splitlines()[0]}") from None


def _has_missing(obj: Any) -> str | None:
    for path, value in flatten_values(obj).items():
        if value == MISSING:
            return path
        if isinstance(value, list) and MISSING in [v for v in value if isinstance(v, str)]:
            return path
    return None


def resolve_config(cfg: dict) -> dict:
    """Resolve `${...}` interpolations of a plain config (returns a new plain dict)."""
    any_interp, simple = _scan(cfg)
    if not any_interp:
        missing = _has_missing(cfg)
        if missing is not None:
            raise ConfigError(missing, "missing value (???); set it in base or sample it in space")
        return copy.deepcopy(cfg)
    return _fast_resolve(cfg) if simple else _omegaconf_resolve(cfg)


def apply(base: Mapping, sampled: Mapping[str, Any]) -> dict:
    """base with the flat {dotted path: value} mapping set in it (unresolved); parents are set before children."""
    cfg = copy.deepcopy(dict(base))
    for path in sorted(sampled, key=lambda p: p.count(".")):
        set_path(cfg, path, sampled[path])
    return cfg


def materialize_base(base: Mapping, sampled: Mapping[str, Any]) -> dict:
    return resolve_config(apply(base, sampled))


def children(paths: Iterable[str], prefix: str) -> list[str]:
    """Names of the direct children of `prefix` among dotted `paths` ('' = top level)."""
    depth = prefix.count(".") + 1 if prefix else 0
    out = set()
    for p in paths:
        if prefix and not p.startswith(prefix + "."):
            continue
        parts = p.split(".")
        if len(parts) > depth:
            out.add(parts[depth])
    return sorted(out)


__all__ = ["MISSING", "apply", "children", "flatten_paths", "flatten_values", "get_path", "has_path",
           "materialize_base", "resolve_config", "set_path"]
