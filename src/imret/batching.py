"""Micro-batching: many threads submit one item each, one worker runs them through a function in batches.

A search server receives queries one by one from concurrent clients. Running each on its own
is wasteful: a single query against a large index streams every vector for one dot product
each (bandwidth-bound), while a batch of queries reuses each vector for all of them (a matrix
product), and GPUs need batches to be busy. Running them all at once on many threads is
worse: the threads fight over the cores and memory and throughput collapses as load grows.

:class:`MicroBatcher` sits between the two: callers ``submit`` an item and get a
:class:`concurrent.futures.Future`; one worker thread takes whatever has queued up (up to
``max_batch`` items, waiting at most ``max_wait_ms`` for more once it has one) and calls
``fn(items) -> results`` once for all of them. Under light load a batch is one item and
adds no latency beyond ``max_wait_ms``; under heavy load batches grow by themselves, since
requests queue while the previous batch runs. A full queue refuses new items
(:class:`BatcherFull`) instead of letting latency grow without bound.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ._checks import positive_int

__all__ = ["BatcherClosed", "BatcherFull", "BatchStats", "MicroBatcher"]

T = TypeVar("T")
R = TypeVar("R")


class BatcherFull(RuntimeError):
    """The queue is at its limit; the caller should shed the request (HTTP 503)."""


class BatcherClosed(RuntimeError):
    """The batcher was closed."""


@dataclass
class BatchStats:
    """Counters of a batcher (read them with :meth:`MicroBatcher.stats`)."""

    batches: int = 0
    items: int = 0
    max_size: int = 0
    errors: int = 0
    busy_s: float = 0.0
    sizes: dict[int, int] = field(default_factory=dict)

    @property
    def mean_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0


_STOP = object()


class MicroBatcher(Generic[T, R]):
    """Run ``fn`` over batches of items submitted from any thread.

    Args:
        fn: maps a list of items to a list of results of the same length, in order. A result
            that is an ``Exception`` instance fails only its own item; an exception raised by
            ``fn`` fails the whole batch.
        max_batch: the most items per call.
        max_wait_ms: once an item is waiting, how long to wait for more before running.
        max_queue: items allowed to wait; beyond it :meth:`submit` raises :class:`BatcherFull`.
        name: the worker thread's name.
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], *, max_batch: int = 16, max_wait_ms: float = 2.0,
                 max_queue: int = 1024, name: str = "imret-batcher"):
        positive_int(max_batch, "max_batch")
        if not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
        positive_int(max_queue, "max_queue")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self._stats = BatchStats()
        self._stats_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T) -> "Future[R]":
        """Queue ``item``; the future resolves to its result (or raises its error)."""
        if self._closed:
            raise BatcherClosed("the batcher is closed")
        fut: Future = Future()
        try:
            self._q.put_nowait((item, fut))
        except queue.Full:
            raise BatcherFull(f"{self._q.maxsize} requests are already waiting") from None
        return fut

    def __call__(self, item: T, timeout: float | None = None) -> R:
        """Submit and wait for the result."""
        return self.submit(item).result(timeout)

    @property
    def pending(self) -> int:
        """Items waiting (not yet taken by the worker)."""
        return self._q.qsize()

    def stats(self) -> BatchStats:
        with self._stats_lock:
            s = self._stats
            return BatchStats(s.batches, s.items, s.max_size, s.errors, s.busy_s, dict(s.sizes))

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop taking items, finish what is queued, and stop the worker."""
        if self._closed:
            return
        self._closed = True
        self._q.put(_STOP)
        self._thread.join(timeout)

    def __enter__(self) -> "MicroBatcher[T, R]":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the worker --------------------------------------------------------------------------

    def _take(self) -> tuple[list[tuple[T, Future]], bool]:
        first = self._q.get()
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        stop = False
        while len(batch) < self.max_batch:
            try:
                left = deadline - time.monotonic()
                nxt = self._q.get_nowait() if left <= 0 else self._q.get(timeout=left)
            except queue.Empty:
                break
            if nxt is _STOP:
                stop = True
                break
            batch.append(nxt)
        return batch, stop

    def _loop(self) -> None:
        stop = False
        while not stop:
            batch, stop = self._take()
            batch = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
            if not batch:
                continue
            t0 = time.perf_counter()
            failed = False
            try:
                results = list(self.fn([item for item, _ in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
            except BaseException as e:  # noqa: BLE001 - handed to every caller of the batch
                failed = True
                for _, fut in batch:
                    fut.set_exception(e)
            else:
                for (_, fut), r in zip(batch, results):
                    if isinstance(r, BaseException):
                        fut.set_exception(r)
                    else:
                        fut.set_result(r)
            with self._stats_lock:
                s = self._stats
                s.batches += 1
                s.items += len(batch)
                s.max_size = max(s.max_size, len(batch))
                s.errors += int(failed)
                s.busy_s += time.perf_counter() - t0
                s.sizes[len(batch)] = s.sizes.get(len(batch), 0) + 1
        # drain anything left after a stop: refuse it
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item[1].set_exception(BatcherClosed("the batcher was closed"))
