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
    fused       fused Triton forward and backward for sync + delta (bf16/fp16, any W, head dims <= 128,
                where the device's shared memory holds the kernels' tiles: ``fused_covers``), fla glue for
                everything else, CUDA; no priority: "auto" takes it only where a measured table row of the
                same shape class says it is fastest (``auto_table``)

"auto" on CUDA chooses per call by measurement (the policy in ``hqlt.kernels.auto_table``: the table
written by ``hqlt bench kernels --write-auto-table``), falling back to the highest ``auto_priority``
available.

Under ``torch.compile`` the choice is made once, at trace time (``plan``), and the call becomes a custom op
node (``hqlt.kernels.ops``) that runs the chosen backend: no graph break.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from . import auto_table
from .contract import KernelOps


@dataclass(frozen=True)
class Backend:
    name: str
    load: Callable[[], KernelOps]
    is_available: Callable[[], bool]
    device_types: tuple[str, ...] | None = None   # None: runs on any device
    auto_priority: int | None = None              # higher wins under "auto"; None: never auto-picked
    # shape class: covers(shape) says whether the backend runs its own kernel for a call of that shape (keys:
    # ``auto_table.entry_shape``); None: everywhere. "auto" takes a backend only inside its class.
    covers: Callable[[dict], bool] | None = None

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
            winner = auto_table.majority_winner(_available_on("cuda"),
                                                restricted=[n for n, b in _BACKENDS.items() if b.covers],
                                                device=_card_name(device))
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
        return _auto_ops()
    return _BACKENDS[resolve_backend(name, device)].load()


def load_backend(name: str) -> KernelOps:
    """The ops of a registered backend (no availability check: callers resolved it)."""
    return _BACKENDS[name].load()


def _available_on(device_type: str) -> set[str]:
    return {n for n, b in _BACKENDS.items() if b.runs_on(device_type) and _probe(b)}


def eligible(name: str, shape: dict) -> bool:
    """Whether backend ``name`` runs its own kernel at ``shape`` (its shape class, ``Backend.covers``)."""
    backend = _BACKENDS.get(name)
    return backend is not None and (backend.covers is None or bool(backend.covers(shape)))


