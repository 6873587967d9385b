"""Bounded retries for LanceDB calls: commit conflicts and transient object-store errors.

Pure core (no Ray). Every memory call that touches storage goes through :func:`retry_with_backoff`
with a number of attempts *and* a total time budget, so a flaky store costs a bounded delay and
then a clear error, never an endless wait.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable, TypeVar

from worldagent_ray.memory.filters import MemoryFilterError

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# Substrings (lower case) of LanceDB / Lance / object-store error messages that mean "try again":
# another writer committed first, or the store was briefly unreachable, throttled or slow.
TRANSIENT_MARKERS: tuple[str, ...] = (
    "conflict",
    "retry",
    "retryable",
    "preempted",
    "too many requests",
    "slow down",
    "throttl",
    "timed out",
    "timeout",
    "connection reset",
    "connection refused",
    "connection closed",
    "broken pipe",
    "temporarily unavailable",
    "service unavailable",
    "internal server error",
    " 500 ",
    " 502 ",
    " 503 ",
    " 504 ",
)


def is_transient_error(exc: BaseException) -> bool:
    """True for a commit conflict or a transient object-store failure worth retrying.

    Programming and input errors (``TypeError``, ``MemoryFilterError``, ...) never are."""
    if isinstance(exc, (TypeError, MemoryFilterError, KeyError, AttributeError, NotImplementedError)):
        return False
    text = f" {type(exc).__name__} {exc} ".lower()
    return any(m in text for m in TRANSIENT_MARKERS)


# The name writes have used so far; the same rule covers reads.
is_retryable_write_error = is_transient_error


def retry_with_backoff(
    fn: Callable[[], _T],
    *,
    attempts: int,
    base_delay_s: float,
    max_delay_s: float = 2.0,
    deadline_s: float | None = None,
    is_retryable: Callable[[BaseException], bool] = is_transient_error,
    what: str = "write",
) -> _T:
    """Call ``fn`` until it succeeds, retrying retryable errors with jittered exponential backoff.

    Args:
        fn: The call; it must be safe to repeat (idempotent writes, reads).
        attempts: Tries at most.
        base_delay_s: First backoff delay, doubled on each retry (times a jitter in [0.5, 1.5)).
        max_delay_s: Cap of one delay.
        deadline_s: Total time budget in seconds: no retry starts (or sleeps) past it.
        is_retryable: Which errors are retried.
        what: Names the call in log lines.

    Raises:
        The last error when it is not retryable, after ``attempts`` tries, or when the next
        retry would pass the deadline.
    """
    start = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            if attempt >= attempts or not is_retryable(e):
                raise
            delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1)) * (0.5 + random.random())
            if deadline_s is not None and time.monotonic() - start + delay > deadline_s:
                logger.warning("%s failed after %d attempts within its %.1fs budget: %s", what, attempt, deadline_s, e)
                raise
            logger.warning("%s attempt %d/%d failed (%s); retrying in %.3fs", what, attempt, attempts, e, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
