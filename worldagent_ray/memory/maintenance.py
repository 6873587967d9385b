"""Background maintenance of the episodes table, off the write path (pure core, no Ray).

Writes append small fragments; reads slow down as they pile up, and rows written after the
vector index was trained are searched without it. Compaction and index upkeep therefore run
on one background thread: :meth:`BackgroundMaintainer.request` only raises a flag, so an
upsert never waits for them. LanceDB commits are atomic versions, so readers see the table
before or after a compaction or an index build, never half of one.

"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

logger = logging.getLogger(__name__)


class BackgroundMaintainer:
    """Runs ``job`` on one daemon thread whenever asked, coalescing requests.

    Requests made while the job runs cause one more run after it. A job error is logged and
    kept (:meth:`stats`), and the thread goes on serving later requests.

    Args:
        job (`Callable[[], Any]`): The work; its return value is kept for :meth:`run_now`.
        name (`str`): Thread name (for logs and debuggers).
    """

    def __init__(self, job: Callable[[], Any], name: str = "memory-maintenance"):
        self._job = job
        self._name = name
        self._cv = threading.Condition()
        self._requested = 0  # generation of the latest request
        self._done = 0  # latest request generation covered by a finished run
        self._running = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self._last: tuple[int, Any, BaseException | None] = (0, None, None)
        self._stats: dict[str, Any] = {"runs": 0, "errors": 0, "last_error": None, "last_duration_s": None}

    def request(self) -> int:
        """Ask for a run (returns at once); returns the request's generation."""
        with self._cv:
            if self._closing:
                raise RuntimeError(f"{self._name} is closed")
            self._requested += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._cv.notify_all()
            return self._requested

    def run_now(self, timeout_s: float | None) -> Any:
        """Request a run and wait for it: returns the result of a run that started after this
        call (the latest finished one), or raises its error.

        Raises:
            TimeoutError: when that run has not finished within ``timeout_s`` (it goes on in
                the background).
        """
        gen = self.request()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cv:
            while self._done < gen:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"{self._name} did not finish within {timeout_s:.1f}s (still running)")
                self._cv.wait(left)
            _, result, error = self._last
        if error is not None:
            raise error
        return result

    def wait_idle(self, timeout_s: float | None) -> bool:
        """Wait until every request so far has been served; False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cv:
            while self._done < self._requested and self._thread is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
            return True

    @property
    def busy(self) -> bool:
        """True while a run is in progress or requested."""
        with self._cv:
            return self._running or self._done < self._requested

    def stats(self) -> dict[str, Any]:
        """``runs``, ``errors``, ``last_error`` (text), ``last_duration_s`` and ``busy``."""
        with self._cv:
            return {**self._stats, "busy": self._running or self._done < self._requested}

    def close(self, timeout_s: float | None) -> bool:
        """Serve pending requests, then stop the thread; False if it did not stop in time."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            thread = self._thread
        if thread is None:
            return True
        thread.join(timeout_s)
        return not thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while self._done >= self._requested and not self._closing:
                    self._cv.wait()
                if self._done >= self._requested:  # closing and nothing left to do
                    return
                gen = self._requested
                self._running = True
            t0 = time.monotonic()
            result: Any = None
            error: BaseException | None = None
            try:
                result = self._job()
            except BaseException as e:  # kept for run_now and stats; the thread must live on
                error = e
                logger.warning("%s failed: %r", self._name, e)
            with self._cv:
                self._running = False
                self._done = gen
                self._last = (gen, result, error)
                self._stats["runs"] += 1
                self._stats["last_duration_s"] = time.monotonic() - t0
                if error is not None:
                    self._stats["errors"] += 1
                    self._stats["last_error"] = repr(error)
                self._cv.notify_all()
