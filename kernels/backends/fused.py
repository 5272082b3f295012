"""Backend "fused": the fused Synchronous-HQLT Triton kernels (``hqlt.kernels.fused``) where they apply, the
fla glue everywhere else.

The fused kernels serve ``hybrid_memory`` for blend="sync", fw="delta", bf16/fp16 (the kernel dtype of
``blend_compose.kernel_dtype``, so bf16 autocast counts), any window >= 1 (the kernels walk every chunk a window
reaches; W >= T is full causal attention), head dims <= 128 (Dk of the KV
and FW copies equal), B*H <= 65535, CUDA tensors, and only where the device's shared memory per block holds
every kernel's tiles (``hqlt.kernels.fused.settings.fits_shared_memory``: an estimate from the tile sizes
against ``shared_memory_per_block_optin``). ``fused_covers`` is that decision on plain values (the compile
path decides at trace time with it; CPU tests call it with a given limit).
Every other call — other blends or FW kinds, float32/float64 (the kernels' float32 products are TF32 on
a GPU, short of the contract's float32 accuracy), larger heads, too little shared memory — and the
``kv_memory`` / ``fw_memory`` ops go to the fla backend's ops (``make_ops`` over fla's sliding-window
attention and FW kernels), or, without fla, to the same glue over the reference forms.

Training: forward and backward are fused (the forward keeps the LSE and, by default, the chunk states for the
backward kernels): in eager mode through ``FusedSyncHybrid`` (``hqlt.kernels.fused.autograd``), under
torch.compile through the custom op pair ``hqlt::fused_sync_hybrid`` (``hqlt.kernels.fused.ops``, called from
``hqlt.kernels.ops``), the same kernels and residuals. ``HQLT_FUSED_BACKWARD=0`` switches back to the old
backward, which recomputes the outputs with the fla composition (or the reference) under autograd
(``FusedSyncHybrid`` with ``unfused_hybrid_memory``, composed here and handed to the kernel package);
``HQLT_FUSED_SAVE_STATES=0`` recomputes the chunk states in the backward instead of keeping them.

No ``auto_priority``: "auto" picks it only where the measured auto table says it is fastest for the call's
shape class (``hqlt.kernels.auto_table``). The probe only looks for the triton package and a CUDA device;
triton is imported when the fused kernel first runs.
"""
from __future__ import annotations

import functools

import torch

from ..contract import MAX_GRID_ROWS, KernelOps
from ..fused.settings import DTYPE_BYTES, MAX_HEAD_DIM, device_limits, fits_shared_memory, interpreting, pow2
from ..reference import chunked_hybrid_memory
from . import cuda_available, has_module
from .blend_compose import dtype_name, fla_available, kernel_dtype, make_ops, reference_kv, same_dtype

LOW_PRECISION_NAMES = ("bfloat16", "float16")
KERNEL_BETA_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
NO_LIMIT = 1 << 62   # smem_limit of a shape known to run (a measured auto-table row)


def is_available() -> bool:
    return has_module("triton") and cuda_available()


def fused_covers(*, blend: str, fw: str, window: int, batch: int, heads: int, dk: int, dv: int, kernel_dtype: str,
                 has_beta: bool = True, has_g: bool = False, device_type: str = "cuda", same_qk: bool = True,
                 smem_limit: int | None = None) -> bool:
    """Whether the fused kernels run this ``hybrid_memory`` call (module docstring), from plain values.

    ``kernel_dtype``: the name of the dtype the kernels would run in (``blend_compose.kernel_dtype_name``).
    ``smem_limit``: bytes of shared memory per block; None: the current CUDA device's
    (``shared_memory_per_block_optin``), or no limit on CPU (the interpreter, which also takes float32).
    """
    if blend != "sync" or fw != "delta" or has_g or not has_beta or not same_qk:
        return False
    if int(window) < 1 or max(dk, dv) > MAX_HEAD_DIM:
        return False
    if batch * heads > MAX_GRID_ROWS:      # (batch, head) pairs on one CUDA grid axis
        return False
    if device_type == "cuda":
        if kernel_dtype not in LOW_PRECISION_NAMES:
            return False
        sms = None
        if smem_limit is None:
            smem_limit, sms = cuda_smem_limit(), cuda_sm_count()
    elif device_type == "cpu" and interpreting():
        # CPU: only under the triton interpreter (tests), which also takes float32 (and has no limit)
        if kernel_dtype not in LOW_PRECISION_NAMES + ("float32",):
            return False
        sms = None
    else:
        return False
    # the kernels run at power-of-two head dims (launch.kernel_dim zero-pads the others): their tiles are what fits
    return smem_limit is None or smem_limit >= NO_LIMIT or fits_shared_memory(
        DTYPE_BYTES[kernel_dtype], pow2(dk), pow2(dv), smem_limit, featurize=False, batch=batch, heads=heads, sms=sms,
        window=window)


