"""The kernel contract as PyTorch custom ops (``torch.library``): what ``torch.compile`` sees of a kernel call.

    hqlt::hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta?, g?, backend, blend, window, fw, kv_scale, fw_scale,
                        chunk_size, fw_chunk?, autocast) -> (o_kv, o_fw)
    hqlt::kv_memory(q, k, v, backend, window?, scale, autocast) -> o
    hqlt::fw_memory(q, k, v, beta?, g?, backend, fw, scale, chunk_size, autocast) -> o

plus one ``hqlt::<op>_backward`` each, and the fused Sync-HQLT kernel's own pair
(``hqlt::fused_sync_hybrid``, ``hqlt.kernels.fused.ops``). Each op runs one *named* backend's op
(``dispatch.load_backend``); non-tensor arguments are plain str / int / float. A fake (meta) implementation
gives the output shapes, so a compiled graph holds the call as one node: a whole HQLT block compiles with
``fullgraph=True`` whatever backend runs underneath (fla's and flash_attn's Triton/CUDA launches, FlexAttention,
the pure-torch reference).

Autograd: the backward is a custom op too. It runs the backend's forward again under autograd and
back-propagates through it (the backends' own autograd — fla's ``autograd.Function``\\ s, the reference's
torch ops — lives in Python that no graph can hold), i.e. one extra forward per call. The fused kernel's op
pair keeps the forward's residuals instead (no recomputation). ``autocast`` is the CUDA autocast dtype in
effect at the call ("" when off), re-established around both runs, so the backend picks the same kernel dtype
as an eager call would (``blend_compose.kernel_dtype``), also in the backward and in a compiled graph, where
autocast itself is traced away.

When each path runs (``hqlt.kernels.api``): while ``torch.compile`` traces (``torch.compiler.is_compiling()``)
every call becomes one of these ops, with the backend chosen at trace time (``dispatch.plan``: "auto" per
shape from the measured table, the fused kernel where it applies). Eager calls run the backend directly with
its own autograd — no dispatcher overhead and no recomputation — the fused kernel included (its
``autograd.Function``, ``hqlt.kernels.fused.autograd``). The many tiny CPU trainings of the test suite and of sweeps are therefore unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .fused import ops as fused_ops


# ------------------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def autograd_inside_op():
    """Run a block with autograd recording, inside a custom op's kernel.

    PyTorch calls an op's implementation below the Autograd dispatch key (autograd's keys are excluded for
    the call), so operations there record no graph even under ``torch.enable_grad()``. The backward ops
    re-run a backend's forward under autograd; this re-admits the autograd keys for the block (and keeps
    every other exclusion, e.g. autocast's)."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), \
            torch.enable_grad():
        yield


def autocast_name(device_type: str) -> str:
    """The autocast dtype on ``device_type`` as an op argument ("" when autocast is off). Only CUDA autocast
    changes a backend's kernel dtype (``blend_compose.kernel_dtype``)."""
    if device_type == "cuda" and torch.is_autocast_enabled("cuda"):
        return str(torch.get_autocast_dtype("cuda")).removeprefix("torch.")
    return ""


def _autocast(name: str):
    # sets the flag the backends read; autocast's dispatch keys stay excluded inside an op, so no op is recast
    return torch.autocast("cuda", dtype=getattr(torch, name)) if name else contextlib.nullcontext()


def _fresh(outputs, inputs):
    """Outputs as new tensors: a custom op may not return (a view of) one of its inputs."""
    ptrs = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel()}
    return tuple(o.clone() if o.numel() and o.untyped_storage().data_ptr() in ptrs else o.contiguous()
                 for o in outputs)


def _vjp(run, tensors, needs, grads_out):
    """Gradients of ``run(*tensors)`` w.r.t. the tensors marked in ``needs`` (zeros where unused; empty
    placeholders where not needed or absent), recomputed under autograd."""
    with autograd_inside_op():
        leaves = [None if t is None else t.detach().requires_grad_(bool(n) and t.is_floating_point())
                  for t, n in zip(tensors, needs)]
        outs = run(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        pairs = [(o, g) for o, g in zip(outs, grads_out) if o.requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                   if wanted and pairs else [None] * len(wanted))
    result = []
    for t in leaves:
        if t is not None and t.requires_grad:
            g = next(got)
            result.append(torch.zeros_like(t) if g is None else g.detach())
        else:
            result.append(_placeholder(t, tensors))
    return _fresh(result, [*tensors, *grads_out])


def _placeholder(t, tensors):
    ref = t if t is not None else next(x for x in tensors if x is not None)
    return ref.new_empty(0)


def _fake_grads(tensors, needs):
    # contiguous, like the real ones (``_fresh``), whatever the inputs' strides
    ref = next(x for x in tensors if x is not None)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if (t is not None and n)
            else (t if t is not None else ref).new_empty(0) for t, n in zip(tensors, needs)]


