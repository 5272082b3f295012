"""The training batches of one trial, generated ahead of the step that uses them.

    stream = BatchStream(task, batch_size, numpy.random.default_rng([data_seed, order_seed]), count=steps, device=device)
    batch = stream.next()      # a host Batch (pinned on CUDA); the engine copies it to the device
    stream.close()

The batches are ``task.train_batch(batch_size, rng)`` called ``count`` times in order on the one Generator, by one
producer, so the data a seed sees is the same whatever consumes it (eager or graph engine) and whether a thread
produces it: the tasks keep their numpy generators and their data streams.

On CUDA a daemon thread generates up to ``depth`` batches ahead: numpy releases the GIL in its bulk draws
(MQAR at batch 1024 takes ~15 ms of numpy per batch), so generation overlaps the host's launches and the GPU's
work instead of adding to the step. The consumer pins each batch (page-locked memory makes the engine's
host-to-device copy asynchronous); the producer never calls CUDA, because a CUDA call from another thread while
the graph engine captures can invalidate the capture. On CPU the stream is synchronous by default (no thread
competing with torch's intra-op threads).

`position()` is where the stream stands after the batches taken so far (their count, the Generator's state and the
task's `stream_state`), recorded as each batch is made, so a prefetching producer's lead does not show; a stream
built with `start=` that position goes on with the very batches the first would have made next (seed snapshots).
"""
from __future__ import annotations

import queue
import threading
from typing import Optional

import numpy as np
import torch

from .tasks.base import Batch, Task


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class BatchStream:
    def __init__(self, task: Task, batch_size: int, rng: np.random.Generator, *, count: int, device,
                 depth: Optional[int] = None, start: Optional[dict] = None):
        self.task, self.batch_size, self.rng, self.count = task, batch_size, rng, count
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.depth = (3 if self.device.type == "cuda" else 0) if depth is None else depth
        self.taken = 0
        if start is not None:
            rng.bit_generator.state = start["rng"]
            task.restore_stream_state(rng, start["task"])
            self.taken = int(start["taken"])
        self._position = self._made()
        self.closed = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if self.depth > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=self.depth)
            self._thread = threading.Thread(target=self._produce, name="hqlt-batches", daemon=True)
            self._thread.start()

    def _made(self) -> tuple:
        """(Generator state, task stream state) after the batches made so far."""
        return self.rng.bit_generator.state, self.task.stream_state(self.rng)

    def _make(self) -> tuple:
        batch = self.task.train_batch(self.batch_size, self.rng)
        return batch, self._made()

    def _produce(self) -> None:
        try:
            for _ in range(self.count - self.taken):
                item = self._make()
                while not self._put(item):
                    if self._stop.is_set():
                        return
        except BaseException as exc:  # noqa: BLE001 — handed to the consumer, raised there
            while not self._put(_Failed(exc)) and not self._stop.is_set():
                pass

    def _put(self, item) -> bool:
        try:
            self._queue.put(item, timeout=0.1)
            return True
        except queue.Full:
            return False

    def next(self) -> Batch:
        if self.closed or self.taken >= self.count:
            raise StopIteration("the stream is closed" if self.closed else f"all {self.count} batches were taken")
        if self._thread is None:
            batch, self._position = self._make()
        else:
            item = self._queue.get()
            if isinstance(item, _Failed):
                self.taken = self.count
                raise item.exc
            batch, self._position = item
        self.taken += 1
        if self.pin:
            batch = Batch(batch.inputs.pin_memory(), batch.targets.pin_memory(), batch.slices)
        return batch

    def position(self) -> dict:
        """Where the stream stands after the batches taken so far (`start=` of a stream that goes on from there)."""
        rng, task = self._position
        return {"taken": self.taken, "rng": rng, "task": task}

    def __iter__(self):
        while self.taken < self.count:
            yield self.next()

    def close(self) -> None:
        """Stop the producer (it may be blocked on a full queue) and wait for it."""
        self.closed = True
        self._stop.set()
        if self._thread is not None:
            while True:  # drain, so a producer blocked in put() sees the stop flag at its next timeout
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join(timeout=5.0)
            self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["BatchStream"]