def covers_shape(shape: dict) -> bool:
    """The shape class of "fused" for ``backend="auto"`` (``dispatch.Backend.covers``; keys of
    ``hqlt.kernels.auto_table.entry_shape``): ``fused_covers`` of a call, or of a measured table row (which
    ran on its card, so its shared memory is not checked again here)."""
    if shape.get("op", "hybrid_memory") != "hybrid_memory":
        return False
    d = int(shape.get("head_dim") or 0)
    return fused_covers(blend=shape.get("blend"), fw=shape.get("fw", "delta"), window=int(shape.get("window") or 0),
                        batch=int(shape.get("batch") or 1), heads=int(shape.get("heads") or 1), dk=d,
                        dv=int(shape.get("dv") or d), kernel_dtype=shape.get("dtype", "bfloat16"),
                        smem_limit=NO_LIMIT if shape.get("measured") else None)


def fused_applies(q_kv, k_kv, q_fw, k_fw, v, beta, *, blend, window, fw, g, dtype) -> bool:
    """``fused_covers`` for a call's tensors (``dtype``: the kernel dtype, ``blend_compose.kernel_dtype``)."""
    B, _, H, dk = q_kv.shape
    return fused_covers(blend=blend, fw=fw, window=window, batch=B, heads=H, dk=dk, dv=v.shape[-1],
                        kernel_dtype=dtype_name(dtype), has_beta=beta is not None, has_g=g is not None,
                        device_type=v.device.type, same_qk=q_kv.shape == q_fw.shape)


def cuda_smem_limit() -> int:
    """Shared memory per block (opt-in maximum, bytes) of the current CUDA device."""
    return device_limits(torch.cuda.current_device())[0]


def cuda_sm_count() -> int:
    return device_limits(torch.cuda.current_device())[1]


@functools.lru_cache(maxsize=None)
def fallback_ops():
    """The ops of everything the fused kernel does not cover: fla's, else the reference glue."""
    if fla_available():
        from .fla import load as fla_load
        return fla_load()

    def kv_attn(q, k, v, *, scale, window, chunk_local):
        return reference_kv(q, k, v, scale=scale, window=window, chunk_local=chunk_local)
    return make_ops(kv_attn, use_fla=False)


def unfused_hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, **kw):
    """What the fused kernel's recompute backward (``HQLT_FUSED_BACKWARD=0``) differentiates: the fla
    composition when fla is importable on CUDA tensors, else the pure-torch chunked reference."""
    if v.is_cuda and fla_available() and cuda_available():
        return fallback_ops().hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, **kw)   # the fla backend's
    return chunked_hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, **kw)


def hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, *, blend, window, fw, kv_scale, fw_scale, g=None,
                  chunk_size=64):
    dtype = kernel_dtype(q_kv, k_kv, q_fw, k_fw, v)
    if not fused_applies(q_kv, k_kv, q_fw, k_fw, v, beta, blend=blend, window=window, fw=fw, g=g, dtype=dtype):
        return fallback_ops().hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, blend=blend, window=window, fw=fw,
                                            kv_scale=kv_scale, fw_scale=fw_scale, g=g, chunk_size=chunk_size)
    from ..fused import sync_hybrid_memory   # eager calls (the compiled path is hqlt.kernels.ops)
    qk, kk, qf, kf, vv = same_dtype(dtype, q_kv, k_kv, q_fw, k_fw, v)
    # beta as given where the kernels can read it (they load it as float32; its gradient comes back in its dtype):
    # a cast is a launch and an autograd node per call, and T 2048 steps are bound by the host (FUSED_NOTES.md)
    beta = beta if beta.dtype in KERNEL_BETA_DTYPES else beta.float()
    o_kv, o_fw = sync_hybrid_memory(qk, kk, vv, beta, window=int(window), kv_scale=float(kv_scale),
                                    fw_scale=float(fw_scale), q_fw=qf, k_fw=kf, unfused=unfused_hybrid_memory)
    return o_kv.to(v.dtype), o_fw.to(v.dtype)


def kv_memory(q, k, v, *, window, scale):
    return fallback_ops().kv_memory(q, k, v, window=window, scale=scale)


def fw_memory(q, k, v, beta, *, fw, scale, g=None, chunk_size=64):
    return fallback_ops().fw_memory(q, k, v, beta, fw=fw, scale=scale, g=g, chunk_size=chunk_size)


@functools.lru_cache(maxsize=None)
def load():
    # no torch.compiler.disable: under torch.compile the api reaches the kernels through custom ops
    # (``hqlt.kernels.ops``, ``hqlt.kernels.fused.ops``), never through these functions
    return KernelOps(hybrid_memory, kv_memory, fw_memory)


__all__ = ["is_available", "load", "fused_covers", "covers_shape", "fused_applies", "fallback_ops", "unfused_hybrid_memory",
           "cuda_smem_limit"]
