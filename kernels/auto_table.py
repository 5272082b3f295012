"""``backend="auto"`` on CUDA: pick the backend by measurement, per (blend, window, length, head dim).

The table is written by ``hqlt bench kernels --write-auto-table`` (kernels/results/auto_table.json, or the
file named by ``$HQLT_AUTO_TABLE``): one entry per measured (card, blend, W, T, d) with the fwd+bwd time of
each backend (and the FW kind and dtype it was measured with: ``fw`` per entry, ``dtype`` for the table;
"delta" and "bfloat16" when absent; ``device`` per entry, the table's ``device`` when absent). A call uses the
entry nearest to its own shape (same blend; distance = sum of |log2| ratios of W, T and d, plus
``OTHER_CARD_DISTANCE`` for a row measured on another card than the calling one) and the fastest *available*
backend in it; a table may restrict the
choice to the backends it lists under "verified" (those whose GPU parity tests passed): a list holds for every
card; a map from card name to list holds per calling card; a card it does not name gets the map's ``"*"`` entry, or
without one only the backends verified on every card it names.

Shape classes. A backend that runs its own kernel only on part of the calls (the fused Sync-HQLT kernel:
sync + delta, bf16/fp16, d <= 128) and falls back to another backend's ops elsewhere is eligible
only where *both* the call and the measured entry are in its class (``eligible(name, shape)``, handed in by
``dispatch``): its time in a row measured outside the class is the fallback's time, and a row inside the
class says nothing about calls outside it. So "fused" is chosen only for a call of its class whose nearest
measured row of its class has it fastest. Without a table, or when no backend of the entry is available,
the fallback is the highest-priority available backend (fla, else reference). Each new choice is logged
once (logger ``hqlt.kernels``, INFO) and kept in ``choices()``.

This module is the policy only and imports nothing of hqlt.kernels: ``dispatch`` hands it the available
backends, the class rule and the fallback, and builds the per-call ops from its answers.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger("hqlt.kernels")
TABLE_PATH = Path(__file__).resolve().parent / "results" / "auto_table.json"
# A row of another card counts as far away as a 2x different shape: the calling card's own rows win at the same
# shape, but a row at the call's shape on a sibling card (H100 / H200: one architecture, other memory) beats a
# same-card row 4x away in one dimension, whose winner often differs (the fused kernel wins at T 2048 and
# loses at T 32768 on one H200).
OTHER_CARD_DISTANCE = 1.0
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


def entry_device(table: dict, entry: dict) -> str | None:
    return entry.get("device", table.get("device"))


def _dist(entry: dict, window: int, seq_len: int, head_dim: int, other_card: bool = False) -> float:
    return sum(abs(math.log2(max(a, 1) / max(b, 1))) for a, b in
               ((window, entry["window"]), (seq_len, entry["seq_len"]), (head_dim, entry["head_dim"]))) + (
        OTHER_CARD_DISTANCE if other_card else 0.0)


OTHER_CARDS = "*"   # the "verified" map's key for every card it does not name


def verified_on(table: dict, device: str | None) -> set | None:
    """The backends the table's "verified" gate allows on the calling card ``device`` (None: no gate). A list
    holds for every card. A map {card: [backends]} is read per card, because a parity run passes on one card:
    an unnamed card (or ``device`` None) gets the map's ``OTHER_CARDS`` entry, else the backends verified on every
    named card (once a backend has passed on every named card, only an ``OTHER_CARDS`` entry keeps it off the
    cards that never ran it)."""
    verified = table.get("verified")
    if verified is None:
        return None
    if isinstance(verified, dict):
        if device in verified:
            return set(verified[device])
        if OTHER_CARDS in verified:
            return set(verified[OTHER_CARDS])
        lists = [set(v) for v in verified.values()]
        return set.intersection(*lists) if lists else set()
    return set(verified)


def _candidates(table: dict, available, device: str | None = None) -> set:
    """Available backends the table may choose on the calling card: those its "verified" gate allows there
    (``verified_on``), or every available one when the table has no gate."""
    verified = verified_on(table, device)
    return set(available) if verified is None else set(available) & verified


def entry_shape(table: dict, entry: dict) -> dict:
    """The call shape an entry was measured at, in the keys of a call's shape (``pick``); ``measured``: it ran
    (on the measuring card), so no device limit needs checking for it."""
    return {"op": "hybrid_memory", "blend": entry.get("blend"), "window": entry.get("window"),
            "seq_len": entry.get("seq_len"), "head_dim": entry.get("head_dim"), "dv": entry.get("head_dim"),
            "heads": entry.get("heads"), "batch": entry.get("batch"), "fw": entry.get("fw", "delta"),
            "dtype": entry.get("dtype", table.get("dtype", "bfloat16")), "measured": True}


def lookup(blend: str, window: int, seq_len: int, head_dim: int, available, *, shape: dict | None = None,
           eligible: Callable[[str, dict], bool] | None = None, device: str | None = None) -> tuple[str, dict] | None:
    """(fastest available backend, its table entry) for the nearest measured shape, or None. ``device``: the
    calling card's name (``torch.cuda.get_device_name``); None: every row counts as the card's own.

    ``shape``: the call's full shape (keys of ``entry_shape``); ``eligible(name, shape)``: whether backend
    ``name`` runs its own kernel at a shape (None: every backend everywhere). A backend is a candidate in an
    entry only if it is eligible both at the call's shape and at the entry's."""
    table = load_table()
    if table is None:
        return None
    available = _candidates(table, available, device)
    if eligible is not None and shape is not None:
        available = {n for n in available if eligible(n, shape)}
    best = None
    for entry in table["entries"]:
        if entry.get("blend") != blend:
            continue
        ms = {name: t for name, t in entry.get("ms", {}).items() if name in available and t is not None}
        if eligible is not None:
            here = entry_shape(table, entry)
            ms = {name: t for name, t in ms.items() if eligible(name, here)}
        if not ms:
            continue
        d = _dist(entry, window, seq_len, head_dim, device is not None and entry_device(table, entry) != device)
        if best is None or d < best[0]:
            best = (d, min(ms, key=ms.get), entry)
    return None if best is None else (best[1], best[2])


def majority_winner(available, restricted: Iterable[str] = (), device: str | None = None) -> str | None:
    """The available backend that wins most table entries (what ``resolve_backend('auto', 'cuda')`` says);
    backends in ``restricted`` (those with a shape class, which cannot stand for every call) are left out. With
    ``device``, the entries of that card if the table has any."""
    table = load_table()
    if table is None:
        return None
    available = _candidates(table, available, device) - set(restricted)
    entries = [e for e in table["entries"] if entry_device(table, e) == device] or table["entries"]
    wins: dict[str, int] = {}
    for entry in entries:
        ms = {n: t for n, t in entry.get("ms", {}).items() if n in available and t is not None}
        if ms:
            name = min(ms, key=ms.get)
            wins[name] = wins.get(name, 0) + 1
    return max(wins, key=wins.get) if wins else None


def choices() -> dict[tuple, str]:
    """Every (op, blend, W, T, d, fw, dtype) -> backend that auto picked so far in this process."""
    return dict(_CHOICES)


def note_choice(key: tuple, name: str) -> None:
    """Record a choice made without the table (``fw_memory``: the fallback order decides)."""
    _CHOICES.setdefault(key, name)


def pick(op: str, blend: str, window: int, seq_len: int, head_dim: int, *,
         available: Callable[[], Iterable[str]], fallback: Callable[[], str], fw: str = "delta",
         dtype: str = "bfloat16", heads: int | None = None, batch: int | None = None, dv: int | None = None,
         eligible: Callable[[str, dict], bool] | None = None, device: str | None = None) -> str:
    """The backend for a call of ``op`` at this shape: the table's choice among ``available()`` (subject to
    the shape-class rule ``eligible``, see ``lookup``), else ``fallback()``; both are asked only on the first
    call of a (shape, fw, dtype) (the choice is kept and logged)."""
    key = (op, blend, int(window), int(seq_len), int(head_dim), fw, dtype)
    name = _CHOICES.get(key)
    if name is not None:
        return name
    shape = {"op": op, "blend": blend, "window": int(window), "seq_len": int(seq_len), "head_dim": int(head_dim),
             "dv": int(head_dim if dv is None else dv), "heads": heads, "batch": batch, "fw": fw, "dtype": dtype,
             "measured": False}
    found = lookup(blend, window, seq_len, head_dim, available(), shape=shape, eligible=eligible, device=device)
    if found is not None:
        name, entry = found
        how = (f"measured on {entry_device(load_table(), entry) or '?'} at blend={entry['blend']} W={entry['window']} "
               f"T={entry['seq_len']} d={entry['head_dim']}: "
               + ", ".join(f"{n} {t:.3f} ms" for n, t in sorted(entry["ms"].items()) if t is not None))
    else:
        name = fallback()
        how = f"no measurement in {table_path()} for this shape; fallback by priority"
    _CHOICES[key] = name
    log.info("auto backend: %s blend=%s W=%s T=%s d=%s fw=%s %s -> %s (%s)", op, blend, window, seq_len, head_dim,
             fw, dtype, name, how)
    return name
