"""Backend "fused": the fused Synchronous-HQLT Triton forward (``hqlt.kernels.fused_triton``) where it
applies, the fla glue everywhere else.

The fused kernel serves ``hybrid_memory`` for blend="sync", fw="delta", bf16/fp16 (the kernel dtype of
``_glue.kernel_dtype``, so bf16 autocast counts), 1 <= window <= 256, head dims <= 128, B*H <= 65535,
CUDA tensors.
Every other call — other blends or FW kinds, float32/float64, W > 256, larger heads — and the
``kv_memory`` / ``fw_memory`` ops go to the fla backend's ops (``make_ops`` over fla's sliding-window
attention and FW kernels), or, without fla, to the same glue over the reference forms.

Training: forward and backward are fused (``fused_triton.FusedSyncHybrid``, FUSED_NOTES.md step 3;
gradients for q_kv, k_kv, q_fw, k_fw, v, beta separately). ``HQLT_FUSED_BACKWARD=0`` switches back to
the old backward, which recomputes the outputs with the fla composition (or the reference) under
autograd; ``HQLT_FUSED_SAVE_STATES=0`` recomputes the chunk states in the backward instead of keeping
them from the forward.

Never picked by "auto" (no ``auto_priority``) until a measured auto table lists it. The probe only looks
for the triton package and a CUDA device; triton is imported when the fused kernel first runs.
"""
from __future__ import annotations

import functools
import os

import torch

from . import cuda_available, has_module
from ._glue import LOW_PRECISION, fla_available, kernel_dtype, make_ops, reference_kv, same_dtype

MAX_WINDOW = 256
MAX_HEAD_DIM = 128   # = fused_triton.MAX_HEAD_DIM (not imported here: that module imports triton)
MAX_GRID_ROWS = 65535  # = fused_triton.MAX_GRID_ROWS


def is_available() -> bool:
    return has_module("triton") and cuda_available()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fused_applies(q_kv, k_kv, q_fw, k_fw, v, beta, *, blend, window, fw, g, dtype) -> bool:
    """Whether a ``hybrid_memory`` call runs the fused kernel (module docstring)."""
    if blend != "sync" or fw != "delta" or g is not None or beta is None:
        return False
    if not 1 <= int(window) <= MAX_WINDOW:
        return False
    if q_kv.shape != q_fw.shape or max(q_kv.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return False
    if v.shape[0] * v.shape[2] > MAX_GRID_ROWS:      # (batch, head) pairs on one CUDA grid axis
        return False
    if v.is_cuda:
        return dtype in LOW_PRECISION
    # CPU: only under the triton interpreter (tests), which also takes float32
    return _interpreting() and dtype in LOW_PRECISION + (torch.float32,)


@functools.lru_cache(maxsize=None)
def fallback_ops():
    """The ops of everything the fused kernel does not cover: fla's, else the reference glue."""
    if fla_available():
        from .fla import load as fla_load
        return fla_load()

    def kv_attn(q, k, v, *, scale, window, chunk_local):
        return reference_kv(q, k, v, scale=scale, window=window, chunk_local=chunk_local)
    return make_ops(kv_attn, use_fla=False)


def hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, *, blend, window, fw, kv_scale, fw_scale, g=None,
                  chunk_size=64):
    dtype = kernel_dtype(q_kv, k_kv, q_fw, k_fw, v)
    if not fused_applies(q_kv, k_kv, q_fw, k_fw, v, beta, blend=blend, window=window, fw=fw, g=g, dtype=dtype):
        return fallback_ops().hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, blend=blend, window=window, fw=fw,
                                            kv_scale=kv_scale, fw_scale=fw_scale, g=g, chunk_size=chunk_size)
    from ..fused_triton import FusedSyncHybrid
    qk, kk, qf, kf, vv = same_dtype(dtype, q_kv, k_kv, q_fw, k_fw, v)
    o_kv, o_fw = FusedSyncHybrid.apply(qk, kk, qf, kf, vv, beta.float(), int(window), float(kv_scale),
                                       float(fw_scale))
    return o_kv.to(v.dtype), o_fw.to(v.dtype)


def kv_memory(q, k, v, *, window, scale):
    return fallback_ops().kv_memory(q, k, v, window=window, scale=scale)


def fw_memory(q, k, v, beta, *, fw, scale, g=None, chunk_size=64):
    return fallback_ops().fw_memory(q, k, v, beta, fw=fw, scale=scale, g=g, chunk_size=chunk_size)


@functools.lru_cache(maxsize=None)
def load():
    from ..dispatch import KernelOps
    # opaque Triton launches with their own autograd: keep them out of compiled graphs (as make_ops does)
    disable = torch.compiler.disable
    return KernelOps(disable(hybrid_memory), disable(kv_memory), disable(fw_memory))


__all__ = ["is_available", "load", "fused_applies", "fallback_ops", "MAX_WINDOW"]
