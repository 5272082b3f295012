"""Backend registry: which implementation of the kernel contract runs, chosen by name or by ``"auto"``.

A backend is a name, a device type, an ``is_available()`` probe and a ``load()`` that returns its three
ops (``KernelOps``). Both the probe and the loader are called lazily, so registering a GPU backend
(fla, flex, flash_attn, fused Triton) never imports triton or CUDA libraries on a CPU machine:
the probe should only look for the package (``importlib.util.find_spec``) and a device, and the loader
does the import.

Backends receive validated fla-layout inputs with scales resolved to numbers (see ``hqlt.kernels.api``);
their ops have the signatures of ``hqlt.kernels.reference.chunked_*``.

Built in:
    reference   chunked pure-torch form, any device; what "auto" resolves to on CPU
    recurrent   step-by-step pure-torch oracle, any device; never picked by "auto"
    fla         fla 0.6.0 Triton kernels (parallel_attn + chunk_delta_rule & co.), CUDA
    flex        FlexAttention sliding-window KV + fla FW, CUDA
    flash_attn  FlashAttention-2 window (W-1, 0) KV + fla FW, CUDA, when flash_attn is importable
    fused       fused Triton forward for sync + delta (bf16/fp16, W <= 256; backward not fused yet),
                fla glue for everything else, CUDA; never picked by "auto" (no priority)

"auto" on CUDA chooses per call by measurement (``hqlt.kernels.backends.auto``: the table written by
``hqlt bench kernels --write-auto-table``), falling back to the highest ``auto_priority`` available.
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
_PROBES: dict[str, bool] = {}   # probe results, per backend name


def register_backend(backend: Backend) -> None:
    if backend.name == "auto":
        raise ValueError("backend name 'auto' is reserved")
    _BACKENDS[backend.name] = backend
    _PROBES.pop(backend.name, None)


def backend_names() -> tuple[str, ...]:
    """Names accepted by ``backend=`` (including "auto")."""
    return ("auto", *_BACKENDS)


def available_backends() -> dict[str, bool]:
    """Every registered backend and whether its probe finds what it needs (for ``hqlt info``)."""
    return {name: _probe(b) for name, b in _BACKENDS.items()}


def fallback_backend(device_type: str) -> str:
    """The highest-priority available backend for a device type (always "reference" on CPU)."""
    candidates = [b for b in _BACKENDS.values()
                  if b.auto_priority is not None and b.runs_on(device_type) and _probe(b)]
    return max(candidates, key=lambda b: b.auto_priority).name


def backend_runs_on(name: str, device_type: str) -> bool:
    return _BACKENDS[name].runs_on(device_type)


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The backend that ``name`` means for tensors on ``device``.

    "auto": on CUDA, the available backend that wins most entries of the measured auto table (per call,
    ``get_ops("auto", cuda)`` picks by the call's shape); without a table, and on other devices, the
    highest-priority available backend (always "reference" on CPU). An explicit name must be
    registered, available, and able to run on the device.
    """
    device_type = torch.device(device).type
    if name == "auto":
        if device_type == "cuda":
            from .backends import auto
            available = {n for n, b in _BACKENDS.items() if b.runs_on("cuda") and _probe(b)}
            winner = auto.majority_winner(available)
            if winner is not None:
                return winner
        return fallback_backend(device_type)
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
    """The ops of the backend ``name`` resolves to on ``device``.

    "auto" on CUDA returns ops that choose the backend per call from the call's shape (logged once per
    shape); everywhere else the resolved backend's own ops.
    """
    if name == "auto" and torch.device(device).type == "cuda" and fallback_backend("cuda") != "reference":
        from .backends import auto
        return auto.load()
    return _BACKENDS[resolve_backend(name, device)].load()


def load_backend(name: str) -> KernelOps:
    """The ops of a registered backend (no availability check: callers resolved it)."""
    return _BACKENDS[name].load()


def _probe(backend: Backend) -> bool:
    # A probe that crashes (broken optional install) means "not available", never a crash of the caller.
    # Cached per process: the answer cannot change, and get_ops runs on every kernel call.
    if backend.name not in _PROBES:
        try:
            _PROBES[backend.name] = bool(backend.is_available())
        except Exception:
            _PROBES[backend.name] = False
    return _PROBES[backend.name]


def _reference_ops() -> KernelOps:
    from . import reference
    return KernelOps(reference.chunked_hybrid_memory, reference.chunked_kv_memory,
                     reference.chunked_fw_memory)


def _recurrent_ops() -> KernelOps:
    from . import reference
    return KernelOps(reference.recurrent_hybrid_memory, reference.recurrent_kv_memory,
                     reference.recurrent_fw_memory)


def _lazy(module: str, attr: str) -> Callable:
    """``hqlt.kernels.backends.<module>.<attr>``, imported on first call (CPU never imports them)."""
    def call():
        from importlib import import_module
        return getattr(import_module(f".backends.{module}", __package__), attr)()
    return call


register_backend(Backend("reference", _reference_ops, lambda: True, auto_priority=0))
register_backend(Backend("recurrent", _recurrent_ops, lambda: True))
# GPU backends: the probes look for packages with importlib.util.find_spec and for a CUDA device only.
register_backend(Backend("fla", _lazy("fla", "load"), _lazy("fla", "is_available"), ("cuda",),
                         auto_priority=10))
register_backend(Backend("flex", _lazy("flex", "load"), _lazy("flex", "is_available"), ("cuda",)))
register_backend(Backend("flash_attn", _lazy("flash_attn", "load"), _lazy("flash_attn", "is_available"),
                         ("cuda",)))
register_backend(Backend("fused", _lazy("fused", "load"), _lazy("fused", "is_available"), ("cuda",)))
