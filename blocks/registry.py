"""Name -> (implementation, config dataclass, short id) registries for the four kinds of block parts.

    @FW.register("delta", config=DeltaConfig, short=lambda c: f"dn{c.beta_range}")
    class DeltaRule: ...

Adding a new memory, blend or mix is one decorated class in one file; the mixer, the model, the
estimators and the search-space validation find it by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .validation import ConfigError, build, closest, join


@dataclass(frozen=True)
class NoOptions:
    """Config of a registry entry that takes no options."""


@dataclass(frozen=True)
class Entry:
    name: str
    impl: Any
    config: type
    short: Callable[[Any], str]
    kind: str = ""

    def __reduce__(self):
        # `short` is often a lambda, which pickle cannot store: a registered entry pickles as (kind, name)
        # and is looked up again on load (so torch.save(model) and pickled configs work).
        if self.kind in REGISTRIES and REGISTRIES[self.kind]._entries.get(self.name) is self:
            return _lookup, (self.kind, self.name)
        return Entry, (self.name, self.impl, self.config, self.short, self.kind)


def _lookup(kind: str, name: str) -> Entry:
    from . import model_config  # noqa: F401  (registers the built-in entries)
    return REGISTRIES[kind].get(name)


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, *, config: type = NoOptions, short: str | Callable[[Any], str]):
        def deco(impl):
            if name in self._entries:
                raise ValueError(f"{self.kind} registry: '{name}' is registered twice")
            fn = short if callable(short) else (lambda _cfg, s=short: s)
            self._entries[name] = Entry(name, impl, config, fn, self.kind)
            return impl

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str, path: str = "") -> Entry:
        if name not in self._entries:
            raise ConfigError(path, f"unknown {self.kind} '{name}'; allowed: {', '.join(self.names())}{closest(name, self.names())}")
        return self._entries[name]

    def resolve(self, spec, path: str) -> tuple[Entry, Any]:
        """`spec` is a name or a mapping {name: ..., <options>}; returns the entry and its validated options."""
        if isinstance(spec, str):
            name, options = spec, {}
        elif isinstance(spec, Mapping):
            if "name" not in spec:
                raise ConfigError(join(path, "name"), f"missing; allowed: {', '.join(self.names())}")
            name = spec["name"]
            options = {k: v for k, v in spec.items() if k != "name"}
        else:
            raise ConfigError(path, f"got {spec!r}; expected a {self.kind} name or a mapping with 'name'")
        entry = self.get(name, join(path, "name") if isinstance(spec, Mapping) else path)
        return entry, build(entry.config, options, path)


KV = Registry("kv")
FW = Registry("fw")
BLEND = Registry("blend")
MIX = Registry("mix")
REGISTRIES = {"kv": KV, "fw": FW, "blend": BLEND, "mix": MIX}