def _needs(ctx, count):
    return [bool(n) for n in ctx.needs_input_grad[:count]]


def _zeros_if_none(grad, like):
    return torch.zeros_like(like) if grad is None else grad


# ------------------------------------------------------------------------------------ hybrid_memory
@torch.library.custom_op("hqlt::hybrid_memory", mutates_args=())
def hybrid_memory_op(q_kv: Tensor, k_kv: Tensor, q_fw: Tensor, k_fw: Tensor, v: Tensor, beta: Optional[Tensor],
                     g: Optional[Tensor], backend: str, blend: str, window: int, fw: str, kv_scale: float,
                     fw_scale: float, chunk_size: int, fw_chunk: Optional[int],
                     autocast: str) -> tuple[Tensor, Tensor]:
    """``fw_chunk``: the Delayed-Chunk FW read interval, passed on only when not None (the pure-torch
    backends take it; ``hqlt.kernels.api`` sends other values to them only)."""
    extra = {} if fw_chunk is None else {"fw_chunk": fw_chunk}
    with _autocast(autocast):
        out = dispatch.load_backend(backend).hybrid_memory(
            q_kv, k_kv, q_fw, k_fw, v, beta, blend=blend, window=window, fw=fw, kv_scale=kv_scale,
            fw_scale=fw_scale, g=g, chunk_size=chunk_size, **extra)
    return _fresh(out, (q_kv, k_kv, q_fw, k_fw, v, beta, g))


@hybrid_memory_op.register_fake
def _(q_kv, k_kv, q_fw, k_fw, v, beta, g, backend, blend, window, fw, kv_scale, fw_scale, chunk_size, fw_chunk,
      autocast):
    return torch.empty_like(v, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


@torch.library.custom_op("hqlt::hybrid_memory_backward", mutates_args=())
def hybrid_memory_backward_op(do_kv: Tensor, do_fw: Tensor, q_kv: Tensor, k_kv: Tensor, q_fw: Tensor,
                              k_fw: Tensor, v: Tensor, beta: Optional[Tensor], g: Optional[Tensor], backend: str,
                              blend: str, window: int, fw: str, kv_scale: float, fw_scale: float, chunk_size: int,
                              fw_chunk: Optional[int], autocast: str, needs: list[bool]) -> list[Tensor]:
    """Gradients for (q_kv, k_kv, q_fw, k_fw, v, beta, g); an empty tensor where ``needs`` is False or the
    input is None."""
    ops = dispatch.load_backend(backend)
    extra = {} if fw_chunk is None else {"fw_chunk": fw_chunk}

    def run(q_kv, k_kv, q_fw, k_fw, v, beta, g):
        with _autocast(autocast):
            return tuple(ops.hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, blend=blend, window=window, fw=fw,
                                           kv_scale=kv_scale, fw_scale=fw_scale, g=g, chunk_size=chunk_size,
                                           **extra))
    return list(_vjp(run, (q_kv, k_kv, q_fw, k_fw, v, beta, g), needs, (do_kv, do_fw)))


@hybrid_memory_backward_op.register_fake
def _(do_kv, do_fw, q_kv, k_kv, q_fw, k_fw, v, beta, g, backend, blend, window, fw, kv_scale, fw_scale,
      chunk_size, fw_chunk, autocast, needs):
    return _fake_grads((q_kv, k_kv, q_fw, k_fw, v, beta, g), needs)


def _hybrid_setup(ctx, inputs, output):
    *tensors, backend, blend, window, fw, kv_scale, fw_scale, chunk_size, fw_chunk, autocast = inputs
    ctx.save_for_backward(*tensors)
    ctx.args = (backend, blend, window, fw, kv_scale, fw_scale, chunk_size, fw_chunk, autocast)
    ctx.needs = _needs(ctx, 7)


