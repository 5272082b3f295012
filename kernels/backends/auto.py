"""``backend="auto"`` on CUDA: pick the backend by measurement, per (blend, window, length, head dim).

The table is written by ``hqlt bench kernels --write-auto-table`` (kernels/results/auto_table.json, or the
file named by ``$HQLT_AUTO_TABLE``): one entry per measured (blend, W, T, d) with the fwd+bwd time of
each backend. A call uses the entry nearest to its own shape (same blend; distance = sum of |log2|
ratios of W, T and d) and the fastest *available* backend in it; a table may restrict the choice to
the backends it lists under "verified" (those whose GPU parity tests passed on the measuring card). Without a table, or when no backend of
the entry is available, the fallback is the highest-priority available backend (fla, else reference).
Each new choice is logged once (logger ``hqlt.kernels``, INFO) and kept in ``choices()``.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
from pathlib import Path

import torch

log = logging.getLogger("hqlt.kernels")
TABLE_PATH = Path(__file__).resolve().parent.parent / "results" / "auto_table.json"
_CHOICES: dict[tuple, str] = {}


def table_path() -> Path:
    return Path(os.environ.get("HQLT_AUTO_TABLE") or TABLE_PATH)


@functools.lru_cache(maxsize=None)
def load_table(path: str | None = None) -> dict | None:
    p = Path(path) if path else table_path()
    try:
        table = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return table if isinstance(table.get("entries"), list) else None


def _dist(entry: dict, window: int, seq_len: int, head_dim: int) -> float:
    return sum(abs(math.log2(max(a, 1) / max(b, 1))) for a, b in
               ((window, entry["window"]), (seq_len, entry["seq_len"]), (head_dim, entry["head_dim"])))


def _candidates(table: dict, available) -> set:
    """Available backends the table may choose: those in its "verified" list (backends whose GPU parity
    tests passed on the measuring card), or every available one when the table has no such list."""
    verified = table.get("verified")
    return set(available) if verified is None else set(available) & set(verified)


def lookup(blend: str, window: int, seq_len: int, head_dim: int, available) -> tuple[str, dict] | None:
    """(fastest available backend, its table entry) for the nearest measured shape, or None."""
    table = load_table()
    if table is None:
        return None
    available = _candidates(table, available)
    best = None
    for entry in table["entries"]:
        if entry.get("blend") != blend:
            continue
        ms = {name: t for name, t in entry.get("ms", {}).items() if name in available and t is not None}
        if not ms:
            continue
        d = _dist(entry, window, seq_len, head_dim)
        if best is None or d < best[0]:
            best = (d, min(ms, key=ms.get), entry)
    return None if best is None else (best[1], best[2])


def majority_winner(available) -> str | None:
    """The available backend that wins most table entries (what ``resolve_backend('auto', 'cuda')`` says)."""
    table = load_table()
    if table is None:
        return None
    available = _candidates(table, available)
    wins: dict[str, int] = {}
    for entry in table["entries"]:
        ms = {n: t for n, t in entry.get("ms", {}).items() if n in available and t is not None}
        if ms:
            name = min(ms, key=ms.get)
            wins[name] = wins.get(name, 0) + 1
    return max(wins, key=wins.get) if wins else None


def choices() -> dict[tuple, str]:
    """Every (op, blend, W, T, d) -> backend that auto picked so far in this process."""
    return dict(_CHOICES)


def pick(op: str, blend: str, window: int, seq_len: int, head_dim: int, device_type: str = "cuda") -> str:
    from .. import dispatch

    key = (op, blend, int(window), int(seq_len), int(head_dim))
    name = _CHOICES.get(key)
    if name is not None:
        return name
    available = {n for n, ok in dispatch.available_backends().items()
                 if ok and dispatch.backend_runs_on(n, device_type)}
    found = lookup(blend, window, seq_len, head_dim, available)
    if found is not None:
        name, entry = found
        how = (f"measured on {load_table().get('device', '?')} at blend={entry['blend']} W={entry['window']} "
               f"T={entry['seq_len']} d={entry['head_dim']}: "
               + ", ".join(f"{n} {t:.3f} ms" for n, t in sorted(entry["ms"].items()) if t is not None))
    else:
        name = dispatch.fallback_backend(device_type)
        how = f"no measurement in {table_path()} for this shape; fallback by priority"
    _CHOICES[key] = name
    log.info("auto backend: %s blend=%s W=%s T=%s d=%s -> %s (%s)", op, blend, window, seq_len, head_dim,
             name, how)
    return name


@functools.lru_cache(maxsize=None)
def load():
    """KernelOps that choose a backend per call (shape-aware) and run it."""
    from ..dispatch import KernelOps, load_backend

    def hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, *, blend, window, fw, kv_scale, fw_scale, g=None,
                      chunk_size=64):
        name = pick("hybrid_memory", blend, window, v.shape[1], q_kv.shape[-1], v.device.type)
        return load_backend(name).hybrid_memory(q_kv, k_kv, q_fw, k_fw, v, beta, blend=blend, window=window,
                                                fw=fw, kv_scale=kv_scale, fw_scale=fw_scale, g=g,
                                                chunk_size=chunk_size)

    def kv_memory(q, k, v, *, window, scale):
        T = v.shape[1]
        name = pick("kv_memory", "sync", window or T, T, q.shape[-1], v.device.type)
        return load_backend(name).kv_memory(q, k, v, window=window, scale=scale)

    def fw_memory(q, k, v, beta, *, fw, scale, g=None, chunk_size=64):
        # every GPU backend runs the same fla FW kernels: the fallback order decides
        from ..dispatch import fallback_backend
        name = fallback_backend(v.device.type)
        _CHOICES.setdefault(("fw_memory", fw, 0, v.shape[1], q.shape[-1]), name)
        return load_backend(name).fw_memory(q, k, v, beta, fw=fw, scale=scale, g=g, chunk_size=chunk_size)

    disable = torch.compiler.disable
    return KernelOps(disable(hybrid_memory), disable(kv_memory), disable(fw_memory))
