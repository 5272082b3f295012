"""Reading YAML configs with OmegaConf: file + `key=value` overrides → plain, resolved mapping.

Only OmegaConf's built-in interpolation is available (`${model.d_model}`); no resolver that imports or
evaluates code is registered, and `_target_`-style instantiation does not exist in hqlt. The file and the
overrides are read by hqlt's one YAML reader, ``hqlt.search_space.yamlio``, which refuses both (`check_safe`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hqlt.blocks.validation import ConfigError
from hqlt.search_space.yamlio import check_safe, read_overrides, read_yaml


def load_yaml(path: str | Path) -> DictConfig:
    p = Path(path)
    plain = read_yaml(p)  # one-line SpecError (a ConfigError) naming the file
    check_safe(plain, "", str(p))
    return OmegaConf.create(plain)


def parse_overrides(overrides: Iterable[str]) -> DictConfig:
    plain = read_overrides(list(overrides))
    check_safe(plain, "", None)
    return OmegaConf.create(plain)


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