def _card_name(device) -> str | None:
    """The CUDA card's name (``auto_table`` rows are per card); None off CUDA or without one."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device)


def _auto_pick(op: str, blend: str, window: int, seq_len: int, head_dim: int, device_type: str, *,
               fw: str = "delta", kernel_dtype: str = "bfloat16", heads: int | None = None,
               batch: int | None = None, dv: int | None = None) -> str:
    return auto_table.pick(op, blend, window, seq_len, head_dim, available=lambda: _available_on(device_type),
                           fallback=lambda: fallback_backend(device_type), fw=fw, dtype=kernel_dtype, heads=heads,
                           batch=batch, dv=dv, eligible=eligible, device=_card_name(device_type))


@functools.lru_cache(maxsize=None)
def _auto_ops() -> KernelOps:
    """KernelOps that choose a backend per call (shape-aware, ``auto_table.pick``) and run it."""

    def hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, *, blend, window, fw, kv_scale, fw_scale, g=None,
                      chunk_size=64):
        from .backends.blend_compose import dtype_name, kernel_dtype
        B, T, H, dk = q_kv.shape
        name = _auto_pick("hybrid_memory", blend, window, T, dk, v.device.type, fw=fw, heads=H, batch=B,
                          dv=v.shape[-1], kernel_dtype=dtype_name(kernel_dtype(q_kv, k_kv, q_fw, k_fw, v)))
        return load_backend(name).hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, blend=blend, window=window,
                                                fw=fw, kv_scale=kv_scale, fw_scale=fw_scale, g=g,
                                                chunk_size=chunk_size)

    def kv_memory(q, k, v, *, window, scale):
        T = v.shape[1]
        name = _auto_pick("kv_memory", "sync", window or T, T, q.shape[-1], v.device.type)
        return load_backend(name).kv_memory(q, k, v, window=window, scale=scale)

    def fw_memory(q, k, v, beta, *, fw, scale, g=None, chunk_size=64):
        # every GPU backend runs the same fla FW kernels: the fallback order decides
        name = fallback_backend(v.device.type)
        auto_table.note_choice(("fw_memory", "sync", 0, v.shape[1], q.shape[-1], fw, str(v.dtype)[6:]), name)
        return load_backend(name).fw_memory(q, k, v, beta, fw=fw, scale=scale, g=g, chunk_size=chunk_size)

    # no torch.compiler.disable: under torch.compile the api never comes here (``plan`` + ``hqlt.kernels.ops``)
    return KernelOps(hybrid_memory, kv_memory, fw_memory)


def plan(op: str, backend: str, device_type: str, *, blend: str, fw: str, window: int, batch: int, seq_len: int,
         heads: int, dk: int, dv: int, dtypes: tuple, autocast: str, has_beta: bool, has_g: bool,
         same_qk: bool = True) -> tuple[str, bool, str, bool]:
    """How a call of ``op`` runs under torch.compile, decided once at trace time from plain values:
    ``(backend name, fused, kernel dtype name, save_states)``.

    The backend is what an eager call would run for this shape (``backend="auto"`` on CUDA: the per-shape
    choice of the measured table; else ``resolve_backend``). ``fused``: the call goes to the fused
    kernel's own op pair (``hqlt.kernels.fused.ops``) — backend "fused", a call the kernel covers
    (``backends.fused.fused_covers``) and its fused backward switched on; ``save_states`` is
    ``HQLT_FUSED_SAVE_STATES``. ``window`` 0 means none (``kv_memory``'s full causal attention). Dynamo does
    not trace this function: it calls it with the (constant) arguments and bakes the answer into the graph.
    """
    from .backends.blend_compose import kernel_dtype_name
    kernel_dtype = kernel_dtype_name(dtypes, autocast if device_type == "cuda" else "")
    if backend == "auto" and device_type == "cuda" and fallback_backend("cuda") != "reference":
        if op == "hybrid_memory":
            name = _auto_pick(op, blend, window, seq_len, dk, device_type, fw=fw, kernel_dtype=kernel_dtype,
                              heads=heads, batch=batch, dv=dv)
        elif op == "kv_memory":
            name = _auto_pick(op, "sync", window or seq_len, seq_len, dk, device_type)
        else:
            name = fallback_backend(device_type)
            auto_table.note_choice(("fw_memory", "sync", 0, seq_len, dk, fw, dtypes[-1]), name)
    else:
        name = resolve_backend(backend, device_type)
    fused, save_states = False, True
    if op == "hybrid_memory" and name == "fused":
        from .backends import fused as fused_backend
        from .fused.settings import fused_backward_default, save_states_default
        fused = fused_backward_default() and fused_backend.fused_covers(
            blend=blend, fw=fw, window=window, batch=batch, heads=heads, dk=dk, dv=dv, kernel_dtype=kernel_dtype,
            has_beta=has_beta, has_g=has_g, device_type=device_type, same_qk=same_qk)
        save_states = save_states_default()
    return name, fused, kernel_dtype, save_states


def shape_matters(op: str, backend: str, device_type: str) -> bool:
    """Whether ``plan``'s answer for ``op`` can depend on the call's sizes: "auto" on CUDA (the per-shape
    table) or a backend with a shape class (the fused kernel). Elsewhere the compile path passes zeros."""
    if backend == "auto":
        return device_type == "cuda"
    return op == "hybrid_memory" and backend in _BACKENDS and _BACKENDS[backend].covers is not None


# torch.compiler.assume_constant_result(plan), without importing torch._dynamo (3 s, and triton) at import:
# the decorator only sets this attribute (tests/test_kernels_compile.py checks that it still does).
plan._dynamo_marked_constant = True
shape_matters._dynamo_marked_constant = True


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


def _lazy_fn(module: str, attr: str) -> Callable:
    """``hqlt.kernels.backends.<module>.<attr>(*args)``, the module imported on first call."""
    def call(*args, **kwargs):
        from importlib import import_module
        return getattr(import_module(f".backends.{module}", __package__), attr)(*args, **kwargs)
    return call


register_backend(Backend("reference", _reference_ops, lambda: True, auto_priority=0))
register_backend(Backend("recurrent", _recurrent_ops, lambda: True))
# GPU backends: the probes look for packages with importlib.util.find_spec and for a CUDA device only.
register_backend(Backend("fla", _lazy("fla", "load"), _lazy("fla", "is_available"), ("cuda",),
                         auto_priority=10))
register_backend(Backend("flex", _lazy("flex", "load"), _lazy("flex", "is_available"), ("cuda",)))
register_backend(Backend("flash_attn", _lazy("flash_attn", "load"), _lazy("flash_attn", "is_available"),
                         ("cuda",)))
register_backend(Backend("fused", _lazy("fused", "load"), _lazy("fused", "is_available"), ("cuda",),
                         covers=_lazy_fn("fused", "covers_shape")))
