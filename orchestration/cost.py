"""The trial's cost axes (`perf/*`): which model the throughput probe measures, alone on its card, once per
architecture.

Size. `probe.size` null measures the trial's own model (the default). A preset (`340M`, `1.3B`) or a mapping
{d_model, n_layers, n_heads, vocab_size} measures a throw-away model of the trial's *architecture* at that size
(`hqlt.blocks.sizes.resized`: memories, window, blend, mix, layer pattern kept; size fields replaced), at
`probe.seq_len` (null: the task's) with `probe.batch_tokens` / `probe.batch_size` sequences per step.

Alone. On a GPU, inside a sweep (a `probes/` folder), the probe holds the card: per card (keyed by the GPU's
UUID, so it holds across Ray's CUDA_VISIBLE_DEVICES renumbering and across hosts sharing the folder) two lock
files in `probes/`: a turnstile and the card lock, both `fcntl.flock`ed (released by the kernel if a process
dies). A probe takes the turnstile, then the card lock exclusively; probes of one card therefore take turns.
With `probe.exclusive` (the default) every training trial on the card holds the card lock shared while it
trains and, at each step boundary, looks at the turnstile: when a probe is waiting it synchronises its
device work, lets go of the card and waits until the probe is done. Its evaluations run inside its hold, so
a probe measures while no other trial's step or evaluation runs on that card. Without `exclusive`, training
goes on beside a probe. Each value says how it was measured: `probe/contended` is 0 only for a GPU
measurement with the card to itself (1: CPU, a GPU outside a sweep or without `exclusive`, or a wait for
the card that passed `probe.lock_timeout_s`), `probe/device` names the card.

Once. The result is cached in `probes/<key>.json` (written atomically), the key a hash of everything the
measurement depends on — the model config at the probe size, sequence length, batch, precision, gradient
clipping, card, torch version — and of nothing else: learning rate, seeds, training length and the task's
data do not enter, so the seeds of a trial, its learning-rate variants and a resumed trial read the value
measured first (`probe/cached` = 1). A per-key lock makes a second trial of the same architecture wait for
the first one's measurement rather than measure again.

Before the trials. A GPU sweep whose candidates are its whole space measures every probe in its warm-up task,
before any trial starts (`startup.measure_probes`): alone on the card with nothing to wait for, so the trials
only read the cache, and no training trial pauses. The card lock above is for the probes left to the trials
(sampled spaces, a warm-up past its time budget).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from hqlt.blocks import HybridLM, estimate
from hqlt.blocks.sizes import resized, size_label
from hqlt.search_space.vocabulary import (PROBE_BATCH_SIZE, PROBE_CACHED, PROBE_CONTENDED, PROBE_D_MODEL,
                                          PROBE_DEVICE, PROBE_FLOPS_PER_TOKEN, PROBE_N_HEADS, PROBE_N_LAYERS,
                                          PROBE_PARAMS, PROBE_SEQ_LEN, PROBE_SIZE, PROBE_VOCAB_SIZE, TIME_PROBE_WAIT)

from . import probe as probe_mod

PROBE_VERSION = 2  # part of the cache key: raise it when the measurement itself changes (2: engine's step)
_POLL_S = 0.05


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class ProbePlan:
    """What one trial's probe measures (before any work)."""

    model: object  # ModelConfig at the probe size (the trial's own when size is null)
    own: bool  # the trial's own model (no throw-away model is built)
    seq_len: int
    batch_size: int
    size: str  # PROBE_SIZE label
    precision: str  # "bf16" or "fp32", resolved for the device
    device_name: str

    def identity(self, train_cfg) -> dict:
        """Everything the measurement depends on (the cache key's content)."""
        model = asdict(self.model)
        model.pop("backend", None)
        # the mixer parts as resolved (name + every option, defaults included): one architecture, one key
        model["mixer"].update({kind: {"name": entry.name, **asdict(opts)}
                               for kind, (entry, opts) in self.model.mixer.parts.items()})
        model["layers"] = self.model.pattern
        return {"version": PROBE_VERSION, "model": model, "backend": self.model.backend, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "precision": self.precision, "device": self.device_name,
                "grad_clip": train_cfg.grad_clip > 0, "engine": train_cfg.engine, "torch": torch.__version__}

    def key(self, train_cfg) -> str:
        text = json.dumps(self.identity(train_cfg), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def plan_probe(cfg, task_seq_len: int, device: torch.device) -> ProbePlan:
    """The probe of trial config `cfg` (a TrialConfig whose model.vocab_size is set)."""
    p = cfg.probe
    model = resized(cfg.model, p.size, "probe.size")
    T = p.seq_len or task_seq_len
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    fields = {"d_model": model.d_model, "n_layers": model.n_layers, "n_heads": model.n_heads,
              "vocab_size": model.vocab_size}
    return ProbePlan(model=model, own=p.size is None, seq_len=T, batch_size=probe_mod.probe_batch_size(p, cfg.train, T),
                     size="own" if p.size is None else size_label(p.size, fields),
                     precision="bf16" if bf16 else "fp32", device_name=device_name(device))


def plan_metrics(plan: ProbePlan) -> dict:
    """The probe's identity keys, carried by every report of the trial."""
    m = plan.model
    return {PROBE_SIZE: plan.size, PROBE_DEVICE: plan.device_name, PROBE_SEQ_LEN: plan.seq_len,
            PROBE_BATCH_SIZE: plan.batch_size, PROBE_D_MODEL: m.d_model, PROBE_N_LAYERS: m.n_layers,
            PROBE_N_HEADS: m.n_heads, PROBE_VOCAB_SIZE: m.vocab_size}


# ------------------------------------------------------------------------------------------------ locks
def _flock(fd: int, mode: int, timeout: Optional[float] = None) -> bool:
    """flock `fd` in `mode` (LOCK_SH / LOCK_EX); with a timeout, poll and give up (False) after it."""
    if timeout is None:
        fcntl.flock(fd, mode)
        return True
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)


