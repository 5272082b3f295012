"""Backend registry: which implementation of the kernel contract runs, chosen by name or by ``"auto"``.

A backend is a name, a device type, an ``is_available()`` probe and a ``load()`` that returns its three
ops (``KernelOps``). Both the probe and the loader are called lazily, so registering a GPU backend
(fla, flex, flash_attn, fused Triton) never imports triton or CUDA libraries on a CPU machine:
the probe should only look for the package (``importlib.util.find_spec``) and a device, and the loader
does the import.

Backends receive validated fla-layout inputs with scales resolved to numbers (see ``hqlt.kernels.api``);
their ops have the signatures of ``hqlt.kernels.reference.chunked_*``.

Built in:
    reference  chunked pure-torch form, any device; what "auto" resolves to on CPU
    recurrent  step-by-step pure-torch oracle, any device; never picked by "auto"
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch


class KernelOps(NamedTuple):
    hybrid_memory: Callable
    kv_memory: Callable
    fw_memory: Callable


@dataclass(frozen=True)
class Backend:
    name: str
    load: Callable[[], KernelOps]
    is_available: Callable[[], bool]
    device_types: tuple[str, ...] | None = None   # None: runs on any device
    auto_priority: int | None = None              # higher wins under "auto"; None: never auto-picked

    def runs_on(self, device_type: str) -> bool:
        return self.device_types is None or device_type in self.device_types


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    if backend.name == "auto":
        raise ValueError("backend name 'auto' is reserved")
    _BACKENDS[backend.name] = backend


def backend_names() -> tuple[str, ...]:
    """Names accepted by ``backend=`` (including "auto")."""
    return ("auto", *_BACKENDS)


def available_backends() -> dict[str, bool]:
    """Every registered backend and whether its probe finds what it needs (for ``hqlt info``)."""
    return {name: _probe(b) for name, b in _BACKENDS.items()}


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The backend that ``name`` means for tensors on ``device``.

    "auto" gives the highest-priority available backend for the device type (always "reference" on
    CPU). An explicit name must be registered, available, and able to run on the device.
    """
    device_type = torch.device(device).type
    if name == "auto":
        candidates = [b for b in _BACKENDS.values()
                      if b.auto_priority is not None and b.runs_on(device_type) and _probe(b)]
        return max(candidates, key=lambda b: b.auto_priority).name
    if not isinstance(name, str) or name not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, backend_names()))}; got {name!r}")
    backend = _BACKENDS[name]
    if not backend.runs_on(device_type):
        raise ValueError(f"backend {name!r} does not run on {device_type} tensors "
                         f"(runs on: {', '.join(backend.device_types)})")
    if not _probe(backend):
        raise RuntimeError(f"backend {name!r} is not available in this environment")
    return name


def get_ops(name: str, device: torch.device | str) -> KernelOps:
    """The ops of the backend ``name`` resolves to on ``device``."""
    return _BACKENDS[resolve_backend(name, device)].load()


def _probe(backend: Backend) -> bool:
    # A probe that crashes (broken optional install) means "not available", never a crash of the caller.
    try:
        return bool(backend.is_available())
    except Exception:
        return False


def _reference_ops() -> KernelOps:
    from . import reference
    return KernelOps(reference.chunked_hybrid_memory, reference.chunked_kv_memory,
                     reference.chunked_fw_memory)


def _recurrent_ops() -> KernelOps:
    from . import reference
    return KernelOps(reference.recurrent_hybrid_memory, reference.recurrent_kv_memory,
                     reference.recurrent_fw_memory)


register_backend(Backend("reference", _reference_ops, lambda: True, auto_priority=0))
register_backend(Backend("recurrent", _recurrent_ops, lambda: True))