def _hybrid_backward(ctx, do_kv, do_fw):
    tensors = ctx.saved_tensors
    v = tensors[4]
    grads = hybrid_memory_backward_op(_zeros_if_none(do_kv, v), _zeros_if_none(do_fw, v), *tensors, *ctx.args,
                                      ctx.needs)
    return (*[x if n else None for x, n in zip(grads, ctx.needs)], *([None] * len(ctx.args)))


hybrid_memory_op.register_autograd(_hybrid_backward, setup_context=_hybrid_setup)


# ---------------------------------------------------------------------------------------- kv_memory
@torch.library.custom_op("hqlt::kv_memory", mutates_args=())
def kv_memory_op(q: Tensor, k: Tensor, v: Tensor, backend: str, window: Optional[int], scale: float,
                 autocast: str) -> Tensor:
    with _autocast(autocast):
        out = dispatch.load_backend(backend).kv_memory(q, k, v, window=window, scale=scale)
    return _fresh((out,), (q, k, v))[0]


@kv_memory_op.register_fake
def _(q, k, v, backend, window, scale, autocast):
    return torch.empty_like(v, memory_format=torch.contiguous_format)


@torch.library.custom_op("hqlt::kv_memory_backward", mutates_args=())
def kv_memory_backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, backend: str, window: Optional[int],
                          scale: float, autocast: str, needs: list[bool]) -> list[Tensor]:
    ops = dispatch.load_backend(backend)

    def run(q, k, v):
        with _autocast(autocast):
            return ops.kv_memory(q, k, v, window=window, scale=scale)
    return list(_vjp(run, (q, k, v), needs, (do,)))


@kv_memory_backward_op.register_fake
def _(do, q, k, v, backend, window, scale, autocast, needs):
    return _fake_grads((q, k, v), needs)


def _kv_setup(ctx, inputs, output):
    q, k, v, *args = inputs
    ctx.save_for_backward(q, k, v)
    ctx.args = tuple(args)
    ctx.needs = _needs(ctx, 3)


def _kv_backward(ctx, do):
    q, k, v = ctx.saved_tensors
    grads = kv_memory_backward_op(_zeros_if_none(do, v), q, k, v, *ctx.args, ctx.needs)
    return (*[x if n else None for x, n in zip(grads, ctx.needs)], *([None] * len(ctx.args)))


kv_memory_op.register_autograd(_kv_backward, setup_context=_kv_setup)


# ---------------------------------------------------------------------------------------- fw_memory
@torch.library.custom_op("hqlt::fw_memory", mutates_args=())
def fw_memory_op(q: Tensor, k: Tensor, v: Tensor, beta: Optional[Tensor], g: Optional[Tensor], backend: str,
                 fw: str, scale: float, chunk_size: int, autocast: str) -> Tensor:
    with _autocast(autocast):
        out = dispatch.load_backend(backend).fw_memory(q, k, v, beta, fw=fw, scale=scale, g=g,
                                                       chunk_size=chunk_size)
    return _fresh((out,), (q, k, v, beta, g))[0]


@fw_memory_op.register_fake
def _(q, k, v, beta, g, backend, fw, scale, chunk_size, autocast):
    return torch.empty_like(v, memory_format=torch.contiguous_format)


@torch.library.custom_op("hqlt::fw_memory_backward", mutates_args=())
def fw_memory_backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, beta: Optional[Tensor],
                          g: Optional[Tensor], backend: str, fw: str, scale: float, chunk_size: int,
                          autocast: str, needs: list[bool]) -> list[Tensor]:
    ops = dispatch.load_backend(backend)

    def run(q, k, v, beta, g):
        with _autocast(autocast):
            return ops.fw_memory(q, k, v, beta, fw=fw, scale=scale, g=g, chunk_size=chunk_size)
    return list(_vjp(run, (q, k, v, beta, g), needs, (do,)))


@fw_memory_backward_op.register_fake
def _(do, q, k, v, beta, g, backend, fw, scale, chunk_size, autocast, needs):
    return _fake_grads((q, k, v, beta, g), needs)


def _fw_setup(ctx, inputs, output):
    q, k, v, beta, g, *args = inputs
    ctx.save_for_backward(q, k, v, beta, g)
    ctx.args = tuple(args)
    ctx.needs = _needs(ctx, 5)


def _fw_backward(ctx, do):
    tensors = ctx.saved_tensors
    grads = fw_memory_backward_op(_zeros_if_none(do, tensors[2]), *tensors, *ctx.args, ctx.needs)
    return (*[x if n else None for x, n in zip(grads, ctx.needs)], *([None] * len(ctx.args)))


