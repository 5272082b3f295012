"""Reference model sizes and re-sizing a model config to one: the same architecture at another size.

    from hqlt.blocks import model_config, resized
    big = resized(model_config({"d_model": 64, "layers": "HHKH", ...}), "340M")   # d 1024, 24 layers, 8 heads

`SIZE_PRESETS` are the 340M and 1.3B language models of the HQLT paper (docs/hqlt-math.md §6.1): 24 layers,
vocab 32000, D = 1024 / 2048; heads of 128 channels for models with FW memory (HQLT, DeltaNet: 8 / 16 heads) and
of 64 for pure-KV models (the Transformer: 16 / 32 heads). `hqlt bench model` builds its 340M models from them.

`resized` replaces the size fields only (d_model, n_layers, n_heads, vocab_size) and keeps everything
architectural: the KV / FW memories and their options (window, positions, β range), blend, mix, short conv,
output gate, MLP ratio, chunk size, backend. A per-layer pattern of another length is repeated to the new depth
("HHKH" at 24 layers: HHKH × 6; truncated when the depth is not a multiple of it).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .validation import ConfigError, build, closest, join, require


@dataclass(frozen=True)
class SizePreset:
    d_model: int
    n_layers: int
    n_heads: int  # models with FW memory (H or F layers): head dim 128
    kv_n_heads: int  # pure-KV models (only K layers): head dim 64
    vocab_size: int = 32000


SIZE_PRESETS = {
    "340M": SizePreset(d_model=1024, n_layers=24, n_heads=8, kv_n_heads=16),
    "1.3B": SizePreset(d_model=2048, n_layers=24, n_heads=16, kv_n_heads=32),
}
SIZE_KEYS = ("d_model", "n_layers", "n_heads", "vocab_size")


def size_fields(size: Any, pattern: Optional[str] = None, path: str = "size") -> dict:
    """The model-config fields a size names: a preset name (heads by `pattern`: pure-KV or not) or a mapping
    with any of d_model, n_layers, n_heads, vocab_size (a field left out keeps the model's value)."""
    if isinstance(size, str):
        if size not in SIZE_PRESETS:
            raise ConfigError(path, f"got {size!r}; allowed: {', '.join(SIZE_PRESETS)}, a mapping with "
                                    f"{', '.join(SIZE_KEYS)}, or null (the trial's own size)"
                                    f"{closest(size, SIZE_PRESETS)}")
        p = SIZE_PRESETS[size]
        kv_only = pattern is not None and set(pattern) == {"K"}
        return {"d_model": p.d_model, "n_layers": p.n_layers, "n_heads": p.kv_n_heads if kv_only else p.n_heads,
                "vocab_size": p.vocab_size}
    if not isinstance(size, Mapping) or not size:
        raise ConfigError(path, f"got {size!r}; allowed: {', '.join(SIZE_PRESETS)}, a mapping with "
                                f"{', '.join(SIZE_KEYS)}, or null (the trial's own size)")
    out = {}
    for key, value in size.items():
        if key not in SIZE_KEYS:
            raise ConfigError(join(path, key), f"unknown key; allowed: {', '.join(SIZE_KEYS)}{closest(key, SIZE_KEYS)}")
        require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, join(path, key),
                f"got {value!r}; allowed: an integer >= 1")
        out[key] = value
    return out


def resized(cfg, size: Any, path: str = "size"):
    """`cfg` (a ModelConfig) with the size fields of `size` (see `size_fields`); None or {} gives `cfg` itself."""
    from .model_schema import ModelConfig

    if size is None:
        return cfg
    fields = size_fields(size, cfg.pattern, path)
    data = dataclasses.asdict(cfg)
    n_layers = fields.get("n_layers", cfg.n_layers)
    pattern = cfg.pattern
    if len(set(pattern)) == 1:
        data["layers"] = pattern[0]
    else:
        data["layers"] = (pattern * -(-n_layers // len(pattern)))[:n_layers]
    data.update(fields)
    try:
        return build(ModelConfig, data, "model")
    except ConfigError as exc:  # e.g. n_heads does not divide d_model
        raise ConfigError(path, f"the trial's model at this size is not valid: {exc}") from None


def size_label(size: Any, fields: Mapping) -> str:
    """A short name of a probe size: the preset name, else d<D>-L<layers>-H<heads>-V<vocab>."""
    if isinstance(size, str):
        return size
    return f"d{fields['d_model']}-L{fields['n_layers']}-H{fields['n_heads']}-V{fields['vocab_size']}"


__all__ = ["SIZE_KEYS", "SIZE_PRESETS", "SizePreset", "resized", "size_fields", "size_label"]
