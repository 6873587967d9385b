"""Weight publication from the learner to the Action engine replicas (the Ray side).

The learner's rank 0 calls ONE interface, whatever the transport::

    sender = make_weight_sender(cfg.learner, publisher_handle)
    sender.publish(version, named_tensors)      # returns timings and bytes
    sender.wait_synced(version, timeout_s)      # every live replica serves >= version

:func:`make_weight_sender` picks the transport from ``learner.sync_method``:

- ``object_store`` (:class:`ObjectStoreSender`, the default and the CPU path): the state dict
  is ``ray.put`` once in a zero-copy wire format (flat numpy views, read in place by the
  replicas; :func:`~worldagent_ray.rl.weight_sync.pack_state_dict`) and announced with
  ``publish(version, [ref])`` (the caller owns the object; the publisher keeps a reference
  until a newer version replaces it). Replicas also accept a plain dict of tensors.
- ``collective`` (:class:`CollectiveSender`): a fresh broadcast group per version
  (:class:`~worldagent_ray.runtime.collective.NcclBroadcastSync`; ``learner.backend``: NCCL on
  GPU, gloo on CPU) made of the sender (rank 0) and the
  replicas that are live when the version is published (ranks 1..N, listed in the
  announcement); the tensors are broadcast into buffers on the replicas, never through the
  object store. The announcement carries the manifest (names, shapes, dtypes) and the ranks.
  A replica that was not a member of a version's group (it started later, or its receive
  failed) fetches that version from a fallback object-store copy instead.

Engine replicas (each running a :class:`~worldagent_ray.rl.weight_sync.WeightSubscriber`)
register, long-poll :meth:`WeightPublisherActor.wait_newer` (woken the moment a version is
published, so a sync costs no polling delay), load, ``ack``, and heartbeat the version they
serve. ``wait_synced`` tells the learner when every live replica serves a version and names
the laggards when it times out. Replicas come and go with Serve autoscaling (register /
unregister); one that stops heartbeating for ``liveness_timeout_s`` is presumed gone.

A publisher's versions strictly increase; version 0 means "the base weights every engine
starts with" and has no payload.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import ray
import torch

from ..config import LearnerConfig
from ..engines.aio import bounded
from ..engines.base import WeightSyncError
from .collective import NcclBroadcastSync, TensorSpec, tensor_manifest

logger = logging.getLogger(__name__)

__all__ = [
    "WeightPublisherActor",
    "create_publisher_actor",
    "NcclBroadcastSync",
    "TensorSpec",
    "tensor_manifest",
    "WeightSender",
    "ObjectStoreSender",
    "CollectiveSender",
    "make_weight_sender",
    "collective_fetcher",
]


@dataclass
class _Replica:
    acked: int
    last_seen: float
    registered_at: float = field(default_factory=time.monotonic)
    dtype: str | None = None  # the dtype its engine holds weights in


class WeightPublisherActor:
    """The registry of published weight versions and of the engine replicas that follow them.

    Run as an async Ray actor (see :func:`create_publisher_actor`); every method is a
    coroutine on one event loop, so the state needs no locks.

    Args:
        liveness_timeout_s (`float`): a registered replica not heard from (register,
            wait_newer, heartbeat, ack) for this long is presumed gone and no longer waited for.
    """

    def __init__(self, liveness_timeout_s: float = 30.0):
        if liveness_timeout_s <= 0:
            raise ValueError(f"liveness_timeout_s must be > 0, got {liveness_timeout_s}")
        self.liveness_timeout_s = float(liveness_timeout_s)
        self._version = 0
        self._refs: list[Any] = []
        self._collective: dict[str, Any] | None = None
        self._published_at = 0.0
        self._replicas: dict[str, _Replica] = {}
        self._cond = asyncio.Condition()

    # ------------------------------------------------------------------ learner side

    async def publish(self, version: int, refs: list[Any], collective: dict[str, Any] | None = None) -> int:
        """Announce weights ``version``.

        Args:
            version: must be greater than every version published before.
            refs: ``[ObjectRef]`` of the state dict (in a list, so Ray passes the reference
                and the publisher keeps the object alive), or ``[]`` when ``collective`` is
                the only transport.
            collective: for a broadcast: ``{"group", "world_size", "backend", "ranks":
                {replica_id: rank}, "manifest": [TensorSpec, ...]}``.

        Raises:
            ValueError: ``version`` does not increase, or there is no payload at all.
        """
        version = int(version)
        if version <= self._version:
            raise ValueError(
                f"weights version must strictly increase: got {version}, latest published is {self._version}"
            )
        if not isinstance(refs, list) or len(refs) > 1 or (not refs and not collective):
            raise ValueError(
                f"refs must be a one-element list [ObjectRef] (or [] with a collective announcement), got "
                f"{type(refs).__name__} of {len(refs) if isinstance(refs, list) else '?'}"
            )
        self._version, self._refs, self._published_at = version, list(refs), time.monotonic()
        self._collective = dict(collective) if collective else None
        await self._notify()
        logger.info("published weights v%d to %d replica(s)", version, len(self._live()))
        return version

    async def wait_synced(self, version: int, timeout_s: float) -> dict[str, int]:
        """Wait until every live registered replica has acked ``version`` or newer.

        Returns:
            ``{replica_id: acked_version}`` of the live replicas (empty if none is registered).

        Raises:
            WeightSyncError: after ``timeout_s``, naming each lagging replica and its version.
        """
        deadline = time.monotonic() + float(timeout_s)
        async with self._cond:
            while True:
                lagging = self._lagging(int(version))
                if not lagging:
                    return {rid: r.acked for rid, r in self._live().items()}
                left = deadline - time.monotonic()
                if left <= 0:
                    detail = ", ".join(f"{rid} (at v{acked})" for rid, acked in sorted(lagging.items()))
                    raise WeightSyncError(
                        f"weights v{version} not loaded within {timeout_s:.1f}s by {len(lagging)} replica(s): {detail}"
                    )
                try:  # wake on any ack/registration change, and at least every second for liveness
                    await bounded(self._cond.wait(), min(left, 1.0))
                except TimeoutError:
                    pass

    async def live_replicas(self) -> list[str]:
        """Ids of the live registered replicas (sorted)."""
        return sorted(self._live())

    async def wire_dtype(self) -> str | None:
        """The dtype every live replica holds its weights in, or None when they differ or
        are unknown: a sender may cast floating tensors to it before sending (each engine
        would cast them on load anyway), halving the bytes for float32 learners."""
        dtypes = {r.dtype for r in self._live().values()}
        return dtypes.pop() if len(dtypes) == 1 else None

    # ------------------------------------------------------------------ replica side

    async def register(self, replica_id: str, version: int = 0, dtype: str | None = None) -> tuple[int, list[Any]]:
        """Register (or re-register) a replica running ``version`` with weights in ``dtype``;
        returns :meth:`latest`."""
        now = time.monotonic()
        prev = self._replicas.get(replica_id)
        self._replicas[replica_id] = _Replica(acked=max(int(version), prev.acked if prev else -1), last_seen=now,
                                              dtype=dtype)
        await self._notify()
        return self._version, list(self._refs)

    async def unregister(self, replica_id: str) -> bool:
        """Forget a replica (it scaled down); returns whether it was registered."""
        known = self._replicas.pop(replica_id, None) is not None
        await self._notify()
        return known

    async def heartbeat(self, replica_id: str, version: int | None = None) -> None:
        """A replica is alive (and, with ``version``, serves that version)."""
        r = self._replicas.get(replica_id)
        if r is not None:
            r.last_seen = time.monotonic()
            if version is not None and int(version) > r.acked:
                r.acked = int(version)
                await self._notify()

    async def latest(self, replica_id: str | None = None) -> tuple[int, list[Any]]:
        """``(version, [ref])`` of the newest weights (``(0, [])`` before any publish)."""
        if replica_id is not None:
            await self.heartbeat(replica_id)
        return self._version, list(self._refs)

    async def announcement(self, replica_id: str | None = None, version: int | None = None) -> dict[str, Any]:
        """The newest publication: ``{"version", "refs", "collective", "published_ago_s"}``
        (a replica's call is also its heartbeat, with the ``version`` it serves)."""
        if replica_id is not None:
            await self.heartbeat(replica_id, version)
        ago = time.monotonic() - self._published_at if self._published_at else None
        return {"version": self._version, "refs": list(self._refs), "collective": self._collective,
                "published_ago_s": ago}

    async def wait_newer(self, replica_id: str, version: int, timeout_s: float,
                         serving: int | None = None) -> dict[str, Any]:
        """Long poll: return :meth:`announcement` as soon as a version newer than ``version``
        is published, or after ``timeout_s`` (then with the current one). Doubles as the
        replica's heartbeat, reporting ``serving`` (default: ``version``) as the version it
        serves."""
        serving = int(version) if serving is None else int(serving)
        await self.heartbeat(replica_id, serving)
        if self._version <= int(version):
            async with self._cond:
                try:
                    await bounded(self._cond.wait_for(lambda: self._version > int(version)),
                                  max(0.0, float(timeout_s)))
                except TimeoutError:
                    pass
        return await self.announcement(replica_id, serving)

    async def ack(self, replica_id: str, version: int) -> None:
        """A replica now serves ``version`` (an unknown replica is registered by its ack)."""
        now = time.monotonic()
        r = self._replicas.get(replica_id)
        if r is None:
            self._replicas[replica_id] = _Replica(acked=int(version), last_seen=now)
        else:
            r.acked, r.last_seen = max(r.acked, int(version)), now
        await self._notify()

    # ------------------------------------------------------------------ views

    async def status(self) -> dict[str, Any]:
        """Latest version, and per replica: acked version, versions behind, silence, liveness."""
        now = time.monotonic()
        return {
            "version": self._version,
            "published_ago_s": (now - self._published_at) if self._published_at else None,
            "transport": "collective" if self._collective else "object_store",
            "replicas": {
                rid: {"acked": r.acked, "behind": max(0, self._version - r.acked),
                      "seen_ago_s": now - r.last_seen, "live": self._is_live(r, now)}
                for rid, r in sorted(self._replicas.items())
            },
        }

    def _is_live(self, r: _Replica, now: float) -> bool:
        return now - r.last_seen <= self.liveness_timeout_s

    def _live(self) -> dict[str, _Replica]:
        now = time.monotonic()
        return {rid: r for rid, r in self._replicas.items() if self._is_live(r, now)}

    def _lagging(self, version: int) -> dict[str, int]:
        return {rid: r.acked for rid, r in self._live().items() if r.acked < version}

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()


def create_publisher_actor(
    name: str, namespace: str | None = None, liveness_timeout_s: float = 30.0
) -> "ray.actor.ActorHandle":
    """The named publisher actor, created if absent (owned by the calling job, not detached;
    0 CPUs: it only holds references and versions)."""
    return ray.remote(WeightPublisherActor).options(
        name=name, namespace=namespace, get_if_exists=True, lifetime=None, num_cpus=0, max_restarts=0
    ).remote(liveness_timeout_s)


# --------------------------------------------------------------------------- senders


class WeightSender(Protocol):
    """What the learner's rank 0 calls to push weights (see :func:`make_weight_sender`)."""

    def publish(self, version: int, named_tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Announce ``version`` and hand its tensors to the transport. First waits until the
        previously published version is served everywhere (at most one sync in flight), but
        not for this one (see :meth:`wait_synced`). Returns metrics: ``sync_s`` (this call),
        ``published_version``, ``bytes`` sent, and the parts (``wait_previous_s``, ``put_s``...)."""
        ...

    def wait_synced(self, version: int, timeout_s: float) -> dict[str, int]:
        """Block until every live replica serves ``version`` or newer; returns
        ``{replica_id: version}``. Raises ``WeightSyncError`` naming the laggards."""
        ...

    def latest(self) -> int:
        """The newest version the publisher has announced (0 before any)."""
        ...


def _nbytes(named_tensors: Mapping[str, torch.Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in named_tensors.values()))


class ObjectStoreSender:
    """``learner.sync_method='object_store'``: one ``ray.put`` per version.

    Args:
        publisher: the :class:`WeightPublisherActor` handle.
        timeout_s: bound on each call to the publisher.
    """

    def __init__(self, publisher: Any, timeout_s: float = 120.0):
        self.publisher = publisher
        self.timeout_s = float(timeout_s)
        self.last_published: int | None = None

    def _one_in_flight(self) -> float:
        """Wait until the previously published version is served everywhere (at most one sync
        in flight: a replica that stops loading fails the learner loudly, ``WeightSyncError``,
        instead of falling ever further behind). Returns the seconds waited."""
        t0 = time.perf_counter()
        if self.last_published is not None:
            self.wait_synced(self.last_published, self.timeout_s)
        return time.perf_counter() - t0

    def _wire(self, named_tensors: Mapping[str, torch.Tensor]) -> tuple[Mapping[str, torch.Tensor], float]:
        """The tensors as they travel: floating full-model tensors cast to the replicas'
        common dtype (:meth:`WeightPublisherActor.wire_dtype`); LoRA payloads as they are
        (the adapters are merged in float32 on the replica)."""
        from ..rl.weight_sync import is_lora_payload

        t0 = time.perf_counter()
        name = ray.get(self.publisher.wire_dtype.remote(), timeout=self.timeout_s)
        dtype = getattr(torch, name, None) if name else None
        if not isinstance(dtype, torch.dtype) or is_lora_payload(named_tensors):
            return named_tensors, 0.0
        out = {k: (v.detach().to(dtype) if v.is_floating_point() and v.dtype != dtype else v)
               for k, v in named_tensors.items()}
        return out, time.perf_counter() - t0

    def _put(self, named_tensors: Mapping[str, torch.Tensor]) -> tuple[Any, float]:
        """One copy into the object store, in the zero-copy wire format (``pack_state_dict``)."""
        from ..rl.weight_sync import pack_state_dict

        t0 = time.perf_counter()
        ref = ray.put(pack_state_dict(named_tensors))
        return ref, time.perf_counter() - t0

    def publish(self, version: int, named_tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
        t0 = time.perf_counter()
        waited = self._one_in_flight()
        wire, cast_s = self._wire(named_tensors)
        ref, put_s = self._put(wire)
        ray.get(self.publisher.publish.remote(int(version), [ref]), timeout=self.timeout_s)
        self.last_published = int(version)
        return {"sync_s": time.perf_counter() - t0, "published_version": float(version), "bytes": float(_nbytes(wire)),
                "wait_previous_s": waited, "cast_s": cast_s, "put_s": put_s}

    def wait_synced(self, version: int, timeout_s: float) -> dict[str, int]:
        # the actor bounds its own wait; the margin only covers the call itself
        return ray.get(self.publisher.wait_synced.remote(int(version), float(timeout_s)),
                       timeout=float(timeout_s) + self.timeout_s)

    def latest(self) -> int:
        return int(ray.get(self.publisher.latest.remote(), timeout=self.timeout_s)[0])


class CollectiveSender(ObjectStoreSender):
    """``learner.sync_method='collective'``: a broadcast per version to the live replicas.

    Each :meth:`publish` lists the live replicas, announces the version with a fresh group
    name, the manifest and each replica's rank, then joins the group as rank 0 and broadcasts
    tensor by tensor (blocking until every member has received, bounded by ``timeout_s``).
    With ``fallback`` (the default) the tensors are also ``ray.put`` so that replicas outside
    the group (started after the publish, or whose receive failed) can still load the version;
    without it such replicas stay behind until the next version and ``wait_synced`` names them.

    Args:
        publisher: the :class:`WeightPublisherActor` handle.
        backend: ``"nccl"`` (CUDA tensors) or ``"gloo"`` (CPU tensors).
        timeout_s: bound on the publisher calls and on the broadcast.
        fallback: also publish an object-store copy.
    """

    def __init__(self, publisher: Any, backend: str = "gloo", timeout_s: float = 120.0, fallback: bool = True):
        super().__init__(publisher, timeout_s)
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
        self.backend = backend
        self.fallback = fallback
        self.prefix = f"wsync-{uuid.uuid4().hex[:8]}"

    def publish(self, version: int, named_tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
        version = int(version)
        t_start = time.perf_counter()
        waited = self._one_in_flight()
        replicas = ray.get(self.publisher.live_replicas.remote(), timeout=self.timeout_s)
        refs, put_s = [], 0.0
        if self.fallback or not replicas:
            ref, put_s = self._put(named_tensors)
            refs = [ref]
        if not replicas:  # nobody to broadcast to: the object-store copy is the payload
            ray.get(self.publisher.publish.remote(version, refs), timeout=self.timeout_s)
            self.last_published = version
            return {"sync_s": time.perf_counter() - t_start, "published_version": float(version),
                    "bytes": float(_nbytes(named_tensors)), "wait_previous_s": waited, "put_s": put_s,
                    "broadcast_s": 0.0}
        ranks = {rid: i + 1 for i, rid in enumerate(replicas)}
        group = f"{self.prefix}-v{version}"
        manifest = tensor_manifest(named_tensors)
        ray.get(self.publisher.publish.remote(version, refs, {
            "group": group, "world_size": len(ranks) + 1, "backend": self.backend, "ranks": ranks,
            "manifest": manifest, "timeout_ms": int(self.timeout_s * 1000),
        }), timeout=self.timeout_s)
        t0 = time.perf_counter()
        sync = NcclBroadcastSync(group, len(ranks) + 1, 0, backend=self.backend,
                                 timeout_ms=int(self.timeout_s * 1000))
        try:
            sync.setup()
            sync.send(named_tensors)
        except WeightSyncError:
            raise
        except Exception as e:
            raise WeightSyncError(f"broadcast of weights v{version} to {sorted(ranks)} failed: {e}") from e
        finally:
            try:
                sync.destroy()
            except Exception as e:  # a failed setup leaves nothing to destroy
                logger.debug("destroy %s: %s", group, e)
        self.last_published = version
        return {"sync_s": time.perf_counter() - t_start, "published_version": float(version),
                "bytes": float(_nbytes(named_tensors)), "wait_previous_s": waited, "put_s": put_s,
                "broadcast_s": time.perf_counter() - t0}


def make_weight_sender(cfg: LearnerConfig, publisher: Any) -> WeightSender:
    """The sender for ``cfg.sync_method`` (``object_store`` or ``collective`` on
    ``cfg.backend``), bounded by ``cfg.sync_timeout_s``. Call it on the learner's rank 0."""
    if cfg.sync_method == "collective":
        return CollectiveSender(publisher, backend=cfg.backend, timeout_s=cfg.sync_timeout_s)
    return ObjectStoreSender(publisher, timeout_s=cfg.sync_timeout_s)


def collective_fetcher(replica_id: str, device: str | None = None):
    """The replica side of :class:`CollectiveSender`: an async ``fetch(announcement)`` for
    :class:`~worldagent_ray.rl.weight_sync.WeightSubscriber` that joins the version's group
    (when this replica has a rank in it) and receives the broadcast on a worker thread, and
    otherwise, or when the receive fails, awaits the announcement's object-store copy."""

    def receive(c: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        sync = NcclBroadcastSync(c["group"], int(c["world_size"]), int(c["ranks"][replica_id]),
                                 backend=c["backend"], device=device, timeout_ms=int(c.get("timeout_ms", 60_000)))
        try:
            sync.setup()
            return sync.receive(list(c["manifest"]))
        finally:
            try:
                sync.destroy()
            except Exception as e:
                logger.debug("destroy %s: %s", c["group"], e)

    async def fetch(ann: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
        c = ann.get("collective")
        if c and replica_id in c.get("ranks", {}):
            try:
                return await asyncio.to_thread(receive, c)
            except Exception as e:
                if not ann.get("refs"):
                    raise WeightSyncError(f"replica {replica_id!r}: broadcast of v{ann['version']} failed: {e}") from e
                logger.warning("replica %s: broadcast of v%s failed (%s); using the object-store copy",
                               replica_id, ann["version"], e)
        if not ann.get("refs"):
            raise WeightSyncError(
                f"replica {replica_id!r} is not in the broadcast group of v{ann['version']} and there is no "
                f"object-store copy; it catches up at the next version"
            )
        return await ann["refs"][0]

    return fetch
