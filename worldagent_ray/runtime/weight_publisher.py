"""Weight publication from the learner to the Action engine replicas (the Ray side).

Two transports:

- **Object store** (:class:`WeightPublisherActor`, the default and the CPU path): the learner
  ``ray.put``\\ s its state dict once (the learner worker owns it; the publisher keeps a
  reference, so it lives until a newer version replaces it) and calls ``publish(version, [ref])``. Engine replicas (each running a
  :class:`~worldagent_ray.rl.weight_sync.WeightSubscriber`) register, poll ``latest``, load and
  ``ack``. ``wait_synced`` tells the learner when every live replica runs a version.
  Works with Serve autoscaling: replicas come and go by ``register`` / ``unregister``, and a
  replica that stops heartbeating for ``liveness_timeout_s`` is presumed gone.
- **Collective broadcast** (:class:`NcclBroadcastSync`, for large models on GPUs): the learner's
  rank 0 and the engine workers form a ``ray.util.collective`` group and the tensors are
  broadcast in place, device to device. The publisher still carries the version and a small
  manifest (names, shapes, dtypes) so receivers can allocate buffers. The same class runs on the
  ``gloo`` backend with CPU tensors, which is how it is tested here.

A publisher's versions strictly increase; version 0 means "the base weights every engine
starts with" and has no payload.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import ray
import torch

from ..engines.base import WeightSyncError

logger = logging.getLogger(__name__)

__all__ = [
    "WeightPublisherActor",
    "create_publisher_actor",
    "NcclBroadcastSync",
    "TensorSpec",
    "tensor_manifest",
]


@dataclass
class _Replica:
    acked: int
    last_seen: float
    registered_at: float = field(default_factory=time.monotonic)


class WeightPublisherActor:
    """The registry of published weight versions and of the engine replicas that follow them.

    Run as an async Ray actor (see :func:`create_publisher_actor`); every method is a coroutine on one event loop, so the
    state needs no locks.

    Args:
        liveness_timeout_s (`float`): a registered replica not heard from (register, latest,
            heartbeat, ack) for this long is presumed gone and no longer waited for.
    """

    def __init__(self, liveness_timeout_s: float = 30.0):
        if liveness_timeout_s <= 0:
            raise ValueError(f"liveness_timeout_s must be > 0, got {liveness_timeout_s}")
        self.liveness_timeout_s = float(liveness_timeout_s)
        self._version = 0
        self._refs: list[Any] = []
        self._published_at = 0.0
        self._replicas: dict[str, _Replica] = {}
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ learner side

    async def publish(self, version: int, refs: list[Any]) -> int:
        """Announce weights ``version``; ``refs`` is ``[ObjectRef]`` of the state dict (in a
        list, so Ray passes the reference and the publisher keeps the object alive).

        Raises:
            ValueError: ``version`` is not greater than the latest published version.
        """
        version = int(version)
        if version <= self._version:
            raise ValueError(
                f"weights version must strictly increase: got {version}, latest published is {self._version}"
            )
        if not isinstance(refs, list) or len(refs) != 1:
            raise ValueError(f"refs must be a one-element list [ObjectRef], got {type(refs).__name__} of {len(refs) if isinstance(refs, list) else '?'}")
        self._version, self._refs, self._published_at = version, list(refs), time.monotonic()
        self._notify()
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
            self._changed.clear()
            try:
                # wake on any ack/registration change, and at least every second for liveness
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, 1.0))
            except asyncio.TimeoutError:
                pass

    # ------------------------------------------------------------------ replica side

    async def register(self, replica_id: str, version: int = 0) -> tuple[int, list[Any]]:
        """Register (or re-register) a replica running ``version``; returns :meth:`latest`."""
        now = time.monotonic()
        prev = self._replicas.get(replica_id)
        self._replicas[replica_id] = _Replica(acked=max(int(version), prev.acked if prev else -1), last_seen=now)
        self._notify()
        return self._version, list(self._refs)

    async def unregister(self, replica_id: str) -> bool:
        """Forget a replica (it scaled down); returns whether it was registered."""
        known = self._replicas.pop(replica_id, None) is not None
        self._notify()
        return known

    async def heartbeat(self, replica_id: str) -> None:
        r = self._replicas.get(replica_id)
        if r is not None:
            r.last_seen = time.monotonic()

    async def latest(self, replica_id: str | None = None) -> tuple[int, list[Any]]:
        """``(version, [ref])`` of the newest weights (``(0, [])`` before any publish)."""
        if replica_id is not None:
            await self.heartbeat(replica_id)
        return self._version, list(self._refs)

    async def ack(self, replica_id: str, version: int) -> None:
        """A replica now serves ``version`` (an unknown replica is registered by its ack)."""
        now = time.monotonic()
        r = self._replicas.get(replica_id)
        if r is None:
            self._replicas[replica_id] = _Replica(acked=int(version), last_seen=now)
        else:
            r.acked, r.last_seen = max(r.acked, int(version)), now
        self._notify()

    # ------------------------------------------------------------------ views

    async def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "version": self._version,
            "published_ago_s": (now - self._published_at) if self._published_at else None,
            "replicas": {
                rid: {"acked": r.acked, "seen_ago_s": now - r.last_seen, "live": self._is_live(r, now)}
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

    def _notify(self) -> None:
        self._changed.set()


def create_publisher_actor(
    name: str, namespace: str | None = None, liveness_timeout_s: float = 30.0
) -> "ray.actor.ActorHandle":
    """The named publisher actor, created if absent (owned by the calling job, not detached;
    0 CPUs: it only holds references and versions)."""
    return ray.remote(WeightPublisherActor).options(
        name=name, namespace=namespace, get_if_exists=True, lifetime=None, num_cpus=0, max_restarts=0
    ).remote(liveness_timeout_s)


# --------------------------------------------------------------------------- collective


@dataclass(frozen=True)
class TensorSpec:
    """What a receiver needs to allocate one tensor before a broadcast."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def tensor_manifest(named_tensors: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    """The broadcast order and buffer specs: names sorted, shapes and dtypes as strings."""
    return [
        TensorSpec(name, tuple(int(x) for x in t.shape), str(t.dtype).removeprefix("torch."))
        for name, t in sorted(named_tensors.items())
    ]


class NcclBroadcastSync:
    """Broadcast a state dict from one sender to many receivers through ``ray.util.collective``.

    For large models on GPUs (``backend="nccl"``, CUDA tensors): weights go device to device,
    never through the object store. The learner's rank 0 is collective rank 0; each engine
    worker that holds a shard of the policy is another rank. All ranks must call
    :meth:`setup` (it rendezvouses), then the sender calls :meth:`send` while every receiver
    calls :meth:`receive` with the same manifest (the manifest and the version travel through
    the :class:`WeightPublisherActor`, which stays the source of truth for versions and acks).
    ``backend="gloo"`` runs the same code on CPU tensors (used by the tests).

    The group's membership is fixed when it is created, so use this path with a fixed number
    of engine replicas; replicas added by autoscaling join through the object-store path.

    Args:
        group_name (`str`): a name shared by all ranks.
        world_size (`int`): 1 sender + the number of receivers.
        rank (`int`): 0 for the sender.
        backend (`str`): ``"nccl"`` (GPU) or ``"gloo"`` (CPU).
        device (`str | torch.device | None`): where receive buffers live (default ``cuda``
            for nccl, ``cpu`` for gloo).
        timeout_ms (`int`): gloo operation timeout.
    """

    def __init__(
        self,
        group_name: str,
        world_size: int,
        rank: int,
        backend: str = "nccl",
        device: str | torch.device | None = None,
        timeout_ms: int = 60_000,
    ):
        if world_size < 2:
            raise ValueError(f"world_size must be >= 2 (a sender and a receiver), got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
        self.group_name, self.world_size, self.rank, self.backend = group_name, world_size, rank, backend
        self.device = torch.device(device if device is not None else ("cuda" if backend == "nccl" else "cpu"))
        self.timeout_ms = int(timeout_ms)
        self._ready = False

    def setup(self) -> None:
        """Join the collective group (blocks until every rank has joined)."""
        import ray.util.collective as col

        if self._ready:
            return
        if self.backend == "gloo":
            col.init_collective_group(
                self.world_size, self.rank, backend="gloo", group_name=self.group_name, gloo_timeout=self.timeout_ms
            )
        else:
            col.init_collective_group(self.world_size, self.rank, backend="nccl", group_name=self.group_name)
        self._ready = True

    def _check_ready(self) -> None:
        if not self._ready:
            raise WeightSyncError(f"collective group {self.group_name!r} is not set up; call setup() on every rank")

    def send(self, named_tensors: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
        """Rank 0: broadcast every tensor (in manifest order); returns the manifest."""
        import ray.util.collective as col

        self._check_ready()
        if self.rank != 0:
            raise WeightSyncError(f"send() is for rank 0; this is rank {self.rank}")
        manifest = tensor_manifest(named_tensors)
        for spec in manifest:
            t = named_tensors[spec.name].detach()
            if t.device != self.device or not t.is_contiguous():
                t = t.to(self.device).contiguous()
            col.broadcast(t, src_rank=0, group_name=self.group_name)
        return manifest

    def receive(self, manifest: list[TensorSpec]) -> dict[str, torch.Tensor]:
        """Ranks > 0: allocate buffers per ``manifest`` and receive the broadcast into them."""
        import ray.util.collective as col

        self._check_ready()
        if self.rank == 0:
            raise WeightSyncError("receive() is for ranks > 0; rank 0 sends")
        out: dict[str, torch.Tensor] = {}
        for spec in manifest:
            buf = torch.empty(spec.shape, dtype=getattr(torch, spec.dtype), device=self.device)
            col.broadcast(buf, src_rank=0, group_name=self.group_name)
            out[spec.name] = buf
        return out

    def destroy(self) -> None:
        import ray.util.collective as col

        if self._ready:
            col.destroy_collective_group(self.group_name)
            self._ready = False
