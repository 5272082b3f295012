"""Fused Synchronous-HQLT memories in Triton (blend="sync", fw="delta"); FUSED_NOTES.md steps 2-3.

What it computes, for fla-layout tensors ``[B, T, H, D]`` (docs/hqlt-math.md §3.3-3.4, §4.1):

* ``o_kv``: softmax attention of query t over the W keys ``max(0, t-W+1) .. t`` (raw q, k; scale
  ``kv_scale``);
* ``o_fw``: DeltaNet over all tokens <= t on the FW features ``l2(silu(q))``, ``l2(silu(k))``
  (``l2(x) = x / sqrt(|x|^2 + 1e-6)``, as ``hqlt.kernels.reference.l2_normalize``), beta as given (any
  range; the caller scales it), read-out scale ``fw_scale``; or, with ``q_fw``/``k_fw`` given, on those
  already-featurised tensors (the ``hybrid_memory`` contract, where the KV copies may carry RoPE).

Equal to ``reference.chunked_hybrid_memory(q, k, l2(silu(q)), l2(silu(k)), v, beta, blend="sync",
fw="delta", ...)``. RoPE is not applied in the kernel: callers rotate the KV copies before.

Modules, by job (each imports only those listed after it, and hqlt.kernels' contract and reference):

    autograd   ``FusedSyncHybrid`` and the public entry point ``sync_hybrid_memory``
    ops        the custom op pair ``hqlt::fused_sync_hybrid`` (+ ``_backward``) with fake implementations and
               autograd: what the backend and torch.compile call; no triton until an op runs
    launch     the launchers ``fused_forward``, ``fused_backward`` (no autograd) and their shared-memory check
    fwd        forward kernels 1-3 (design there); three launches, chunks of 64 tokens
    bwd        backward kernels 4-7 (design there); four launches (six with HQLT_FUSED_FW_BWD=split)
    common     Triton tile helpers of both, and the interpreter shim
    settings   constants, environment switches, the default launch configuration and the shared-memory
               budget (``fits_shared_memory``); no triton (the backend reads them)
    resources  ``python -m hqlt.kernels.fused.resources``: compiles every default configuration for sm_90
               and writes the shared-memory table ``kernels/results/fused_smem_sm90.json``

``sync_hybrid_memory`` is also an attribute of this package, imported on first use: ``import
hqlt.kernels.fused`` (and ``hqlt.kernels.fused.settings``, ``hqlt.kernels.fused.ops``) never imports triton.

Why not one program per (sequence, head) that does everything in its sequential loop: at B=1, T=32768,
H=8 that is 16 programs for 132 SMs, each walking 512 chunks; the attention and the read-out are
independent of the state, so they stay in a chunk-parallel launch and the sequential kernel does only
the state recurrence (the price: chunk states written and read once, 2*Dk*Dv bytes per chunk and head).

Precision: float32 accumulation everywhere; the large products take operands in the input dtype
(bf16/fp16 on the GPU, as fla does), the 16x16 triangular work runs in float32. float32 inputs work
(TF32 products on a GPU; exact float32 under ``TRITON_INTERPRET=1``, which is how the CPU tests run).
"""
from __future__ import annotations


def __getattr__(name: str):
    if name == "sync_hybrid_memory":   # the public entry point; its module imports triton
        from .autograd import sync_hybrid_memory
        return sync_hybrid_memory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
