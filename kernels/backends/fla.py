"""Backend "fla": fla 0.6.0 Triton kernels (flash-linear-attention).

KV: ``fla.ops.attn.parallel_attn(q, k, v, scale=, window_size=W)`` — in fla 0.6.0 a query at position i
attends to keys ``[i - W + 1, i]`` (the kernel masks ``i - j < W`` on top of causality), i.e. exactly
the reference's W keys including the current one. Full causal attention (``kv_memory(window=None)``,
or W >= T) goes to torch SDPA (FlashAttention), which is faster than fla's parallel kernel there.
Delayed-Chunk's chunk-local KV is ``parallel_attn`` over the batch of chunks.
bf16/fp16 only: float32/float64 inputs run the reference form on the GPU (``blend_compose``, "Precision").
FW: ``chunk_delta_rule`` / ``chunk_gated_delta_rule`` / ``chunk_linear_attn(normalize=True)`` with the
blend glue of ``blend_compose`` (delayed stream, chunk-start reads). Inputs q_fw, k_fw arrive featurised, so
``use_qk_l2norm_in_kernel=False``.
"""
from __future__ import annotations

import functools

from . import cuda_available
from .blend_compose import fla_available, low_precision_kv_attention, make_ops, sdpa_causal


def is_available() -> bool:
    return fla_available() and cuda_available()


def _sliding(q, k, v, scale, window):
    from fla.ops.attn import parallel_attn
    return parallel_attn(q, k, v, scale=scale, window_size=int(window))


def _causal(q, k, v, scale):
    return sdpa_causal(q, k, v, scale=scale)


def _chunk_causal(q, k, v, scale):
    # Many short sequences: fla's kernel (one launch, 128-query blocks) beats SDPA's per-sequence
    # overheads only when sequences are long; for C <= 128 both are one tile per chunk.
    from fla.ops.attn import parallel_attn
    return parallel_attn(q, k, v, scale=scale, window_size=None)


def kv_attn(q, k, v, *, scale, window, chunk_local):
    # float32/64 take the reference form (fla's float32 paths: see blend_compose, "Precision")
    return low_precision_kv_attention(q, k, v, scale=scale, window=window, chunk_local=chunk_local,
                                      sliding=_sliding, causal=_chunk_causal if chunk_local else _causal)


@functools.lru_cache(maxsize=None)
def load():
    return make_ops(kv_attn)


__all__ = ["is_available", "load"]
