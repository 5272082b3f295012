"""GPU backends of the kernel contract (``hqlt.kernels.dispatch`` registers them lazily).

Each module here imports its GPU packages (fla, triton, flash_attn, FlexAttention) only inside
``load()``-time code paths, never at ``import hqlt.kernels``: a CPU machine never needs them.

    fla         KV: fla ``parallel_attn(window_size=W)``; FW: fla ``chunk_delta_rule`` /
                ``chunk_gated_delta_rule`` / ``chunk_linear_attn`` (sum-normalised)
    flex        KV: FlexAttention with a cached sliding-window / chunk-local BlockMask; FW as fla
                (reference form if fla is missing)
    flash_attn  KV: ``flash_attn_func(window_size=(W-1, 0))``; FW as fla

How each blend maps onto these ops (docs/hqlt-math.md §4) lives once, in ``blend_compose``.
"""
from __future__ import annotations

import importlib.util


def has_module(name: str) -> bool:
    """Whether ``name`` is importable, without importing it (a missing parent counts as missing)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()
