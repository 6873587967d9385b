"""A private asyncio event loop on a daemon thread, for an engine that must own its loop.

vLLM's ``AsyncLLM`` binds its sockets and its output task to the loop it was created on. The
engine therefore keeps one loop of its own and every caller hops onto it: async callers with
:meth:`LoopThread.run` (their own loop never blocks, and cancelling the caller cancels the
work on the engine loop), sync callers with :meth:`LoopThread.call`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Coroutine, TypeVar

__all__ = ["LoopThread"]

T = TypeVar("T")


class LoopThread:
    """One event loop running forever on a daemon thread.

    Args:
        name: the thread's name (shows up in stack dumps).
    """

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def in_loop(self) -> bool:
        """True when called from the loop's own thread."""
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; cancelling the returned future cancels the task."""
        if not self.alive:
            coro.close()
            raise RuntimeError(f"event loop thread {self._thread.name!r} is stopped")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on the loop from any other loop (or directly when already on it)."""
        if self.in_loop():
            return await coro
        return await asyncio.wrap_future(self.submit(coro))

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and block for its result (not from the loop's thread).

        Raises:
            TimeoutError: ``timeout`` passed; the work on the loop is cancelled.
        """
        if self.in_loop():
            coro.close()
            raise RuntimeError("LoopThread.call() from its own loop would deadlock; await run() instead")
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"no result within {timeout}s") from None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and join the thread (safe to call twice)."""
        if self.loop.is_closed():
            return
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()
