"""The collective transport of weight sync: one sender broadcasts a state dict to N receivers.

:class:`NcclBroadcastSync` is what :class:`~worldagent_ray.runtime.weight_publisher.CollectiveSender`
(the learner's rank 0) and :func:`~worldagent_ray.runtime.weight_publisher.collective_fetcher`
(each engine replica) use, one fresh group per published version.

- ``backend="gloo"`` (CPU tensors) builds its OWN ``torch.distributed.ProcessGroupGloo`` from a
  ``TCPStore`` served by rank 0; it never touches the process's default process group. That
  matters because the sender is rank 0 of a Ray Train DDP learner, whose default group (its
  data-parallel workers) already exists: ``ray.util.collective``'s gloo group (Ray 2.60) is a
  ``dist.new_group`` over that default group and fails there ("the new group's world size
  should be less or equal to the world size set by init_process_group"), and on a replica it
  would pin every later version to the first version's membership. Rank 0 publishes the
  store's ``host:port`` in Ray's internal KV under the group name; the other ranks wait for
  it (bounded by ``timeout_ms``).
- ``backend="nccl"`` (CUDA tensors) goes through ``ray.util.collective``'s NCCL group
  (its own NCCL communicator, independent of torch.distributed), device to device.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass
from typing import Mapping

import torch

from ..engines.base import WeightSyncError

logger = logging.getLogger(__name__)

__all__ = ["NcclBroadcastSync", "TensorSpec", "tensor_manifest"]

_KV_PREFIX = "worldagent_wsync_store:"


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


class _GlooGroup:
    """A gloo process group of its own (see the module docstring): rank 0 serves the store."""

    def __init__(self, name: str, world_size: int, rank: int, timeout_ms: int):
        import ray
        import ray.experimental.internal_kv as kv
        import torch.distributed as dist

        self.name, self.rank = name, rank
        self._key = _KV_PREFIX + name
        timeout = datetime.timedelta(milliseconds=timeout_ms)
        if rank == 0:
            self.store = dist.TCPStore("0.0.0.0", 0, world_size, is_master=True, timeout=timeout,
                                       wait_for_workers=False)
            kv._internal_kv_put(self._key, f"{ray.util.get_node_ip_address()}:{self.store.port}")
        else:
            deadline = time.monotonic() + timeout_ms / 1000
            addr = kv._internal_kv_get(self._key)
            while addr is None:
                if time.monotonic() > deadline:
                    raise WeightSyncError(f"collective group {name!r}: rank 0 did not publish its address "
                                          f"within {timeout_ms} ms")
                time.sleep(0.05)
                addr = kv._internal_kv_get(self._key)
            host, port = addr.decode().rsplit(":", 1)
            self.store = dist.TCPStore(host, int(port), world_size, is_master=False, timeout=timeout)
        # blocks until every rank has joined (bounded by the timeout)
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore(name, self.store), rank, world_size, timeout)

    def broadcast(self, t: torch.Tensor) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([t], opts).wait()

    def close(self) -> None:
        import ray.experimental.internal_kv as kv

        if self.rank == 0:
            try:
                kv._internal_kv_del(self._key)
            except Exception as e:  # the key is only a rendezvous hint; a leftover is harmless
                logger.debug("deleting %s: %s", self._key, e)
        self.pg = None
        self.store = None


class NcclBroadcastSync:
    """Broadcast a state dict from one sender to many receivers.

    For large models on GPUs (``backend="nccl"``, CUDA tensors): weights go device to device,
    never through the object store. The learner's rank 0 is collective rank 0; each engine
    worker that holds a shard of the policy is another rank. All ranks must call
    :meth:`setup` (it rendezvouses), then the sender calls :meth:`send` while every receiver
    calls :meth:`receive` with the same manifest (the manifest and the version travel through
    the :class:`~worldagent_ray.runtime.weight_publisher.WeightPublisherActor`, which stays the
    source of truth for versions and acks). ``backend="gloo"`` runs on CPU tensors with a
    process group of its own (module docstring), also inside a process that already has a
    default torch.distributed group (a DDP learner worker).

    The group's membership is fixed when it is created, so use this path with a fixed number
    of engine replicas; replicas added by autoscaling join through the object-store path.

    Args:
        group_name (`str`): a name shared by all ranks (unique per group).
        world_size (`int`): 1 sender + the number of receivers.
        rank (`int`): 0 for the sender.
        backend (`str`): ``"nccl"`` (GPU) or ``"gloo"`` (CPU).
        device (`str | torch.device | None`): where receive buffers live (default ``cuda``
            for nccl, ``cpu`` for gloo).
        timeout_ms (`int`): bound on the rendezvous and on every gloo operation.
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
        self._gloo: _GlooGroup | None = None

    def setup(self) -> None:
        """Join the collective group (blocks until every rank has joined, or the timeout)."""
        if self._ready:
            return
        if self.backend == "gloo":
            self._gloo = _GlooGroup(self.group_name, self.world_size, self.rank, self.timeout_ms)
        else:
            import ray.util.collective as col

            col.init_collective_group(self.world_size, self.rank, backend="nccl", group_name=self.group_name)
        self._ready = True

    def _check_ready(self) -> None:
        if not self._ready:
            raise WeightSyncError(f"collective group {self.group_name!r} is not set up; call setup() on every rank")

    def _broadcast(self, t: torch.Tensor) -> None:
        if self._gloo is not None:
            self._gloo.broadcast(t)
        else:
            import ray.util.collective as col

            col.broadcast(t, src_rank=0, group_name=self.group_name)

    def send(self, named_tensors: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
        """Rank 0: broadcast every tensor (in manifest order); returns the manifest."""
        self._check_ready()
        if self.rank != 0:
            raise WeightSyncError(f"send() is for rank 0; this is rank {self.rank}")
        manifest = tensor_manifest(named_tensors)
        for spec in manifest:
            t = named_tensors[spec.name].detach()
            if t.device != self.device or not t.is_contiguous():
                t = t.to(self.device).contiguous()
            self._broadcast(t)
        return manifest

    def receive(self, manifest: list[TensorSpec]) -> dict[str, torch.Tensor]:
        """Ranks > 0: allocate buffers per ``manifest`` and receive the broadcast into them."""
        self._check_ready()
        if self.rank == 0:
            raise WeightSyncError("receive() is for ranks > 0; rank 0 sends")
        out: dict[str, torch.Tensor] = {}
        for spec in manifest:
            buf = torch.empty(spec.shape, dtype=getattr(torch, spec.dtype), device=self.device)
            self._broadcast(buf)
            out[spec.name] = buf
        return out

    def destroy(self) -> None:
        if not self._ready:
            return
        if self._gloo is not None:
            self._gloo.close()
            self._gloo = None
        else:
            import ray.util.collective as col

            col.destroy_collective_group(self.group_name)
        self._ready = False
