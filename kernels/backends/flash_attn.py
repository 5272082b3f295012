"""Backend "flash_attn": KV through ``flash_attn.flash_attn_func(causal=True, window_size=(W-1, 0))``
(FlashAttention-2, W keys incl. the current one, as the HQLT reference code); FW as fla (``blend_compose``).

Used only when ``flash_attn`` is importable (it is not on the project's GPU image). FlashAttention takes
fp16/bf16 only: float32/float64 KV goes to the reference form.
"""
from __future__ import annotations

import functools

from . import cuda_available, has_module
from .blend_compose import low_precision_kv_attention, make_ops


def is_available() -> bool:
    return has_module("flash_attn") and cuda_available()


def _sliding(q, k, v, scale, window):
    from flash_attn import flash_attn_func
    return flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=(int(window) - 1, 0))


def _causal(q, k, v, scale):
    from flash_attn import flash_attn_func
    return flash_attn_func(q, k, v, softmax_scale=scale, causal=True)


def kv_attn(q, k, v, *, scale, window, chunk_local):
    return low_precision_kv_attention(q, k, v, scale=scale, window=window, chunk_local=chunk_local,
                                      sliding=_sliding, causal=_causal)


@functools.lru_cache(maxsize=None)
def load():
    return make_ops(kv_attn)
