"""The rollout buffer actor: an async Ray actor around :class:`~worldagent_ray.rl.buffer.GroupBuffer`.

Producers put each reward-scored group into the object store and hand the buffer only its
metadata and the ``ObjectRef``; the data never passes through the actor. The ref travels
inside a list (``[ref]``) because Ray resolves top-level ``ObjectRef`` arguments but leaves
nested ones alone. The learner's ``get_batch`` returns the refs and fetches the data itself
with ``ray.get``.

Back-pressure: ``put`` waits (an ``asyncio.Condition``) while the buffer is full, until a
``get_batch`` frees space or the timeout passes (then :class:`BufferFullTimeout`). Under
``stale_policy="drop"``, stale groups are evicted whenever the learner's version is known to
advance (``get_batch``, ``set_policy_version``), which also frees space.

Ownership: an object lives as long as its owner (the worker that called ``ray.put``). Put
groups from long-lived processes (the driver or an actor), or the learner gets an
``OwnerDiedError`` when it fetches them.

At-least-once learning: handed-out groups stay in flight (with their refs) until the learner
acknowledges them with :meth:`BufferActor.ack` after a checkpoint that includes them is
durable; the ack also records that checkpoint (:meth:`BufferActor.durable_checkpoint`), so a
restarted learner restores exactly the checkpoint whose groups are acknowledged and
:meth:`BufferActor.restore` hands every other in-flight group out again.

Typical use::

    buffer = create_buffer_actor(cfg.learner, name=cfg.run.name)
    ok = ray.get(buffer.put.remote(meta_of(group), [ray.put(group)]))          # producer
    batch = ray.get(buffer.get_batch.remote(4, version, 30.0))                 # learner
    groups = ray.get([item["ref"] for item in batch])
    ...                                                                        # step, checkpoint
    ray.get(buffer.ack.remote([item["group_id"] for item in batch], {"step": 10, "path": uri}))

Metrics (``ray.util.metrics``, tag ``buffer`` = the buffer's name): gauge
``worldagent_buffer_size``, histogram ``worldagent_buffer_staleness`` (of the groups handed
out), counter ``worldagent_buffer_dropped_total`` (tag ``reason``: duplicate, consumed,
zero_variance, full, stale).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, Mapping

import ray

from ..checks import check_int
from ..rl.buffer import DROP_REASONS, AddResult, BufferEntry, GroupBuffer
from .metrics import BufferMetrics

__all__ = ["BufferActor", "BufferFullTimeout", "buffer_actor_name", "create_buffer_actor"]

logger = logging.getLogger(__name__)

ACTOR_NAME_PREFIX = "worldagent-buffer-"


class BufferFullTimeout(TimeoutError):
    """``put`` waited ``timeout_s`` for space in a full buffer; the group was not queued."""


def buffer_actor_name(name: str) -> str:
    """The Ray actor name of the buffer of a run called ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"buffer actor name must be a non-empty str, got {name!r}")
    return f"{ACTOR_NAME_PREFIX}{name}"


def _unwrap_ref(ref_wrapped: Any) -> ray.ObjectRef:
    if not (isinstance(ref_wrapped, (list, tuple)) and len(ref_wrapped) == 1):
        raise TypeError(
            "ref_wrapped must be a one-element list [ObjectRef] (wrapped so that Ray does not resolve it), "
            f"got {type(ref_wrapped).__name__}"
        )
    ref = ref_wrapped[0]
    if not isinstance(ref, ray.ObjectRef):
        raise TypeError(f"ref_wrapped[0] must be a ray.ObjectRef, got {type(ref).__name__}")
    return ref


