"""Bounded awaiting that never loses a cancellation.

On Python 3.11, ``asyncio.wait_for`` swallows a cancellation that arrives in the same loop
iteration as its inner awaitable's result (CPython gh-86296, fixed in 3.12): the caller's
``task.cancel()`` is lost and the task runs on. A background loop written as
``while True: await asyncio.wait_for(call(), t); await asyncio.sleep(s)`` then survives its
cancellation, and whoever awaits it after cancelling waits forever. :func:`bounded` uses
``asyncio.timeout`` (3.11+), which delivers such a cancellation.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

__all__ = ["bounded"]

T = TypeVar("T")


async def bounded(aw: Awaitable[T], timeout_s: float) -> T:
    """Await ``aw`` for at most ``timeout_s`` seconds.

    Raises:
        TimeoutError: the time ran out (``aw`` is cancelled).
        asyncio.CancelledError: the caller was cancelled, even if ``aw`` had just finished.
    """
    if hasattr(asyncio, "timeout"):  # Python >= 3.11
        async with asyncio.timeout(timeout_s):
            return await aw
    return await asyncio.wait_for(aw, timeout_s)  # 3.10 has no asyncio.timeout (and the same race)
