"""hqlt's one YAML reader: a file and `key=value` overrides -> plain, unresolved containers, checked safe.

Used by the spec parser (`parse.parse_spec`) and by ``hqlt train`` (``hqlt.orchestration.configio``). Only
OmegaConf's built-in interpolation is available (`${model.d_model}`, `${oc.env:...}`): `check_safe` refuses
any key or value that would make OmegaConf/Hydra import or evaluate code (`_target_`-style instantiation,
resolvers other than OmegaConf's own, even one some module registered in this process). Errors are one-line
`SpecError`s naming the file. OmegaConf and PyYAML are imported only when a function needs them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from hqlt.blocks.validation import join

from .errors import SpecError, one_line

# OmegaConf's own resolvers; none imports or evaluates code. Custom resolvers are refused even if some module
# registered one in this process.
BUILTIN_RESOLVERS = ("oc.env", "oc.select", "oc.decode", "oc.create", "oc.deprecated", "oc.coerce",
                     "oc.dict.keys", "oc.dict.values")
INSTANTIATE_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
_RESOLVER_CALL = re.compile(r"\$\{\s*([A-Za-z_][\w.\-]*)\s*:")


def read_yaml(path, expected: str = "a mapping at the top level") -> dict:
    """The YAML file `path` as plain containers, interpolations kept as `${...}` strings. Raises `SpecError`
    (file = `path` as given): no such file, not valid YAML, or not a mapping (``expected <expected>``)."""
    from omegaconf import DictConfig, OmegaConf

    file = str(path)
    p = Path(file)
    if not p.is_file():
        raise SpecError("", "no such file", file)
    try:
        cfg = OmegaConf.load(p)  # a yaml SafeLoader: python tags cannot construct objects
    except Exception as exc:  # noqa: BLE001 — yaml/OmegaConf errors of many kinds, reported as one line
        raise SpecError("", f"not valid YAML: {one_line(str(exc))[:300]}", file) from None
    if not isinstance(cfg, DictConfig):
        raise SpecError("", f"expected {expected}", file)
    return OmegaConf.to_container(cfg, resolve=False)


def read_overrides(items: list[str], file: Optional[str] = None, example: str = "") -> dict:
    """`key.path=value` items as nested plain containers (unresolved). Raises `SpecError` naming `file` (None:
    no file in the message); `example` is shown in the message for an item without '='."""
    from omegaconf import OmegaConf

    for item in items:
        if "=" not in item or item.startswith("="):
            hint = f" (e.g. {example})" if example else ""
            raise SpecError(item, f"override must look like key.path=value{hint}", file)
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(items), resolve=False) if items else {}
    except Exception as exc:  # noqa: BLE001
        raise SpecError("", f"bad override: {one_line(str(exc))[:300]}", file) from None


def merge(a: Any, b: Any) -> Any:
    """Recursive dict merge, b on top (lists and scalars are replaced) — OmegaConf's merge on plain data."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(a[k], v) if k in a else v
        return out
    return b


def check_safe(node: Any, path: str, file: Optional[str]) -> None:
    """No key or value of the spec may make OmegaConf/Hydra import or evaluate code."""
    if isinstance(node, dict):
        for key, value in node.items():
            kp = join(path, str(key))
            if str(key) in INSTANTIATE_KEYS:
                raise SpecError(kp, f"'{key}' is not allowed: hqlt never instantiates objects from YAML; "
                                    "allowed: plain values, registry names and {name: ..., options} mappings", file)
            check_safe(value, kp, file)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_safe(value, f"{path}[{i}]", file)
    elif isinstance(node, str):
        for name in _RESOLVER_CALL.findall(node):
            if name not in BUILTIN_RESOLVERS:
                raise SpecError(path, f"resolver '{name}' is not allowed (in {node!r}); allowed: ${{key.path}} "
                                      f"interpolation and OmegaConf's built-ins {', '.join(BUILTIN_RESOLVERS)}", file)


def dump_yaml(doc: dict) -> str:
    import yaml

    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120)


__all__ = ["BUILTIN_RESOLVERS", "INSTANTIATE_KEYS", "check_safe", "dump_yaml", "merge", "read_overrides",
           "read_yaml"]
