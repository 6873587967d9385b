"""A writer-preferring readers/writer lock for one asyncio event loop.

Engines and the weight subscriber use it the same way: every generate holds the *read* side
for its whole duration (all its JSON retries included), a weight load holds the *write* side.
So a load waits for the generates in flight to finish (drain), new generates wait while a
load is pending or running (pause), and each generate runs wholly on one set of weights.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

__all__ = ["AsyncRWLock"]


class AsyncRWLock:
    """A writer-preferring readers/writer lock for one event loop.

    Many readers (generate calls) hold it together; a writer (a weight load) holds it alone.
    Once a writer waits, new readers queue behind it, so a stream of generates cannot starve
    a load. Cancelling a waiter (reader or writer) leaves the lock consistent: a writer that
    gives up waiting lets the readers it was holding back proceed.
    """

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @property
    def readers(self) -> int:
        """Readers holding the lock now."""
        return self._readers

    @property
    def writing(self) -> bool:
        """True while a writer holds the lock."""
        return self._writer

    @property
    def writer_waiting(self) -> bool:
        """True while a writer waits for the readers to drain."""
        return self._writers_waiting > 0

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[None]:
        """Hold the shared side for the duration of the ``async with`` block."""
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and self._writers_waiting == 0)
            self._readers += 1
        try:
            yield
        finally:
            async with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    async def acquire_write(self) -> None:
        """Wait until no reader or writer holds the lock, then hold it alone."""
        async with self._cond:
            self._writers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            except BaseException:
                self._writers_waiting -= 1
                self._cond.notify_all()  # readers held back by this writer may go on
                raise
            self._writers_waiting -= 1
            self._writer = True

    async def release_write(self) -> None:
        """Release the exclusive side (call once per :meth:`acquire_write`)."""
        async with self._cond:
            self._writer = False
            self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[None]:
        """Hold the exclusive side for the duration of the ``async with`` block."""
        await self.acquire_write()
        try:
            yield
        finally:
            await asyncio.shield(self.release_write())
