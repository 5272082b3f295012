"""Autograd of the fused Synchronous-HQLT memories, and their public entry point ``sync_hybrid_memory``.

``sync_hybrid_memory`` runs ``FusedSyncHybrid`` (an ``autograd.Function``) in eager mode and, while
torch.compile traces with the fused backward on (the default), the custom op pair of ``ops``
(``hqlt::fused_sync_hybrid``: forward kernels, residuals kept, backward kernels). ``FusedSyncHybrid``:
forward = the fused kernels
(``launch.fused_forward``); backward = the fused backward kernels (``launch.fused_backward``) unless
``HQLT_FUSED_BACKWARD=0`` (or ``fused_backward=False``): then the backward recomputes both outputs with an
unfused composition under autograd and back-propagates through that. The composition is the caller's (``unfused``, with the
signature of ``KernelOps.hybrid_memory``); the default is the pure-torch chunked reference. The backend
"fused" (``hqlt.kernels.backends.fused``) passes the fla composition when fla is importable on the
tensors' device: this package reaches into no backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..contract import default_scale
from ..reference import chunked_hybrid_memory, l2_normalize
from .launch import check_shared_memory, default_config, fused_backward, fused_forward
from .ops import fused_sync_hybrid
from .settings import CHUNK, backward_kernels, fused_backward_default, save_states_default


def featurize(x: torch.Tensor) -> torch.Tensor:
    """l2(silu(x)) in float32, differentiable (what the kernel computes when q_fw/k_fw are not given)."""
    return l2_normalize(F.silu(x.float()))


def _recompute(unfused, q_kv, k_kv, q_fw, k_fw, v, beta, *, window, kv_scale, fw_scale):
    """The same outputs without the fused kernel, differentiable by autograd: ``unfused`` (blend="sync",
    fw="delta"). q_fw/k_fw None: featurised here."""
    if q_fw is None:
        q_fw, k_fw = featurize(q_kv), featurize(k_kv)
    return unfused(q_kv, k_kv, q_fw, k_fw, v, beta, blend="sync", window=int(window), fw="delta",
                   kv_scale=kv_scale, fw_scale=fw_scale, g=None, chunk_size=CHUNK)


class FusedSyncHybrid(torch.autograd.Function):
    """Forward: the fused Triton kernels. Backward: the fused backward kernels (``fused_backward``), or,
    with ``fused_bwd=False``, the outputs recomputed with ``unfused`` (default: the chunked reference)
    under autograd and back-propagated through (costs one extra unfused forward).

    apply(q_kv, k_kv, q_fw, k_fw, v, beta, window, kv_scale, fw_scale[, fused_bwd[, save_states[, unfused]]]);
    q_fw = k_fw = None: FW features l2(silu(q_kv)), l2(silu(k_kv)) computed in the kernels."""

    @staticmethod
    def forward(ctx, q_kv, k_kv, q_fw, k_fw, v, beta, window, kv_scale, fw_scale, fused_bwd=None,
                save_states=None, unfused=None):
        fused_bwd = fused_backward_default() if fused_bwd is None else bool(fused_bwd)
        save_states = save_states_default() if save_states is None else bool(save_states)
        ctx.cfg = dict(window=window, kv_scale=kv_scale, fw_scale=fw_scale)
        ctx.fused_bwd = fused_bwd
        ctx.unfused = chunked_hybrid_memory if unfused is None else unfused
        if not fused_bwd:
            o_kv, o_fw = fused_forward(q_kv, k_kv, v, beta, window=window, kv_scale=kv_scale,
                                       fw_scale=fw_scale, q_fw=q_fw, k_fw=k_fw)
            ctx.save_for_backward(q_kv, k_kv, q_fw, k_fw, v, beta)
            return o_kv, o_fw
        o_kv, o_fw, aux = fused_forward(q_kv, k_kv, v, beta, window=window, kv_scale=kv_scale,
                                        fw_scale=fw_scale, q_fw=q_fw, k_fw=k_fw, return_aux=True)
        kept = ((aux["w"], aux["v_new"], aux["states"], aux.get("t"), aux.get("u")) if save_states
                else (None,) * 5)
        ctx.save_for_backward(q_kv, k_kv, q_fw, k_fw, v, beta, o_kv, aux["lse"], *kept)
        return o_kv, o_fw

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do_kv, do_fw):
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[:6]
        no_grads = (None,) * 6     # window, kv_scale, fw_scale, fused_bwd, save_states, unfused
        if ctx.fused_bwd:
            q_kv, k_kv, q_fw, k_fw, v, beta, o_kv, lse, w, v_new, states, t, u = saved
            if do_kv is None:
                do_kv = torch.zeros_like(o_kv)
            if do_fw is None:
                do_fw = torch.zeros_like(o_kv)
            g = fused_backward(q_kv, k_kv, v, beta, o_kv, lse, do_kv, do_fw, q_fw=q_fw, k_fw=k_fw, w=w,
                               v_new=v_new, states=states, t=t, u=u, **ctx.cfg)
            if q_fw is None:
                dq, dk, dv, dbeta = g
                g = (dq, dk, None, None, dv, dbeta)
            result = [x if n else None for x, n in zip(g, needs)]
            return (*result, *no_grads)
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().requires_grad_(bool(n)) for t, n in zip(saved, needs)]
            outs = _recompute(ctx.unfused, *leaves, **ctx.cfg)
            wanted = [x for x, n in zip(leaves, needs) if x is not None and n]
            grads = iter(torch.autograd.grad(outs, wanted, (do_kv, do_fw), allow_unused=True)) if wanted else iter(())
        result = [next(grads) if (x is not None and n) else None for x, n in zip(leaves, needs)]
        return (*result, *no_grads)


def sync_hybrid_memory(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *, window: int,
                       kv_scale: float | None = None, fw_scale: float | None = None,
                       q_fw: torch.Tensor | None = None, k_fw: torch.Tensor | None = None,
                       fused_backward: bool | None = None, save_states: bool | None = None, unfused=None):
    """Synchronous-HQLT memories with the fused forward: ``(o_kv, o_fw)``, each ``[B, T, H, Dv]``.

    q, k raw ``[B, T, H, Dk]`` (KV branch, optionally RoPE'd by the caller); FW features l2(silu(q)),
    l2(silu(k)) are computed in the kernel unless q_fw, k_fw are given. beta ``[B, T, H]`` already in the
    caller's range (e.g. 2*sigmoid). Scales default to the contract's ``default_scale`` (Dk^-1/2).
    Trainable: ``fused_backward`` (default ``HQLT_FUSED_BACKWARD``, on) picks the fused backward kernels
    (under torch.compile through the custom op ``hqlt::fused_sync_hybrid``, ``ops``) over the unfused
    recomputation; ``save_states`` (default ``HQLT_FUSED_SAVE_STATES``, on) keeps the forward's chunk
    states for it; ``unfused`` is the composition the recomputation runs (default: the chunked reference;
    ``hqlt.kernels.backends.fused.unfused_hybrid_memory`` is the fla one).
    """
    d = q.shape[-1]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, q_fw, k_fw, v, beta)):
        # trainable: the backward kernels must fit the device too (a clear error now, not in the backward)
        cfg = default_config(q.shape[0], q.shape[2], d, v.shape[-1], q.device, q.element_size())
        check_shared_memory(cfg, q.element_size(), d, v.shape[-1], q_fw is None, q.device, backward_kernels(cfg))
    kv_scale = default_scale(d) if kv_scale is None else float(kv_scale)
    fw_scale = default_scale(d) if fw_scale is None else float(fw_scale)
    fused_bwd = fused_backward_default() if fused_backward is None else bool(fused_backward)
    if fused_bwd and torch.compiler.is_compiling():
        # the custom op pair (hqlt.kernels.fused.ops): same kernels, and torch.compile holds it without a break
        save = save_states_default() if save_states is None else bool(save_states)
        o_kv, o_fw, *_ = fused_sync_hybrid(q, k, q_fw, k_fw, v, beta, int(window), kv_scale, fw_scale, save)
        return o_kv, o_fw
    # Eager: the same kernels and residuals through an autograd.Function, not the dispatcher. Eager calls of the op
    # failed on GPUs after earlier calls in the same process with the op's own registration unreadable
    # ("vector::reserve", "basic_string::_M_create", "schema_.has_value()"), while this path never did
    # (kernels/FUSED_NOTES.md, "Round 5").
    return FusedSyncHybrid.apply(q, k, q_fw, k_fw, v, beta, int(window), kv_scale, fw_scale, fused_bwd,
                                 save_states, unfused)


__all__ = ["sync_hybrid_memory", "FusedSyncHybrid", "featurize"]
