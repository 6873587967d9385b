"""A micro-batcher: calls that arrive while a batch runs are gathered into the next one.

The transformers fallback has no continuous batching, so concurrent ``generate`` calls would
otherwise run one after another. :class:`MicroBatcher` owns one worker thread. Callers
:meth:`~MicroBatcher.submit` rows and get a future; the worker takes the oldest waiting
request plus every waiting request with the same compatibility key, up to ``max_rows`` rows
in all, runs them as one batch, and hands each caller its own rows' results. A request that
is cancelled before its batch starts is dropped (its rows never run).

The worker holds ``lock`` while a batch runs, so whoever else takes that lock (a weight load)
runs between batches, never during one.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Hashable, TypeVar

from .base import EngineError

logger = logging.getLogger(__name__)

__all__ = ["MicroBatcher"]

R = TypeVar("R")
D = TypeVar("D")


@dataclass
class _Request(Generic[R]):
    key: Hashable
    rows: list[R]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class MicroBatcher(Generic[R, D]):
    """Gather rows of concurrent callers into batches run by one worker thread.

    Args:
        run: ``run(key, rows) -> results`` runs one batch (one result per row, in order).
        max_rows: most rows per batch; a single request larger than this still runs whole
            (``run`` splits it as it must).
        lock: held by the worker while a batch runs.
        name: the worker thread's name.
    """

    def __init__(self, run: Callable[[Hashable, list[R]], list[D]], max_rows: int, lock: threading.Lock,
                 name: str = "micro-batcher"):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self._run = run
        self.max_rows = int(max_rows)
        self._lock = lock
        self._cond = threading.Condition()
        self._queue: deque[_Request[R]] = deque()
        self._closed = False
        self.batches = 0
        self.rows = 0
        self.requests = 0
        self.max_batch_rows = 0
        self.max_batch_requests = 0
        self.running_rows = 0
        self._thread = threading.Thread(target=self._worker, name=name, daemon=True)
        self._thread.start()

    def submit(self, key: Hashable, rows: list[R]) -> concurrent.futures.Future:
        """Queue ``rows`` (all with compatibility ``key``); the future gets their results."""
        req: _Request[R] = _Request(key, list(rows))
        with self._cond:
            if self._closed:
                raise EngineError("the engine is shut down")
            self._queue.append(req)
            self._cond.notify()
        return req.future

    def pending(self) -> int:
        """Requests waiting for a batch."""
        with self._cond:
            return len(self._queue)

    def stats(self) -> dict[str, int]:
        """``batches`` run, ``requests`` and ``rows`` served, the most rows and requests one
        batch gathered, and now: ``pending`` requests and ``running_rows``."""
        return {"batches": self.batches, "requests": self.requests, "rows": self.rows,
                "max_batch_rows": self.max_batch_rows, "max_batch_requests": self.max_batch_requests,
                "pending": self.pending(), "running_rows": self.running_rows}

    def _take(self) -> list[_Request[R]]:
        """The next batch: the oldest live request and the compatible ones behind it."""
        batch: list[_Request[R]] = []
        rows = 0
        keep: deque[_Request[R]] = deque()
        while self._queue:
            req = self._queue.popleft()
            fits = not batch or (req.key == batch[0].key and rows + len(req.rows) <= self.max_rows)
            if not fits:
                keep.append(req)
                continue
            if not req.future.set_running_or_notify_cancel():
                continue  # cancelled before it started: its rows never run
            batch.append(req)
            rows += len(req.rows)
        self._queue = keep
        return batch

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed and not self._queue:
                    return
            with self._lock:
                with self._cond:
                    batch = self._take()
                if batch:
                    self._run_batch(batch)  # never raises: failures go to the batch's futures

    def _run_batch(self, batch: list[_Request[R]]) -> None:
        rows = [r for req in batch for r in req.rows]
        self.running_rows = len(rows)
        try:
            results: list[Any] = self._run(batch[0].key, rows)
            if len(results) != len(rows):
                raise EngineError(f"batch returned {len(results)} results for {len(rows)} rows")
        except BaseException as e:
            for req in batch:
                req.future.set_exception(e)
            return
        finally:
            self.running_rows = 0
        self.batches += 1
        self.requests += len(batch)
        self.rows += len(rows)
        self.max_batch_rows = max(self.max_batch_rows, len(rows))
        self.max_batch_requests = max(self.max_batch_requests, len(batch))
        start = 0
        for req in batch:
            req.future.set_result(results[start : start + len(req.rows)])
            start += len(req.rows)

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new requests, fail the waiting ones, and stop the worker after its batch."""
        with self._cond:
            self._closed = True
            waiting, self._queue = list(self._queue), deque()
            self._cond.notify_all()
        for req in waiting:
            if req.future.set_running_or_notify_cancel():
                req.future.set_exception(EngineError("the engine was shut down before this request ran"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
