"""hqlt.kernels — functional token-mixing ops on fla-layout tensors ``[B, T, H, D]``, with backends.

    from hqlt.kernels import hybrid_memory, l2_normalize
    o_kv, o_fw = hybrid_memory(q_kv, k_kv, l2_normalize(F.silu(q)), l2_normalize(F.silu(k)), v, beta,
                               blend="sync", window=64)

Ops (``api``): ``hybrid_memory``, ``kv_memory``, ``fw_memory``. Decode steps (``decode``):
``hybrid_memory_step``, ``kv_memory_step``, ``fw_memory_step``. Backends (``dispatch``): "reference"
(chunked pure torch; "auto" on CPU) and "recurrent" (step-by-step oracle); ``auto_choices()`` says what
``backend="auto"`` picked on CUDA (``auto_table``). The math and the visibility of each blend are in
docs/hqlt-math.md §3-4.
"""
import sys as _sys

if __name__ != "hqlt.kernels":
    # Imported by its folder name: a `python -m …` run from the repository root puts the root on sys.path, and
    # transformers (imported by fla) probes for Hugging Face's top-level `kernels` package with import_module.
    # Running this package a second time would define the hqlt:: custom ops again, and torch.library deletes the
    # first registration while every hqlt.kernels caller still holds it: later eager calls then read freed memory
    # ("vector::reserve", "schema_.has_value()"; kernels/FUSED_NOTES.md, round 6). The bare name is hqlt.kernels
    # instead. It has no __version__, so transformers does not take it for its package.
    import importlib as _importlib
    _sys.modules[__name__] = _importlib.import_module("hqlt.kernels")
else:
    from .api import fw_memory, hybrid_memory, kv_memory
    from .auto_table import choices as auto_choices
    from .contract import BLENDS, FW_KINDS
    from .decode import FWState, HybridDecodeState, KVCache, fw_memory_step, hybrid_memory_step, kv_memory_step
    from .dispatch import available_backends, backend_names, resolve_backend
    from .reference import l2_normalize

    __all__ = ["hybrid_memory", "kv_memory", "fw_memory", "hybrid_memory_step", "kv_memory_step",
               "fw_memory_step", "HybridDecodeState", "KVCache", "FWState", "available_backends",
               "auto_choices", "backend_names", "resolve_backend", "l2_normalize", "BLENDS", "FW_KINDS"]