def _open_lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def card_id(device: torch.device) -> str:
    """A name for the physical GPU behind `device`: its UUID (stable under CUDA_VISIBLE_DEVICES renumbering)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    if uuid:
        text = str(uuid)
    elif getattr(props, "pci_bus_id", None) is not None:
        text = f"{socket.gethostname()}-pci{getattr(props, 'pci_domain_id', 0)}-{props.pci_bus_id}-" \
               f"{getattr(props, 'pci_device_id', 0)}"
    else:
        text = f"{socket.gethostname()}-{os.environ.get('CUDA_VISIBLE_DEVICES', 'all')}-{index}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


class CardLock:
    """The two lock files of one card in `folder` (see module doc)."""

    def __init__(self, folder: Path, card: str):
        self.turnstile_path = Path(folder) / f"gpu-{card}.turnstile"
        self.card_path = Path(folder) / f"gpu-{card}.lock"

    @contextmanager
    def probing(self, exclusive: bool, timeout: float, waits: Optional[list] = None):
        """Hold the card for a probe. Yields True when it has the card to itself (no trial training on it).
        `waits`: the seconds spent waiting for the locks are appended to it."""
        turn = _open_lock(self.turnstile_path)
        card = _open_lock(self.card_path) if exclusive else None
        try:
            t0 = time.perf_counter()
            alone = _flock(turn, fcntl.LOCK_EX, timeout)
            if card is not None and alone:
                alone = _flock(card, fcntl.LOCK_EX, timeout)
            if waits is not None:
                waits.append(time.perf_counter() - t0)
            yield alone and exclusive
        finally:
            for fd in (card, turn):
                if fd is not None:
                    os.close(fd)  # closing releases the lock

    def trainer(self, device: torch.device) -> "TrainerGate":
        return TrainerGate(self, device)


class TrainerGate:
    """A training trial's side of the card lock: `open()` before training, `boundary(step)` at each step,
    `close()` after (also on errors)."""

    def __init__(self, lock: CardLock, device: torch.device):
        self.lock, self.device = lock, device
        self.turn = self.card = None
        self.pauses = 0
        self.waited_s = 0.0  # time spent waiting for probes (opening included): the trial's TIME_GATE_WAIT

    def _enter(self) -> None:
        t0 = time.perf_counter()
        _flock(self.turn, fcntl.LOCK_SH)  # waits while a probe waits for or holds the card
        fcntl.flock(self.turn, fcntl.LOCK_UN)
        _flock(self.card, fcntl.LOCK_SH)
        self.waited_s += time.perf_counter() - t0

    def open(self) -> "TrainerGate":
        self.turn, self.card = _open_lock(self.lock.turnstile_path), _open_lock(self.lock.card_path)
        self._enter()
        return self

    def boundary(self, step: int = 0) -> None:
        if self.card is None:
            return
        try:
            fcntl.flock(self.turn, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(self.turn, fcntl.LOCK_UN)
            return  # no probe waiting
        except BlockingIOError:
            pass
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # work already queued must not overlap the probe
        fcntl.flock(self.card, fcntl.LOCK_UN)
        self.pauses += 1
        self._enter()

    def close(self) -> None:
        for fd in (self.card, self.turn):
            if fd is not None:
                os.close(fd)
        self.turn = self.card = None


# ------------------------------------------------------------------------------------------------ the cache
def _write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def read_cached(folder: Path, key: str, identity: dict) -> Optional[dict]:
    try:
        data = json.loads((Path(folder) / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    if data.get("identity") != json.loads(json.dumps(identity, default=str)):
        return None
    return data.get("metrics")


# ------------------------------------------------------------------------------------------------ measuring
def _measure(plan: ProbePlan, cfg, model, device: torch.device, flops_per_token: float) -> dict:
    """Time the plan's model (the trial's `model` itself, or a throw-away model at the probe size)."""
    probe_cfg = cfg.probe
    if plan.own:
        target = model
    else:
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the trial's own random streams stay untouched
            torch.manual_seed(0)
            target = HybridLM(plan.model).to(device)
    try:
        sized = type(probe_cfg)(**{**asdict(probe_cfg), "seq_len": plan.seq_len, "batch_size": plan.batch_size,
                                   "batch_tokens": None})
        return probe_mod.probe_throughput(target, sized, cfg.train, vocab_size=plan.model.vocab_size,
                                          seq_len=plan.seq_len, device=device, flops_per_token=flops_per_token)
    finally:
        if not plan.own:
            del target
            if device.type == "cuda":
                torch.cuda.empty_cache()


def run_probe(cfg, model, task_seq_len: int, device: torch.device, folder: Optional[Path] = None) -> dict:
    """The probe's metrics for trial config `cfg` (see module doc): `perf/*`, the probe's identity
    (`probe/*`: size, sequence length, batch, card, cached, contended). `folder`: the sweep's `probes/`
    (None: no cache, no card lock — `hqlt train`)."""
    plan = plan_probe(cfg, task_seq_len, device)
    flops = estimate(plan.model, plan.seq_len).flops_per_token
    out = {**plan_metrics(plan), PROBE_PARAMS: float(_param_count(plan.model)), PROBE_FLOPS_PER_TOKEN: flops}
    if folder is None:
        return {**out, **_measure(plan, cfg, model, device, flops), PROBE_CACHED: 0.0, PROBE_CONTENDED: 1.0}
    folder = Path(folder)
    identity, key = plan.identity(cfg.train), plan.key(cfg.train)
    use_cache = cfg.probe.cache
    waits: list = []  # this trial's waits for locks (not cached: a later reader waits its own time)

    def measure() -> dict:
        if device.type != "cuda":
            return {**_measure(plan, cfg, model, device, flops), PROBE_CONTENDED: 1.0}
        lock = CardLock(folder, card_id(device))
        with lock.probing(cfg.probe.exclusive, cfg.probe.lock_timeout_s, waits) as alone:
            return {**_measure(plan, cfg, model, device, flops), PROBE_CONTENDED: 0.0 if alone else 1.0}

    def timed(metrics: dict) -> dict:
        return {**metrics, TIME_PROBE_WAIT: sum(waits)}

    if not use_cache:
        return timed({**out, **measure(), PROBE_CACHED: 0.0})
    fd = _open_lock(folder / f"{key}.lock")
    try:
        t0 = time.perf_counter()
        _flock(fd, fcntl.LOCK_EX)  # one measurement per architecture: a second trial waits, then reads it
        waits.append(time.perf_counter() - t0)
        hit = read_cached(folder, key, identity)
        if hit is not None:
            return timed({**out, **hit, PROBE_CACHED: 1.0})
        measured = measure()
        _write_atomic(folder / f"{key}.json", {"identity": identity, "metrics": measured, "host": socket.gethostname(),
                                               "measured": time.strftime("%Y-%m-%d %H:%M:%S")})
        return timed({**out, **measured, PROBE_CACHED: 0.0})
    finally:
        os.close(fd)


def _param_count(model_cfg) -> int:
    from hqlt.blocks import param_count

    return param_count(model_cfg)


def trainer_gate(cfg, device: torch.device, folder: Optional[Path]) -> Optional[TrainerGate]:
    """The gate a training trial opens on its card, when probes there should measure alone."""
    if folder is None or device.type != "cuda" or not (cfg.probe.enabled and cfg.probe.exclusive):
        return None
    return CardLock(Path(folder), card_id(device)).trainer(device)


__all__ = ["CardLock", "ProbePlan", "TrainerGate", "card_id", "plan_probe", "read_cached", "run_probe", "trainer_gate"]
