"""Micro-batching: concurrent requests share one model call.

A request hands its prepared input to :meth:`Batcher.submit` and awaits the
result. One collector task takes the first waiting input, then keeps
collecting until ``max_batch`` inputs are in hand or ``window_s`` seconds
have passed since that first one, stacks them and makes ONE model call in a
worker thread (so the event loop keeps accepting requests meanwhile).
Inputs that arrive while the model runs wait for the next call: under load
batches fill without any waiting, and an idle server adds at most
``window_s`` to a lone request. ``max_batch=1`` (or ``window_s=0`` with no
concurrency) turns batching off.

The queue is bounded (``max_queue`` inputs): when it is full, ``submit``
raises :class:`Overloaded` at once (the server answers 503) instead of
letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass

import numpy as np

__all__ = ["Batcher", "Overloaded", "BatchInfo"]


class Overloaded(RuntimeError):
    """The queue is full or the batcher is stopping (the server answers 503)."""


@dataclass(frozen=True)
class BatchInfo:
    """What one model call was: ``size`` inputs, ``seconds`` of model time (wall clock)."""

    size: int
    seconds: float


class Batcher:
    """Collects inputs from concurrent requests into batched model calls.

    Parameters
    ----------
    run : callable
        ``run(batch) -> (outputs, seconds)``: ``batch`` is the inputs stacked
        on a new first axis (``np.stack``), ``outputs`` has one row per
        input. Called in one worker thread, one call at a time.
    max_batch : int
        Most inputs per call (>= 1).
    window_s : float
        Longest wait for more inputs after the first of a batch, seconds (>= 0).
    max_queue : int
        Most inputs waiting (>= 1); more raise :class:`Overloaded`.
    on_batch : callable, optional
        ``on_batch(BatchInfo)`` after every call (metrics).
    """

    def __init__(self, run, *, max_batch=32, window_s=0.002, max_queue=1024, on_batch=None):
        if int(max_batch) < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        if not window_s >= 0:
            raise ValueError(f"batch window {window_s} s must be >= 0")
        if int(max_queue) < 1:
            raise ValueError(f"max_queue={max_queue} must be >= 1")
        self._run, self.max_batch, self.window_s = run, int(max_batch), float(window_s)
        self.max_queue, self.on_batch = int(max_queue), on_batch
        self._queue = None
        self._task = None
        self._loop = None
        self._stopping = False
        # One thread: the model call is the bottleneck and ONNX Runtime
        # already spreads one call over the cores.
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="offload-model")
        self.calls = 0

    @property
    def pending(self):
        """Inputs waiting for a model call."""
        return self._queue.qsize() if self._queue is not None else 0

    def _ensure_started(self):
        loop = asyncio.get_running_loop()
        if self._task is None or self._loop is not loop:
            self._loop = loop
            self._queue = asyncio.Queue(self.max_queue)
            self._task = loop.create_task(self._collect(), name="offload-batcher")

    async def submit(self, x):
        """Queue one input and wait for its output row: ``(row, BatchInfo)``.

        Raises :class:`Overloaded` when the queue is full or the batcher is
        stopping; re-raises the model's exception if its call failed.
        """
        if self._stopping:
            raise Overloaded("the server is shutting down")
        self._ensure_started()
        fut = self._loop.create_future()
        try:
            self._queue.put_nowait((x, fut))
        except asyncio.QueueFull:
            raise Overloaded(f"server overloaded: {self.max_queue} requests already waiting") from None
        return await fut

    async def _collect(self):
        loop = asyncio.get_running_loop()
        q = self._queue
        while True:
            items = [await q.get()]
            deadline = loop.time() + self.window_s
            while len(items) < self.max_batch:
                try:  # take what is already there without waiting
                    items.append(q.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(q.get(), left))
                except asyncio.TimeoutError:
                    break
            live = [(x, f) for x, f in items if not f.done()]  # drop requests already gone
            if not live:
                continue
            try:
                batch = np.stack([x for x, _ in live])
                outputs, seconds = await loop.run_in_executor(self._executor, self._run, batch)
            except asyncio.CancelledError:
                for _, f in live:
                    if not f.done():
                        f.set_exception(Overloaded("the server is shutting down"))
                raise
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for _, f in live:
                    if not f.done():
                        f.set_exception(exc)
                continue
            info = BatchInfo(len(live), float(seconds))
            self.calls += 1
            if self.on_batch is not None:
                self.on_batch(info)
            for i, (_, f) in enumerate(live):
                if not f.done():
                    f.set_result((outputs[i], info))

    async def stop(self):
        """Refuse new inputs, fail the waiting ones with :class:`Overloaded`, end the collector."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping anyway
                pass
            self._task = None
        if self._queue is not None:
            while not self._queue.empty():
                _, f = self._queue.get_nowait()
                if not f.done():
                    f.set_exception(Overloaded("the server is shutting down"))
        self._executor.shutdown(wait=True)