class BufferActor:
    """Async Ray actor holding refs of scored groups; see the module docstring.

    Args:
        put_timeout_s (`float | None`): default wait of ``put`` on a full buffer (None: forever).
        name (`str`): value of the ``buffer`` metrics tag.
        **buffer: the keyword arguments of :class:`GroupBuffer` (``max_groups``, ``max_staleness``,
            ``stale_policy``, ``drop_zero_variance``, ``zero_variance_tol``), checked there.
    """

    def __init__(self, put_timeout_s: float | None = 60.0, name: str = "default", **buffer: Any):
        if put_timeout_s is not None and put_timeout_s < 0:
            raise ValueError(f"put_timeout_s must be >= 0 or None, got {put_timeout_s}")
        self._core = GroupBuffer(**buffer)
        self._put_timeout_s = put_timeout_s
        self._version = 0
        self._cond = asyncio.Condition()
        self._closed = False  # set by the producer when no more groups will come
        self._durable: dict[str, Any] | None = None  # the checkpoint of the latest ack
        self._last_pull: float | None = None  # monotonic time of the learner's latest get_batch
        self._name = name
        self._m = BufferMetrics(name)
        self._m.size.set(0)
        # the learner's per-step metrics, kept for the driver's ledger (bounded: the oldest go)
        self._steps: collections.deque[tuple[int, float, dict[str, float]]] = collections.deque(maxlen=10_000)
        self._steps_total = 0

    # ------------------------------------------------------------------ helpers

    def _publish(self, dropped_before: Mapping[str, int], taken: list[BufferEntry] = ()) -> None:
        self._m.size.set(len(self._core))
        for r in DROP_REASONS:
            d = self._core.dropped[r] - dropped_before[r]
            if d > 0:
                self._m.dropped.inc(d, tags={"reason": r})
        for e in taken:
            self._m.staleness.observe(e.staleness)

    def _advance(self, version: int) -> None:
        check_int("current_version", version, 0)
        self._version = max(self._version, version)
        if self._core.evict_stale(self._version):
            self._cond.notify_all()

    # ------------------------------------------------------------------ API

    async def put(self, meta: dict[str, Any], ref_wrapped: list[ray.ObjectRef], timeout_s: float | None = -1.0,
                  count_full: bool = True) -> bool:
        """Queue one group: ``meta`` (see :func:`~worldagent_ray.rl.buffer.meta_of`) and ``[ref]``.

        Waits while the buffer is full. ``timeout_s``: seconds to wait (``None`` forever, ``0``
        not at all, negative: the actor's ``put_timeout_s``). ``count_full=False``: a timeout is
        not counted as a ``full`` refusal (a caller polling in short waits counts its last one).

        Returns:
            `bool`: True if queued; False if refused as duplicate, consumed or zero-variance
            (counted in ``stats()["dropped"]``).

        Raises:
            BufferFullTimeout: still full after ``timeout_s`` (counted as ``full`` if ``count_full``).
            ValueError / TypeError: malformed ``meta`` or ``ref_wrapped``.
        """
        entry = BufferEntry.from_meta(meta, _unwrap_ref(ref_wrapped))
        wait = self._put_timeout_s if timeout_s is not None and timeout_s < 0 else timeout_s
        async with self._cond:
            before = dict(self._core.dropped)
            loop = asyncio.get_running_loop()
            deadline = None if wait is None else loop.time() + wait
            while self._core.check(entry) is AddResult.FULL:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    if count_full:
                        self._core.add(entry)  # counts the refusal as "full"
                    self._publish(before)
                    raise BufferFullTimeout(
                        f"buffer {self._name!r} stayed full ({self._core.max_groups} groups) for {wait} s; "
                        f"group {entry.group_id!r} not queued"
                    )
                try:
                    await asyncio.wait_for(self._cond.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
            result = self._core.add(entry)
            self._publish(before)
            if result.accepted:
                self._cond.notify_all()
            return result.accepted

    async def get_batch(self, n: int, current_version: int, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Take ``n`` groups, oldest first, waiting up to ``timeout_s`` (None: forever) for them.

        On timeout returns what is there (possibly fewer than ``n``, possibly none). Each item
        is the group's metadata (``group_id``, ``policy_version``, ``staleness``,
        ``needs_correction``, reward stats, ...) plus ``"ref"``, the ``ObjectRef`` of its data.
        """
        check_int("n", n, 1)
        self._last_pull = time.monotonic()
        async with self._cond:
            before = dict(self._core.dropped)
            self._advance(current_version)
            loop = asyncio.get_running_loop()
            deadline = None if timeout_s is None else loop.time() + timeout_s
            while len(self._core) < n and not self._closed:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._cond.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
                self._advance(current_version)
            taken = self._core.take(n, current_version)
            self._publish(before, taken)
            if taken:
                self._cond.notify_all()  # space for waiting producers
            return [{**e.meta(), "ref": e.ref} for e in taken]

    async def ack(self, group_ids: list[str], checkpoint: dict[str, Any] | None = None) -> int:
        """Acknowledge in-flight groups whose training is in a durable checkpoint; they leave
        the buffer (and their refs are released).

        Args:
            group_ids: the groups trained since the previous acknowledgement.
            checkpoint: that checkpoint, e.g. ``{"step": 10, "path": uri}``; kept as
                :meth:`durable_checkpoint` (the newest one wins).

        Returns:
            How many groups were acknowledged now (ids acknowledged before are ignored; unknown
            ids are logged).
        """
        async with self._cond:
            done, unknown = self._core.ack(group_ids)
            if unknown:
                logger.warning("buffer %r: ack of %d unknown group ids, e.g. %s", self._name, len(unknown), unknown[:3])
            if checkpoint is not None and checkpoint.get("path"):
                if self._durable is None or int(checkpoint.get("step", 0)) >= int(self._durable.get("step", 0)):
                    self._durable = dict(checkpoint)
            return done

    async def durable_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint passed with the newest :meth:`ack` (``None`` before the first)."""
        return None if self._durable is None else dict(self._durable)

    async def restore(self, trained_ids: list[str], checkpoint: dict[str, Any] | None = None) -> list[str]:
        """A learner (re)started from ``checkpoint`` (``None``: from scratch), which contains the
        training of ``trained_ids``: those are acknowledged and every other in-flight group goes
        back to the front of the queue (hand-out order) to be trained again. Returns the
        requeued ids."""
        async with self._cond:
            ids = self._core.restore(trained_ids)
            if checkpoint is not None and checkpoint.get("path"):
                self._durable = dict(checkpoint)
            self._m.size.set(len(self._core))
            if ids:
                self._cond.notify_all()
            return ids

    async def close(self) -> None:
        """The producer is done: waiting and later ``get_batch`` calls return at once with
        what is left, so the learner drains the buffer and then stops (see :meth:`drained`)."""
        async with self._cond:
            self._closed = True
            self._cond.notify_all()

    async def drained(self) -> bool:
        """True once the producer closed the buffer and every queued group was taken (groups
        may still be in flight: the learner acknowledges them when it stops)."""
        return self._closed and len(self._core) == 0

    async def set_policy_version(self, version: int) -> int:
        """Tell the buffer the learner's version; under ``"drop"`` stale groups are evicted now.

        Returns the number of queued groups afterwards.
        """
        async with self._cond:
            before = dict(self._core.dropped)
            self._advance(version)
            self._publish(before)
            return len(self._core)

    async def record_step(self, metrics: dict[str, float]) -> int:
        """Keep one optimizer step's metrics (the learner's rank 0 calls it after each step)
        for :meth:`steps_since`; returns the step record's sequence number."""
        self._steps.append((self._steps_total, time.time(), {k: float(v) for k, v in metrics.items()
                                                              if isinstance(v, (int, float)) and not isinstance(v, bool)}))
        self._steps_total += 1
        return self._steps_total - 1

    async def steps_since(self, seq: int) -> tuple[list[tuple[float, dict[str, float]]], int]:
        """The step records from sequence number ``seq`` on (``(time, metrics)`` each; older ones
        than the last 10,000 are gone) and the next sequence number to ask for."""
        return [(t, m) for i, t, m in self._steps if i >= seq], self._steps_total

    async def size(self) -> int:
        return len(self._core)

    async def stats(self) -> dict[str, Any]:
        """:meth:`GroupBuffer.stats` at the latest known policy version, plus ``policy_version``,
        ``closed``, ``durable_step`` (of the newest acknowledged checkpoint, -1 before one) and
        ``since_last_pull_s`` (seconds since the learner's latest ``get_batch``; None before)."""
        since = None if self._last_pull is None else time.monotonic() - self._last_pull
        return {**self._core.stats(self._version), "policy_version": self._version, "name": self._name,
                "closed": self._closed, "durable_step": -1 if self._durable is None else int(self._durable.get("step", -1)),
                "since_last_pull_s": since}

    async def state_dict(self) -> dict[str, Any]:
        """:meth:`GroupBuffer.state_dict` plus the latest known policy version (JSON-safe)."""
        return {**self._core.state_dict(), "policy_version": self._version}

    async def load_state_dict(self, state: dict[str, Any]) -> None:
        async with self._cond:
            self._core.load_state_dict(state)
            self._version = max(self._version, int(state.get("policy_version", 0)))
            self._m.size.set(len(self._core))


def create_buffer_actor(
    learner_cfg: Any,
    name: str = "default",
    *,
    put_timeout_s: float | None = 60.0,
    namespace: str | None = None,
    get_if_exists: bool = True,
) -> "ray.actor.ActorHandle":
    """Start (or look up) the named buffer actor configured by a ``LearnerConfig``.

    Uses ``buffer_max_groups``, ``max_staleness``, ``stale_policy`` and ``drop_zero_variance``
    of ``learner_cfg``. The actor needs no CPU of its own (``num_cpus=0``): it only does
    bookkeeping. Not restartable: a restarted buffer would have lost its refs; the learner
    restores acknowledged ids with ``load_state_dict`` instead.
    """
    return (
        ray.remote(BufferActor)
        .options(
            name=buffer_actor_name(name),
            namespace=namespace,
            get_if_exists=get_if_exists,
            num_cpus=0,
            max_concurrency=1000,
        )
        .remote(
            put_timeout_s=put_timeout_s,
            name=name,
            max_groups=learner_cfg.buffer_max_groups,
            max_staleness=learner_cfg.max_staleness,
            stale_policy=learner_cfg.stale_policy,
            drop_zero_variance=learner_cfg.drop_zero_variance,
        )
    )
