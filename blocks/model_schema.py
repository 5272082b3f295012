"""Typed configs of the mixer layer and the model, validated on construction.

    model:
      d_model: 128
      n_layers: 2
      n_heads: 4
      layers: H                     # per-layer kinds: H hybrid, K KV-only, F FW-only ("HHKH", or a list)
      mixer:
        kv: {name: softmax, window: 64, pos: rope}
        fw: {name: delta, beta_range: 2}
        blend: sync
        mix: vector

The four parts are registry names (or {name: ..., options}); see `hqlt.blocks.registry`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from . import memories, mixing  # noqa: F401  (registers the built-in entries)
from .validation import ConfigError, build, join, require
from .registry import BLEND, FW, KV, MIX

LAYER_KINDS = {"H": "hqlt", "K": "kv", "F": "fw"}
_LAYER_ALIASES = {"h": "H", "hqlt": "H", "hybrid": "H", "k": "K", "kv": "K", "attn": "K", "f": "F", "fw": "F"}


@dataclass
class MixerConfig:
    kv: Any = field(default_factory=lambda: {"name": "softmax", "window": 64, "pos": "rope"})
    fw: Any = field(default_factory=lambda: {"name": "delta", "beta_range": 2})
    blend: Any = "sync"
    mix: Any = "vector"
    short_conv: bool = False
    conv_size: int = 4
    output_gate: bool = False

    def check(self, path: str) -> None:
        # Resolving validates each part's name and options against its registry (and caches the result).
        self.parts = {kind: reg.resolve(getattr(self, kind), join(path, kind))
                      for kind, reg in (("kv", KV), ("fw", FW), ("blend", BLEND), ("mix", MIX))}
        require(self.conv_size >= 1, join(path, "conv_size"), f"got {self.conv_size}; allowed: >= 1")

    def part(self, kind: str):
        """(registry entry, options) of 'kv' | 'fw' | 'blend' | 'mix'."""
        return self.parts[kind]


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0 = taken from the task
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    layers: Union[str, list] = "H"
    mixer: MixerConfig = field(default_factory=MixerConfig)
    mlp: Literal["swiglu", "none"] = "swiglu"  # none: blocks without an MLP (Zoology's MQAR models)
    mlp_ratio: float = 4.0
    mlp_multiple_of: int = 256
    # Learned absolute position embeddings added to the token embeddings (GPT-2 style; Zoology's attention):
    # `max_len` rows, required with `learned` (ignored with `none`). Attention then usually has `kv.pos: none`.
    pos_emb: Literal["none", "learned"] = "none"
    max_len: Optional[int] = None
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = False
    backend: str = "auto"
    chunk_size: int = 64

    def check(self, path: str) -> None:
        # A directly constructed ModelConfig holds an unchecked MixerConfig (or a dict): validate it too.
        self.mixer = build(MixerConfig, self.mixer, join(path, "mixer"))
        require(self.vocab_size >= 0, join(path, "vocab_size"), f"got {self.vocab_size}; allowed: >= 1 (0 = from the task)")
        for key in ("d_model", "n_layers", "n_heads", "mlp_multiple_of", "chunk_size"):
            require(getattr(self, key) >= 1, join(path, key), f"got {getattr(self, key)}; allowed: an integer >= 1")
        require(self.d_model % self.n_heads == 0, join(path, "n_heads"),
                f"got {self.n_heads}; must divide d_model={self.d_model}")
        require(self.mlp_ratio > 0, join(path, "mlp_ratio"), f"got {self.mlp_ratio}; allowed: > 0")
        require(self.init_std > 0, join(path, "init_std"), f"got {self.init_std}; allowed: > 0")
        require(self.pos_emb != "learned" or (self.max_len is not None and self.max_len >= 1), join(path, "max_len"),
                f"got {self.max_len}; allowed: an integer >= 1 (the longest sequence) with pos_emb: learned")
        self.pattern = self._pattern(join(path, "layers"))
        window = self.mixer.part("kv")[1].window
        if "H" in self.pattern:
            require(window is not None, join(path, "mixer.kv.window"),
                    "hybrid (H) layers need a KV window: an integer >= 1 (null = full attention is for K layers only)")

    def _pattern(self, path: str) -> str:
        items = list(self.layers) if isinstance(self.layers, str) else self.layers
        kinds = []
        for i, item in enumerate(items):
            key = item if item in LAYER_KINDS else _LAYER_ALIASES.get(str(item).lower())
            if key is None:
                raise ConfigError(f"{path}[{i}]", f"got {item!r}; allowed: H (hqlt), K (kv), F (fw)")
            kinds.append(key)
        if len(kinds) == 1:
            kinds = kinds * self.n_layers
        require(len(kinds) == self.n_layers, path,
                f"got {len(kinds)} layer kinds for n_layers={self.n_layers}; give one kind or exactly n_layers")
        return "".join(kinds)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU width: multiple_of·ceil(floor(D·ratio·2/3)/multiple_of) (docs/hqlt-math.md §2)."""
        m = self.mlp_multiple_of
        return m * -(-int(self.d_model * self.mlp_ratio * 2 / 3) // m)

    def short_id(self) -> str:
        """Readable architecture id for run names, e.g. 'S64-dn2-vec', 'T', 'dn2', 'HHKH_S64-dn2-vec_T'."""
        kv_entry, kv = self.mixer.part("kv")
        fw_entry, fw = self.mixer.part("fw")
        bl_entry, bl = self.mixer.part("blend")
        mx_entry, mx = self.mixer.part("mix")
        ids = {
            "H": f"{bl_entry.short(bl)}{kv.window}-{fw_entry.short(fw)}-{mx_entry.short(mx)}"
                 + ("" if kv.pos == "rope" else "-np"),
            "K": kv_entry.short(kv),
            "F": fw_entry.short(fw),
        }
        present = [k for k in "HKF" if k in self.pattern]
        suffix = ("" if self.mlp == "swiglu" else "-nomlp") + ("" if self.pos_emb == "none" else f"-ape{self.max_len}")
        if len(present) == 1:
            return ids[present[0]] + suffix
        return self.pattern + "_" + "_".join(ids[k] for k in present) + suffix


def model_config(data, path: str = "model") -> ModelConfig:
    return build(ModelConfig, data, path)


Layer = Literal["H", "K", "F"]