fw_memory_op.register_autograd(_fw_backward, setup_context=_fw_setup)


# ----------------------------------------------------------------------- calls under torch.compile
def hybrid_memory(backend: str, q_kv, k_kv, q_fw, k_fw, v, beta, *, blend, window, fw, kv_scale, fw_scale, g,
                  chunk_size, fw_chunk=None):
    """``hybrid_memory`` as graph nodes: the backend and the route are fixed at trace time from the call's
    shapes and dtypes (``dispatch.plan``), then one op call (the fused kernel's op where it applies)."""
    B, T, H, dk = _dims("hybrid_memory", backend, v, q_kv.shape)
    autocast = autocast_name(v.device.type)
    plan = dispatch.plan("hybrid_memory", backend, v.device.type, blend=blend, fw=fw, window=window, batch=B,
                         seq_len=T, heads=H, dk=dk, dv=_dims("hybrid_memory", backend, v, v.shape)[-1],
                         dtypes=_dtypes(q_kv, k_kv, q_fw, k_fw, v), autocast=autocast, has_beta=beta is not None,
                         has_g=g is not None, same_qk=q_fw.shape[-1] == q_kv.shape[-1])
    name, fused, kernel_dtype, save_states = plan   # plan also refuses a bad backend name, as eager does
    if fw_chunk is not None:   # a Delayed-Chunk read interval != window: the pure-torch forms only (api)
        name, fused = ("recurrent" if backend == "recurrent" else "reference"), False
    if fused:
        return fused_ops.hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, dtype=getattr(torch, kernel_dtype),
                                       window=window, kv_scale=kv_scale, fw_scale=fw_scale,
                                       save_states=save_states)
    return hybrid_memory_op(q_kv, k_kv, q_fw, k_fw, v, beta, g, name, blend, int(window), fw, float(kv_scale),
                            float(fw_scale), int(chunk_size), None if fw_chunk is None else int(fw_chunk),
                            autocast)


def kv_memory(backend: str, q, k, v, *, window, scale):
    B, T, H, dk = _dims("kv_memory", backend, v, q.shape)
    autocast = autocast_name(v.device.type)
    name, *_ = dispatch.plan("kv_memory", backend, v.device.type, blend="sync", fw="delta",
                             window=0 if window is None else window, batch=B, seq_len=T, heads=H, dk=dk,
                             dv=_dims("kv_memory", backend, v, v.shape)[-1], dtypes=_dtypes(q, k, v),
                             autocast=autocast, has_beta=False, has_g=False)
    return kv_memory_op(q, k, v, name, None if window is None else int(window), float(scale), autocast)


def fw_memory(backend: str, q, k, v, beta, *, fw, scale, g, chunk_size):
    B, T, H, dk = _dims("fw_memory", backend, v, q.shape)
    autocast = autocast_name(v.device.type)
    name, *_ = dispatch.plan("fw_memory", backend, v.device.type, blend="sync", fw=fw, window=0, batch=B,
                             seq_len=T, heads=H, dk=dk, dv=_dims("fw_memory", backend, v, v.shape)[-1],
                             dtypes=_dtypes(q, k, v), autocast=autocast, has_beta=beta is not None,
                             has_g=g is not None)
    return fw_memory_op(q, k, v, beta, g, name, fw, float(scale), int(chunk_size), autocast)


def _dims(op: str, backend: str, v, shape) -> tuple[int, ...]:
    """The sizes ``plan`` sees: the real ones where the choice depends on them ("auto" on CUDA, the fused
    kernel), which specialises a dynamic-shape graph to them (a guard per value); zeros elsewhere, so that
    a graph compiled with dynamic shapes stays dynamic."""
    if dispatch.shape_matters(op, backend, v.device.type):
        return tuple(int(n) for n in shape)
    return (0,) * len(shape)


def _dtypes(*tensors) -> tuple[str, ...]:
    return tuple(str(t.dtype).removeprefix("torch.") for t in tensors)


__all__ = ["hybrid_memory_op", "kv_memory_op", "fw_memory_op", "hybrid_memory_backward_op",
           "kv_memory_backward_op", "fw_memory_backward_op", "hybrid_memory", "kv_memory", "fw_memory",
           "autograd_inside_op", "autocast_name"]
