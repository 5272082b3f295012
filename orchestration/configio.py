"""Reading YAML configs with OmegaConf: file + `key=value` overrides → plain, resolved mapping.

Only OmegaConf's built-in interpolation is available (`${model.d_model}`); no resolver that imports or
evaluates code is registered, and `_target_`-style instantiation does not exist in hqlt.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hqlt.blocks.configs import ConfigError


def load_yaml(path: str | Path) -> DictConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("", f"{p}: no such file")
    try:
        cfg = OmegaConf.load(p)
    except Exception as exc:  # yaml.YAMLError and friends: one line, naming the file
        first = str(exc).strip().splitlines()
        raise ConfigError("", f"{p}: not valid YAML: {' '.join(first[:3])}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError("", f"{p}: expected a mapping at the top level")
    return cfg


def parse_overrides(overrides: Iterable[str]) -> DictConfig:
    items = list(overrides)
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ConfigError(item, "override must look like key.path=value")
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as exc:
        raise ConfigError("", f"bad override: {str(exc).splitlines()[0]}") from None


def merge_overrides(cfg: DictConfig, overrides: Iterable[str]) -> DictConfig:
    """Merge `key=value` overrides on top (validation of the result names unknown keys precisely)."""
    return OmegaConf.merge(cfg, parse_overrides(overrides))


def to_plain(cfg: DictConfig, path_prefix: str = "") -> dict:
    """Resolve interpolations and return plain Python containers (what Ray/Optuna/MLflow need)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"{path_prefix}{key}", f"cannot resolve: {msg}") from None
