"""The fused Synchronous-HQLT kernels as PyTorch custom ops: ``hqlt::fused_sync_hybrid`` (forward kernels
1-3, ``launch.fused_forward``) and ``hqlt::fused_sync_hybrid_backward`` (kernels 4-7, ``launch.fused_backward``),
with fake (meta) implementations and the autograd formula between them, so that ``torch.compile`` holds a
fused call as two graph nodes (forward, backward) with no graph break and no recomputation.

    fused_sync_hybrid(q_kv, k_kv, q_fw?, k_fw?, v, beta, window, kv_scale, fw_scale, save_states)
        -> (o_kv, o_fw, lse, w, v_new, states, t, u)

q_fw = k_fw = None: the FW features l2(silu(q_kv)), l2(silu(k_kv)) are computed in the kernels. The last six
outputs are the residuals the backward reads (not differentiable): the KV log2-domain LSE ``[B*H, T]``
float32, and with ``save_states`` the forward's w, v_new and chunk states (else empty tensors, and the
backward runs the forward's wy + scan kernels again, ``HQLT_FUSED_SAVE_STATES=0``), where the launch
configuration has the forward store it (``settings.forward_stores_t``) every chunk's T ``[B*H, NC, 64, 64]``
float32 (else empty), and where it has the forward keep it (``settings.forward_keeps_u``) U = T diag(beta) V
``[B, T, H, Dv]`` in v's dtype (else empty). Inputs must already share the kernel dtype (``hybrid_memory`` below
casts them); beta any float dtype.

This module imports no triton (the launchers are imported when an op runs), so registering the ops at
``import hqlt.kernels`` is free on a CPU machine. The ops run on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1`` (how the CPU tests run them, ``torch.library.opcheck`` included).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .settings import CHUNK, default_config, forward_keeps_u, forward_stores_t


@torch.library.custom_op("hqlt::fused_sync_hybrid", mutates_args=())
def fused_sync_hybrid(q_kv: Tensor, k_kv: Tensor, q_fw: Optional[Tensor], k_fw: Optional[Tensor], v: Tensor,
                      beta: Tensor, window: int, kv_scale: float, fw_scale: float,
                      save_states: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from .launch import fused_forward
    o_kv, o_fw, aux = fused_forward(q_kv, k_kv, v, beta, window=window, kv_scale=kv_scale, fw_scale=fw_scale,
                                    q_fw=q_fw, k_fw=k_fw, return_aux=True)
    if save_states:
        t = aux.get("t", v.new_empty(0, dtype=torch.float32))
        u = aux.get("u", v.new_empty(0))
        return o_kv, o_fw, aux["lse"], aux["w"], aux["v_new"], aux["states"], t, u
    return (o_kv, o_fw, aux["lse"], q_kv.new_empty(0), v.new_empty(0), v.new_empty(0),
            v.new_empty(0, dtype=torch.float32), v.new_empty(0))


def _kept_residuals(q_kv: Tensor, v: Tensor) -> tuple[bool, bool]:
    """Whether the forward keeps T and U for this call: the launcher's default configuration (the op passes none),
    whose "fw_bwd", "fw_bwd_t" and "fw_bwd_u" entries depend on neither the shape nor the device."""
    B, _, H, dk = q_kv.shape
    cfg = default_config(B, H, dk, v.shape[-1], 1, q_kv.element_size())
    return forward_stores_t(cfg), forward_keeps_u(cfg)


@fused_sync_hybrid.register_fake
def _(q_kv, k_kv, q_fw, k_fw, v, beta, window, kv_scale, fw_scale, save_states):
    B, T, H, dk = q_kv.shape
    dv = v.shape[-1]
    nc = (T + CHUNK - 1) // CHUNK
    o_kv, o_fw = v.new_empty(B, T, H, dv), v.new_empty(B, T, H, dv)
    lse = v.new_empty(B * H, T, dtype=torch.float32)
    if not save_states:
        return (o_kv, o_fw, lse, q_kv.new_empty(0), v.new_empty(0), v.new_empty(0),
                v.new_empty(0, dtype=torch.float32), v.new_empty(0))
    stores_t, keeps_u = _kept_residuals(q_kv, v)
    t = (v.new_empty(B * H, nc, CHUNK, CHUNK, dtype=torch.float32) if stores_t
         else v.new_empty(0, dtype=torch.float32))
    u = v.new_empty(B, T, H, dv) if keeps_u else v.new_empty(0)
    return (o_kv, o_fw, lse, q_kv.new_empty(B, T, H, dk), v.new_empty(B, T, H, dv), v.new_empty(B * H, nc, dk, dv),
            t, u)


@torch.library.custom_op("hqlt::fused_sync_hybrid_backward", mutates_args=())
def fused_sync_hybrid_backward(do_kv: Tensor, do_fw: Tensor, q_kv: Tensor, k_kv: Tensor, q_fw: Optional[Tensor],
                               k_fw: Optional[Tensor], v: Tensor, beta: Tensor, o_kv: Tensor, lse: Tensor,
                               w: Tensor, v_new: Tensor, states: Tensor, t: Tensor, u: Tensor, window: int,
                               kv_scale: float, fw_scale: float, save_states: bool) -> tuple[Tensor, Tensor, Tensor,
                                                                                             Tensor, Tensor, Tensor]:
    """(d q_kv, d k_kv, d q_fw, d k_fw, d v, d beta); with the features computed in the kernel (q_fw None)
    the first two hold both branches and d q_fw, d k_fw are empty."""
    from .launch import fused_backward
    kept = (dict(w=w, v_new=v_new, states=states, t=t if t.numel() else None, u=u if u.numel() else None)
            if save_states else {})
    g = fused_backward(q_kv, k_kv, v, beta, o_kv, lse, do_kv, do_fw, window=window, kv_scale=kv_scale,
                       fw_scale=fw_scale, q_fw=q_fw, k_fw=k_fw, **kept)
    if q_fw is None:
        dq, dk, dv, dbeta = g
        return dq, dk, q_kv.new_empty(0), k_kv.new_empty(0), dv, dbeta
    return tuple(g)


@fused_sync_hybrid_backward.register_fake
def _(do_kv, do_fw, q_kv, k_kv, q_fw, k_fw, v, beta, o_kv, lse, w, v_new, states, t, u, window, kv_scale, fw_scale,
      save_states):
    def like(t):   # the launcher's gradient buffers are new contiguous tensors
        return torch.empty_like(t, memory_format=torch.contiguous_format)
    if q_fw is None:
        return like(q_kv), like(k_kv), q_kv.new_empty(0), k_kv.new_empty(0), like(v), like(beta)
    return like(q_kv), like(k_kv), like(q_fw), like(k_fw), like(v), like(beta)


def _setup(ctx, inputs, output):
    q_kv, k_kv, q_fw, k_fw, v, beta, window, kv_scale, fw_scale, save_states = inputs
    o_kv, _, lse, w, v_new, states, t, u = output
    ctx.mark_non_differentiable(lse, w, v_new, states, t, u)
    ctx.save_for_backward(q_kv, k_kv, q_fw, k_fw, v, beta, o_kv, lse, w, v_new, states, t, u)
    ctx.args = (int(window), float(kv_scale), float(fw_scale), bool(save_states))


def _backward(ctx, do_kv, do_fw, *_residual_grads):
    q_kv, k_kv, q_fw, k_fw, v, beta, o_kv, lse, w, v_new, states, t, u = ctx.saved_tensors
    do_kv = torch.zeros_like(o_kv) if do_kv is None else do_kv
    do_fw = torch.zeros_like(o_kv) if do_fw is None else do_fw
    g = fused_sync_hybrid_backward(do_kv, do_fw, q_kv, k_kv, q_fw, k_fw, v, beta, o_kv, lse, w, v_new, states, t,
                                   u, *ctx.args)
    grads = [x if n else None for x, n in zip(g, ctx.needs_input_grad[:6])]   # False for absent q_fw, k_fw
    return (*grads, None, None, None, None)


fused_sync_hybrid.register_autograd(_backward, setup_context=_setup)


def hybrid_memory(q_kv: Tensor, k_kv: Tensor, q_fw: Tensor, k_fw: Tensor, v: Tensor, beta: Tensor, *,
                  dtype: torch.dtype, window: int, kv_scale: float, fw_scale: float,
                  save_states: bool) -> tuple[Tensor, Tensor]:
    """``hybrid_memory(blend="sync", fw="delta")`` through the fused op: q, k, v cast to the kernel ``dtype``,
    beta to float32; outputs in v's dtype (the backend "fused" calls this where the kernel applies)."""
    qk, kk, qf, kf, vv = (t if t.dtype == dtype else t.to(dtype) for t in (q_kv, k_kv, q_fw, k_fw, v))
    o_kv, o_fw, *_ = fused_sync_hybrid(qk, kk, qf, kf, vv, beta.float(), int(window), float(kv_scale),
                                       float(fw_scale), bool(save_states))
    return o_kv.to(v.dtype), o_fw.to(v.dtype)


__all__ = ["fused_sync_hybrid", "fused_sync_hybrid_backward", "hybrid_memory"]
