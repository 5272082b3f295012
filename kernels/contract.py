"""The functional contract every kernel backend implements: vocabulary, defaults, argument checks,
and the ops triple (``KernelOps``) a backend provides.

Checks live here rather than in the backends so that every backend receives inputs that are already
validated with scales already resolved, and so that a bad argument produces the same one-line
``ValueError`` (naming the argument and what is allowed) whichever backend would have run.

Shapes use fla's layout: sequences are ``[B, T, H, D]`` (gates ``[B, T, H]``); single decode steps
drop the time axis: ``[B, H, D]`` (gates ``[B, H]``).
"""
from __future__ import annotations

import numbers
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

BLENDS = ("sync", "delayed_stream", "delayed_chunk")
FW_KINDS = ("delta", "gated_delta", "linear")
DELTA_KINDS = ("delta", "gated_delta")

# docs/hqlt-math.md §4.4: added to the sum-normaliser of linear attention.
LINEAR_EPS = 1e-10
# docs/hqlt-math.md §1: the FW feature map's l2(x) = x / sqrt(|x|^2 + eps).
FEATURE_EPS = 1e-6


class KernelOps(NamedTuple):
    """What a backend provides: its three ops, with the signatures of ``hqlt.kernels.reference.chunked_*``."""
    hybrid_memory: Callable
    kv_memory: Callable
    fw_memory: Callable


# CUDA's limit on grid axes y and z; kernels put (batch, head) pairs there (the fused kernel, attention calls).
MAX_GRID_ROWS = 65535


def default_scale(head_dim: int) -> float:
    """Softmax and FW read-out scale when the caller gives none (d_k^-1/2, fla/FlashAttention default)."""
    return head_dim ** -0.5


def check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_positive_int(name: str, value: object, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= 1{extra}; got {value!r}")


def check_scale(name: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise ValueError(f"{name} must be a real number or None; got {value!r}")


def check_tensors(tensors: Mapping[str, Tensor], *, ndim: int, value_name: str,
                  same_shape: Sequence[tuple[str, str]] = ()) -> None:
    """All tensors are floating, have `ndim` dims, one device, and share the leading dims of the value."""
    for name, x in tensors.items():
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
        if x.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dims ({_layout(ndim)}); got shape {tuple(x.shape)}")
        if x.shape[-1] < 1:
            raise ValueError(f"{name} must have a non-empty head dim; got shape {tuple(x.shape)}")
    lead = tensors[value_name].shape[:-1]
    device = tensors[value_name].device
    for name, x in tensors.items():
        if x.shape[:-1] != lead:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; its leading dims must match "
                             f"{value_name}'s {tuple(lead)}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but {value_name} is on {device}")
    for a, b in same_shape:
        if tensors[a].shape != tensors[b].shape:
            raise ValueError(f"{a} and {b} must have the same shape; got {tuple(tensors[a].shape)} "
                             f"and {tuple(tensors[b].shape)}")


def check_gates(fw: str, beta: Tensor | None, g: Tensor | None, lead: torch.Size, device: torch.device,
                *, beta_name: str = "beta", g_name: str = "g") -> None:
    """beta is required by the delta kinds (ignored by linear); g is required by, and only by, gated_delta."""
    if fw in DELTA_KINDS and beta is None:
        raise ValueError(f"{beta_name} is required for fw={fw!r}")
    if fw == "gated_delta" and g is None:
        raise ValueError(f"{g_name} (log-decay, <= 0) is required for fw='gated_delta'")
    if fw != "gated_delta" and g is not None:
        raise ValueError(f"{g_name} must be None unless fw='gated_delta'; got a tensor with fw={fw!r}")
    for name, x in ((beta_name, beta), (g_name, g)):
        if x is None:
            continue
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor")
        if x.shape != lead:
            raise ValueError(f"{name} must have shape {tuple(lead)}; got {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the values are on {device}")


def _layout(ndim: int) -> str:
    return {4: "[B, T, H, D]", 3: "[B, H, D]"}.get(ndim, f"{ndim}-d")
