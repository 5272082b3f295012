"""Backend "flex": KV through PyTorch FlexAttention with a block-sparse sliding-window mask; FW as fla.

The BlockMask of a window is built analytically (which 128x128 tiles are fully visible, which partially)
instead of by ``create_block_mask``, which evaluates the mask over all T x T pairs (gigabytes at T = 32K),
and cached per (T, W, device). The mask function reads W from a captured 0-d tensor, so one compiled
kernel serves every window (dynamo guards on the function's code and on the tensor's metadata, not on its
value). Delayed-Chunk's chunk-local KV is causal attention over the batch of chunks (``blend_compose``).

FlexAttention is compiled once per process (``torch.compile(flex_attention)``, shapes become dynamic
after the first recompile); the first call of each new shape/dtype pays a compile of seconds. float32
runs with IEEE float32 matmuls unless ``torch.backends.cuda.matmul.allow_tf32`` is set.
"""
from __future__ import annotations

import functools
import math

import torch

from . import cuda_available, has_module
from .blend_compose import fla_available, kernel_dtype, kv_attention, make_ops, reference_kv, same_dtype

BLOCK = 128
_MASKS: dict = {}


def is_available() -> bool:
    if not (cuda_available() and has_module("triton")):
        return False
    return has_module("torch.nn.attention.flex_attention")


def _window_mod(window: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
    return mask_mod


def window_block_mask(T: int, W: int, device) -> "BlockMask":  # noqa: F821
    """BlockMask of causal attention over the last W keys (incl. self) at length T; cached."""
    W = min(int(W), T)
    key = (T, W, str(device))
    mask = _MASKS.get(key)
    if mask is not None:
        return mask
    from torch.nn.attention.flex_attention import BlockMask

    nb = math.ceil(T / BLOCK)
    i = torch.arange(nb, device=device)[:, None]
    j = torch.arange(nb, device=device)[None, :]
    gap = (i - j) * BLOCK
    # some (q, kv) pair of tiles (i, j) is visible: kv <= q and q - kv < W for the closest pair
    visible = (j <= i) & ((j == i) | (gap - BLOCK + 1 < W))
    # every pair is visible: j strictly below the diagonal and the farthest pair within the window
    full = (j < i) & (gap + BLOCK - 1 < W)
    if T % BLOCK:                      # ragged last tile: let the mask function see it
        full[-1, :] = False
        full[:, -1] = False
    partial = visible & ~full

    def pack(m):
        num = m.sum(1).to(torch.int32)
        idx = torch.argsort((~m).to(torch.int8), dim=1, stable=True).to(torch.int32)
        return num[None, None].contiguous(), idx[None, None].contiguous()

    kv_num, kv_idx = pack(partial)
    full_num, full_idx = pack(full)
    window = torch.tensor(W, device=device, dtype=torch.int32)
    mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK,
                                    mask_mod=_window_mod(window), seq_lengths=(T, T))
    _MASKS[key] = mask
    return mask


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    cfg = torch._dynamo.config
    # Each (shape, dtype) may compile once; the default limit of 8 would silently drop back to eager
    # flex, which materialises T x T scores.
    for name in ("recompile_limit", "cache_size_limit"):
        if getattr(cfg, name, 64) < 64:
            setattr(cfg, name, 64)
    return torch.compile(flex_attention)


def _flex(q, k, v, scale, window):
    T = q.shape[1]
    mask = window_block_mask(T, window, q.device)
    o = _compiled_flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                         scale=scale)
    return o.transpose(1, 2)


def _causal(q, k, v, scale):
    return _flex(q, k, v, scale, q.shape[1])


def kv_attn(q, k, v, *, scale, window, chunk_local):
    dtype = kernel_dtype(q, k, v)
    if dtype == torch.float64:
        return reference_kv(q, k, v, scale=scale, window=window, chunk_local=chunk_local)
    q, k, v = same_dtype(dtype, q, k, v)
    if window is None:   # full causal: SDPA (FlashAttention) is the faster kernel for it
        from .blend_compose import sdpa_causal
        return sdpa_causal(q, k, v, scale=scale)
    return kv_attention(q, k, v, scale=scale, window=window, chunk_local=chunk_local, sliding=_flex,
                        causal=_causal)


@functools.lru_cache(maxsize=None)
def load():
    return make_ops(kv_attn, use_fla=fla_available())
