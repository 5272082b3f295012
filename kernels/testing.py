"""Helpers for testing and benchmarking kernel backends against the reference: random inputs shaped and
featurised the way the HQLT layer produces them, and the error measure the tests use."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import l2_normalize

INPUT_NAMES = ("q_kv", "k_kv", "q_fw", "k_fw", "v", "beta", "g")


def random_inputs(batch: int, seq: int, heads: int, dk: int, dv: int | None = None, *, fw: str = "delta",
                  dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu", seed: int = 0,
                  requires_grad: bool = False) -> dict[str, Tensor | None]:
    """Keyword arguments for ``hybrid_memory``'s tensors, [B, T, H, D] each.

    FW queries/keys are featurised like the layer does (l2(silu(.)) for the delta kinds, elu+1 for
    linear); beta in (0, 2) (the HQLT range); g (gated_delta only) log-decays <= 0 that include strong
    ones, so masking of large decay differences is exercised.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device)

    feature = (lambda x: F.elu(x) + 1) if fw == "linear" else (lambda x: l2_normalize(F.silu(x)))
    shape = (batch, seq, heads, dk)
    inputs = {
        "q_kv": randn(*shape), "k_kv": randn(*shape),
        "q_fw": feature(randn(*shape)), "k_fw": feature(randn(*shape)),
        "v": randn(batch, seq, heads, dv or dk),
        "beta": 2 * torch.sigmoid(randn(batch, seq, heads)),
        "g": F.logsigmoid(2 * randn(batch, seq, heads) + 1) if fw == "gated_delta" else None,
    }
    if requires_grad:
        inputs = {k: None if x is None else x.detach().requires_grad_() for k, x in inputs.items()}
    return inputs


def max_relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are exactly zero)."""
    diff = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_opcheck(op, args) -> None:
    """``torch.library.opcheck`` of one custom op call, with every check's outcome asserted."""
    result = torch.library.opcheck(op, args)
    failed = {name: outcome for name, outcome in result.items() if outcome != "SUCCESS"}
    assert result and not failed, failed


@contextlib.contextmanager
def _kernels_replaced(module, replacement):
    """While the block runs, every ``*_kernel`` of ``module`` (a launcher module such as
    ``hqlt.kernels.fused.launch``, which looks its kernels up as globals at each launch) is
    ``replacement(name, original)``; the originals are back afterwards."""
    originals = {n: getattr(module, n) for n in vars(module) if n.endswith("_kernel")}
    try:
        for name, kernel in originals.items():
            setattr(module, name, replacement(name, kernel))
        yield
    finally:
        for name, kernel in originals.items():
            setattr(module, name, kernel)


def watch_launches(module, on_launch):
    """While the block runs, every ``*_kernel`` of ``module`` is wrapped: ``on_launch(name, args, kwargs)`` sees
    each launch before it runs. For tests of what the kernels are launched with, and the profile driver's launches
    per step."""
    class Watched:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def call(*args, **kwargs):
                on_launch(self.name, args, kwargs)
                return launch(*args, **kwargs)
            return call
    return _kernels_replaced(module, Watched)


def skip_launches(module):
    """While the block runs, every ``*_kernel`` of ``module`` launches nothing (outputs stay as allocated): the
    host's time for a call without the kernel launcher's, to split a step's host time into the launcher's and
    everything else's (``python -m hqlt.benchmarks.fused_ab``)."""
    class Skipped:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None
    return _kernels_replaced(module, lambda _name, _kernel: Skipped())


# ------------------------------------------------------------------------------ op registry watch
def hqlt_op_libraries(ops=None) -> dict[str, bool]:
    """Per ``hqlt::`` custom op: whether the registration held by ``ops`` (default: the op objects of
    ``hqlt.kernels.ops`` and ``hqlt.kernels.fused.ops``, and the one ``hqlt.kernels.fused.autograd`` holds when it
    is loaded) is still the live one. False: the op was defined again (``torch.library.custom_op`` then
    destroys the first registration, and calls through an op object made before read freed memory) or its
    library was destroyed."""
    import sys

    from torch._library import custom_ops

    if ops is None:
        from . import ops as kernel_ops
        from .fused import ops as fused_ops
        ops = [fused_ops.fused_sync_hybrid, fused_ops.fused_sync_hybrid_backward, kernel_ops.hybrid_memory_op,
               kernel_ops.hybrid_memory_backward_op, kernel_ops.kv_memory_op, kernel_ops.kv_memory_backward_op,
               kernel_ops.fw_memory_op, kernel_ops.fw_memory_backward_op]
        autograd = sys.modules.get(f"{__package__}.fused.autograd")   # imports triton: only when already loaded
        if autograd is not None:
            ops.append(autograd.fused_sync_hybrid)
    live: dict[str, bool] = {}
    for op in ops:
        ok = custom_ops.OPDEF_TO_LIB.get(op._qualname) is op._lib and op._lib.m is not None
        live[op._qualname] = live.get(op._qualname, True) and ok
    return live


def watch_op_registry(log) -> None:
    """Log every redefinition or destruction of an ``hqlt::`` op's registration, with the Python stack that
    caused it, to the text file ``log``. Install before ``hqlt.kernels`` is imported (a library's finalizer is
    bound when the library is made). For the GPU runs where eager calls of ``hqlt::fused_sync_hybrid`` failed
    inside the dispatcher (kernels/FUSED_NOTES.md, "Round 5")."""
    import traceback
    from pathlib import Path

    import torch.library as library
    from torch._library import custom_ops

    def record(event: str, names) -> None:
        names = sorted(n for n in names if str(n).startswith("hqlt::"))
        if names:
            with Path(log).open("a") as fh:
                fh.write(f"== {event} {' '.join(names)}\n{''.join(traceback.format_stack(limit=30)[:-2])}\n")

    allow_overwrite = custom_ops.get_library_allowing_overwrite

    def get_library_allowing_overwrite(namespace, name):
        if f"{namespace}::{name}" in custom_ops.OPDEF_TO_LIB:
            record("redefined", [f"{namespace}::{name}"])
        return allow_overwrite(namespace, name)

    destroy, del_library = library.Library._destroy, library._del_library

    def _destroy(self):
        record("destroyed", self._op_defs)
        return destroy(self)

    def _del_library(captured_impls, op_impls, captured_defs, op_defs, *rest):
        record("finalized", op_defs)
        return del_library(captured_impls, op_impls, captured_defs, op_defs, *rest)

    custom_ops.get_library_allowing_overwrite = get_library_allowing_overwrite
    library.Library._destroy = _destroy
    library._del_library = _del_library
