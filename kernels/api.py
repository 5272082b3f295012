"""Public token-mixing ops on fla-layout tensors ``[B, T, H, D]``: validate, resolve defaults, dispatch.

* ``hybrid_memory`` — KV (softmax) and FW (fast-weight) memories of one HQLT layer, with the
  visibility of the chosen blend (docs/hqlt-math.md §4).
* ``kv_memory`` — softmax attention alone (Transformer: full causal; SWA: sliding window).
* ``fw_memory`` — fast-weight memory alone over all tokens (DeltaNet, Gated DeltaNet, linear attention);
  equal to the FW branch of ``hybrid_memory(blend="sync")``.

Outputs have the layout of the inputs and the dtype of ``v``; fp16/bf16 inputs are computed in float32
by the pure-torch backends.

Eager calls run the backend's op directly. While ``torch.compile`` traces, each call becomes a custom op
node (``hqlt.kernels.ops``: the backend chosen at trace time, autograd through a backward op), so a model
using these ops compiles with ``fullgraph=True``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops as graph_ops
from .contract import (BLENDS, FW_KINDS, check_choice, check_gates, check_positive_int, check_scale,
                       check_tensors, default_scale)
from .dispatch import get_ops, load_backend, resolve_backend


def hybrid_memory(q_kv: Tensor, k_kv: Tensor, q_fw: Tensor, k_fw: Tensor, v: Tensor, beta: Tensor | None,
                  *, blend: str, window: int, fw: str = "delta", kv_scale: float | None = None,
                  fw_scale: float | None = None, g: Tensor | None = None, backend: str = "auto",
                  chunk_size: int = 64, fw_chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """KV and FW memory outputs ``(o_kv, o_fw)``, each ``[B, T, H, Dv]``.

    q_kv, k_kv: raw (optionally RoPE'd) ``[B, T, H, Dk]``. q_fw, k_fw: already featurised
    (l2(silu(.)) for the delta kinds, elu+1 for linear) ``[B, T, H, Dk]``. v: ``[B, T, H, Dv]``.
    beta: ``[B, T, H]`` write strength (required by the delta kinds, ignored by linear).
    g: ``[B, T, H]`` log-decay <= 0, required by and only by ``fw="gated_delta"``.
    blend: "sync" | "delayed_stream" (window W keys incl. current, sliding) or "delayed_chunk"
    (window = chunk length C). fw: "delta" | "gated_delta" | "linear". Scales default to Dk^-1/2.
    chunk_size: internal chunk of the chunked FW form (not a semantic parameter).
    fw_chunk: "delayed_chunk" only — the FW read interval R (query t reads the FW state before position
    R*floor(t/R)); None = window (docs/hqlt-math.md §4.3). R != window runs the pure-torch forms on any
    device ("recurrent" if asked for, else "reference"): the GPU backends implement R = window only.
    """
    check_choice("blend", blend, BLENDS)
    check_choice("fw", fw, FW_KINDS)
    check_positive_int("window", window)
    check_positive_int("chunk_size", chunk_size)
    check_positive_int("fw_chunk", fw_chunk, allow_none=True)
    if fw_chunk is not None and blend != "delayed_chunk":
        raise ValueError(f"fw_chunk is only for blend='delayed_chunk'; got fw_chunk={fw_chunk!r} with blend={blend!r}")
    check_scale("kv_scale", kv_scale)
    check_scale("fw_scale", fw_scale)
    check_tensors({"q_kv": q_kv, "k_kv": k_kv, "q_fw": q_fw, "k_fw": k_fw, "v": v}, ndim=4,
                  value_name="v", same_shape=[("q_kv", "k_kv"), ("q_fw", "k_fw")])
    check_gates(fw, beta, g, v.shape[:-1], v.device)
    kwargs = dict(blend=blend, window=int(window), fw=fw, kv_scale=_scale(kv_scale, q_kv),
                  fw_scale=_scale(fw_scale, q_fw), g=g, chunk_size=int(chunk_size))
    if fw_chunk is not None and int(fw_chunk) != int(window):
        if torch.compiler.is_compiling():   # the same choice, made at trace time (``ops``)
            return graph_ops.hybrid_memory(backend, q_kv, k_kv, q_fw, k_fw, v, beta, fw_chunk=int(fw_chunk), **kwargs)
        resolve_backend(backend, v.device)  # a bad name still fails as it would otherwise
        name = "recurrent" if backend == "recurrent" else "reference"
        return load_backend(name).hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, fw_chunk=int(fw_chunk), **kwargs)
    if torch.compiler.is_compiling():   # one custom-op node, the backend fixed at trace time (``ops``)
        return graph_ops.hybrid_memory(backend, q_kv, k_kv, q_fw, k_fw, v, beta, **kwargs)
    return get_ops(backend, v.device).hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, **kwargs)


def kv_memory(q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None, scale: float | None = None,
              backend: str = "auto") -> Tensor:
    """Softmax attention ``[B, T, H, Dv]``: full causal if ``window`` is None, else a sliding window of
    ``window`` keys including the current one."""
    check_positive_int("window", window, allow_none=True)
    check_scale("scale", scale)
    check_tensors({"q": q, "k": k, "v": v}, ndim=4, value_name="v", same_shape=[("q", "k")])
    kwargs = dict(window=None if window is None else int(window), scale=_scale(scale, q))
    if torch.compiler.is_compiling():
        return graph_ops.kv_memory(backend, q, k, v, **kwargs)
    return get_ops(backend, v.device).kv_memory(q, k, v, **kwargs)


def fw_memory(q: Tensor, k: Tensor, v: Tensor, beta: Tensor | None, *, fw: str = "delta",
              scale: float | None = None, g: Tensor | None = None, backend: str = "auto",
              chunk_size: int = 64) -> Tensor:
    """Fast-weight memory over all tokens ``[B, T, H, Dv]``; query t reads the state after token t.
    Arguments as in ``hybrid_memory`` (q, k already featurised)."""
    check_choice("fw", fw, FW_KINDS)
    check_positive_int("chunk_size", chunk_size)
    check_scale("scale", scale)
    check_tensors({"q": q, "k": k, "v": v}, ndim=4, value_name="v", same_shape=[("q", "k")])
    check_gates(fw, beta, g, v.shape[:-1], v.device)
    kwargs = dict(fw=fw, scale=_scale(scale, q), g=g, chunk_size=int(chunk_size))
    if torch.compiler.is_compiling():
        return graph_ops.fw_memory(backend, q, k, v, beta, **kwargs)
    return get_ops(backend, v.device).fw_memory(q, k, v, beta, **kwargs)


def _scale(scale: float | None, q: Tensor) -> float:
    return default_scale(q.shape[-1]) if scale is None else float(scale)
