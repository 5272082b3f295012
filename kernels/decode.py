"""Decode-step form: one token in, updated caches out; outputs equal the parallel form token by token.

Three entry points, all taking one token as ``[B, H, D]`` (gates ``[B, H]``) and returning
``(output(s), new_state)``; pass ``state=None`` for the first token:

* ``hybrid_memory_step(...) -> (o_kv_t, o_fw_t, HybridDecodeState)`` — one HQLT layer's two memories
  with the visibility of ``blend`` (same arguments as ``hqlt.kernels.hybrid_memory``).
* ``kv_memory_step(q_t, k_t, v_t, cache, *, window=None, scale=None) -> (o_t, KVCache)`` — softmax
  attention alone (``window=None``: the cache grows without bound, i.e. full causal attention).
* ``fw_memory_step(q_t, k_t, v_t, beta_t, state, *, fw, scale=None, g_t=None) -> (o_t, FWState)`` —
  fast-weight memory alone (DeltaNet / Gated DeltaNet / linear attention).

How each blend is streamed (docs/hqlt-math.md §4):
* sync: the KV cache keeps the last W tokens; every token is written to the FW state, then read.
* delayed_stream: the KV cache also keeps the FW key of each cached token; the token evicted from the
  window at step t (position t-W) is written to the FW state with the CURRENT beta_t, g_t.
* delayed_chunk: at a chunk start the KV cache is emptied and the FW state is snapshotted; queries
  read the snapshot while the current chunk's tokens are written to the live state.

States are immutable dataclasses: every step returns new ones, so a state can be branched (e.g. for
beam search). FW states and caches are held in float32 (float64 inputs: float64), whatever the input
dtype; outputs take the dtype of ``v_t``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .contract import (BLENDS, FW_KINDS, LINEAR_EPS, check_choice, check_gates, check_positive_int,
                       check_scale, check_tensors, default_scale)


@dataclass(frozen=True)
class KVCache:
    """Keys/values of the tokens a KV memory can still see, ``[B, H, L, D]`` (oldest first)."""
    k: Tensor
    v: Tensor
    k_fw: Tensor | None = None   # delayed_stream: FW keys of the same tokens, written to FW on eviction


@dataclass(frozen=True)
class FWState:
    """Fast weights ``S`` ``[B, H, Dv, Dk]`` (linear attention: the numerator) and, for linear attention
    only, the normaliser ``z`` ``[B, H, Dk]``."""
    S: Tensor
    z: Tensor | None = None


@dataclass(frozen=True)
class HybridDecodeState:
    """Everything one HQLT layer carries between decode steps."""
    blend: str
    window: int
    fw: str
    position: int                 # number of tokens consumed so far
    kv: KVCache | None            # None: empty (before the first token / at a chunk start)
    fw_state: FWState             # state after every token written so far
    fw_read: FWState | None = None  # delayed_chunk: the snapshot taken at the current chunk's start
    fw_chunk: int | None = None   # delayed_chunk: the FW read interval R (None: the window)


# --------------------------------------------------------------------------------------------------
# Public steps.

def hybrid_memory_step(q_kv_t: Tensor, k_kv_t: Tensor, q_fw_t: Tensor, k_fw_t: Tensor, v_t: Tensor,
                       beta_t: Tensor | None, state: HybridDecodeState | None = None, *, blend: str,
                       window: int, fw: str = "delta", kv_scale: float | None = None,
                       fw_scale: float | None = None, g_t: Tensor | None = None, fw_chunk: int | None = None
                       ) -> tuple[Tensor, Tensor, HybridDecodeState]:
    """One token of ``hybrid_memory``: returns ``(o_kv_t, o_fw_t, new_state)``, outputs ``[B, H, Dv]``.
    ``fw_chunk`` (delayed_chunk only): the FW read interval R, None = window (as ``hybrid_memory``)."""
    check_choice("blend", blend, BLENDS)
    check_choice("fw", fw, FW_KINDS)
    check_positive_int("window", window)
    check_positive_int("fw_chunk", fw_chunk, allow_none=True)
    if fw_chunk is not None and blend != "delayed_chunk":
        raise ValueError(f"fw_chunk is only for blend='delayed_chunk'; got fw_chunk={fw_chunk!r} with blend={blend!r}")
    check_scale("kv_scale", kv_scale)
    check_scale("fw_scale", fw_scale)
    check_tensors({"q_kv_t": q_kv_t, "k_kv_t": k_kv_t, "q_fw_t": q_fw_t, "k_fw_t": k_fw_t, "v_t": v_t},
                  ndim=3, value_name="v_t", same_shape=[("q_kv_t", "k_kv_t"), ("q_fw_t", "k_fw_t")])
    check_gates(fw, beta_t, g_t, v_t.shape[:-1], v_t.device, beta_name="beta_t", g_name="g_t")
    if state is None:
        state = HybridDecodeState(blend, int(window), fw, 0, None, _empty_fw(k_fw_t, v_t, fw),
                                  fw_chunk=None if fw_chunk is None else int(fw_chunk))
    elif (state.blend, state.window, state.fw, state.fw_chunk) != (blend, window, fw, fw_chunk):
        raise ValueError(f"state was built with blend={state.blend!r}, window={state.window}, "
                         f"fw={state.fw!r}, fw_chunk={state.fw_chunk}; got blend={blend!r}, window={window}, "
                         f"fw={fw!r}, fw_chunk={fw_chunk}")
    kv_scale = default_scale(q_kv_t.shape[-1]) if kv_scale is None else float(kv_scale)
    fw_scale = default_scale(q_fw_t.shape[-1]) if fw_scale is None else float(fw_scale)
    dtype = _state_dtype(state.fw_state)
    q_kv_t, k_kv_t, q_fw_t, k_fw_t, v, beta_t, g_t = (
        None if x is None else x.to(dtype) for x in (q_kv_t, k_kv_t, q_fw_t, k_fw_t, v_t, beta_t, g_t))

    kv, fw_state, fw_read = state.kv, state.fw_state, state.fw_read
    if blend == "delayed_chunk" and state.position % window == 0:
        kv = None                               # new chunk: the KV memory resets
    if blend == "delayed_chunk" and state.position % (fw_chunk or window) == 0:
        fw_read = fw_state                      # new read interval: the FW read point moves
    max_len = None if blend == "delayed_chunk" else window
    k_fw_cached = k_fw_t if blend == "delayed_stream" else None
    kv, evicted = _kv_append(kv, k_kv_t, v, k_fw_cached, max_len)
    o_kv = _attend(q_kv_t, kv, kv_scale)

    if blend == "delayed_stream":
        # The token leaving the window enters FW now, with this step's gates (beta is not shifted).
        k_write, v_write = (evicted.k_fw, evicted.v) if evicted is not None else (None, None)
    else:
        k_write, v_write = k_fw_t, v
    fw_state = _fw_write(fw_state, k_write, v_write, beta_t, g_t, fw)
    o_fw = _fw_read(fw_read if blend == "delayed_chunk" else fw_state, q_fw_t, fw_scale, fw)

    new_state = replace(state, position=state.position + 1, kv=kv, fw_state=fw_state, fw_read=fw_read)
    return o_kv.to(v_t.dtype), o_fw.to(v_t.dtype), new_state


def kv_memory_step(q_t: Tensor, k_t: Tensor, v_t: Tensor, cache: KVCache | None = None, *,
                   window: int | None = None, scale: float | None = None) -> tuple[Tensor, KVCache]:
    """One token of ``kv_memory``: returns ``(o_t, new_cache)``."""
    check_positive_int("window", window, allow_none=True)
    check_scale("scale", scale)
    check_tensors({"q_t": q_t, "k_t": k_t, "v_t": v_t}, ndim=3, value_name="v_t",
                  same_shape=[("q_t", "k_t")])
    scale = default_scale(q_t.shape[-1]) if scale is None else float(scale)
    dtype = _compute_dtype(v_t) if cache is None else cache.v.dtype
    cache, _ = _kv_append(cache, k_t.to(dtype), v_t.to(dtype), None, window)
    return _attend(q_t.to(dtype), cache, scale).to(v_t.dtype), cache


def fw_memory_step(q_t: Tensor, k_t: Tensor, v_t: Tensor, beta_t: Tensor | None,
                   state: FWState | None = None, *, fw: str = "delta", scale: float | None = None,
                   g_t: Tensor | None = None) -> tuple[Tensor, FWState]:
    """One token of ``fw_memory``: write token t, then read; returns ``(o_t, new_state)``."""
    check_choice("fw", fw, FW_KINDS)
    check_scale("scale", scale)
    check_tensors({"q_t": q_t, "k_t": k_t, "v_t": v_t}, ndim=3, value_name="v_t",
                  same_shape=[("q_t", "k_t")])
    check_gates(fw, beta_t, g_t, v_t.shape[:-1], v_t.device, beta_name="beta_t", g_name="g_t")
    scale = default_scale(q_t.shape[-1]) if scale is None else float(scale)
    if state is None:
        state = _empty_fw(k_t, v_t, fw)
    dtype = _state_dtype(state)
    q, k, v, beta, g = (None if x is None else x.to(dtype) for x in (q_t, k_t, v_t, beta_t, g_t))
    state = _fw_write(state, k, v, beta, g, fw)
    return _fw_read(state, q, scale, fw).to(v_t.dtype), state


# --------------------------------------------------------------------------------------------------
# Building blocks.

def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _state_dtype(state: FWState) -> torch.dtype:
    return state.S.dtype


def _empty_fw(k: Tensor, v: Tensor, fw: str) -> FWState:
    B, H, Dk = k.shape
    dtype = _compute_dtype(v)
    S = torch.zeros(B, H, v.shape[-1], Dk, dtype=dtype, device=v.device)
    z = torch.zeros(B, H, Dk, dtype=dtype, device=v.device) if fw == "linear" else None
    return FWState(S, z)


def _kv_append(cache: KVCache | None, k: Tensor, v: Tensor, k_fw: Tensor | None,
               max_len: int | None) -> tuple[KVCache, KVCache | None]:
    """Append one token; if the cache then exceeds ``max_len``, drop the oldest and return it."""
    new = KVCache(k[:, :, None], v[:, :, None], None if k_fw is None else k_fw[:, :, None])
    if cache is not None:
        new = KVCache(torch.cat([cache.k, new.k], 2), torch.cat([cache.v, new.v], 2),
                      None if k_fw is None else torch.cat([cache.k_fw, new.k_fw], 2))
    if max_len is None or new.k.shape[2] <= max_len:
        return new, None
    evicted = KVCache(new.k[:, :, 0], new.v[:, :, 0], None if k_fw is None else new.k_fw[:, :, 0])
    kept = KVCache(new.k[:, :, 1:], new.v[:, :, 1:], None if k_fw is None else new.k_fw[:, :, 1:])
    return kept, evicted


def _attend(q: Tensor, cache: KVCache, scale: float) -> Tensor:
    scores = torch.einsum("bhd,bhjd->bhj", q, cache.k) * scale
    return torch.einsum("bhj,bhjd->bhd", scores.softmax(-1), cache.v)


def _fw_write(state: FWState, k: Tensor | None, v: Tensor | None, beta: Tensor | None,
              g: Tensor | None, fw: str) -> FWState:
    """Decay (gated_delta), then write (k, v) unless there is nothing to write (k None)."""
    S, z = state.S, state.z
    if g is not None:
        S = S * g.exp()[..., None, None]
    if k is None:
        return FWState(S, z)
    if fw == "linear":
        return FWState(S + v[..., :, None] * k[..., None, :], z + k)
    error = v - torch.einsum("bhvk,bhk->bhv", S, k)
    return FWState(S + beta[..., None, None] * error[..., :, None] * k[..., None, :], z)


def _fw_read(state: FWState, q: Tensor, scale: float, fw: str) -> Tensor:
    o = scale * torch.einsum("bhvk,bhk->bhv", state.S, q)
    if fw == "linear":
        o = o / (scale * (state.z * q).sum(-1, keepdim=True) + LINEAR_EPS)
    return o
