"""The world-memory actor: one named Ray actor that owns the run's :class:`EpisodeMemory`.

The actor is the single writer of the episodes table; every other part reads through it.
It is a threaded actor (``max_concurrency``), so ``retrieve`` calls run while an ``upsert``
is in progress: LanceDB reads are safe alongside a write, and :class:`EpisodeMemory`
serialises writes internally. Compaction and index upkeep run on the store's own background
thread, so neither reads nor writes wait for them.

Every call is bounded inside the store: reads have a timeout (``memory.read_timeout_s``) and,
like writes, retry transient object-store errors with backoff; ``optimize``, ``flush`` and
``close`` wait at most ``timeout_s`` for maintenance (which then goes on in the background).
``ids``, ``count``, ``stats_by_phase`` and ``mastered_goals`` read only the rows written since
their last call (see :mod:`worldagent_ray.memory.catalog`).

Typical use from the driver::

    memory = create_memory_actor(cfg, run_dir, name=cfg.run.name)
    ray.get(memory.upsert.remote(episodes))
    hits = ray.get(memory.retrieve.remote("put the apple in the bowl", 3))
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Literal

import ray

from ..config import Config
from ..memory.embedder import Embedder
from ..memory.store import EpisodeMemory, QueryType
from ..schemas import Episode, MemoryHit
from .placement import actor_options

ACTOR_NAME_PREFIX = "worldagent-memory-"
DEFAULT_MAX_CONCURRENCY = 8
DEFAULT_MAINTENANCE_TIMEOUT_S = 600.0


def memory_actor_name(name: str) -> str:
    """The Ray actor name for a run called ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"memory actor name must be a non-empty str, got {name!r}")
    return f"{ACTOR_NAME_PREFIX}{name}"


class MemoryActor:
    """Ray actor around :class:`EpisodeMemory`; see that class for the meaning of each method.

    Args:
        uri (`str`): LanceDB URI (local folder or object store; object-store credentials come
            from this process's environment, see :func:`~worldagent_ray.memory.storage_options_from_env`).
        table (`str`, *optional*, defaults to `"episodes"`): Table name.
        embedder (`str`, *optional*, defaults to `"minilm"`): Embedder name or path.
        optimize_every (`int`, *optional*, defaults to `32`): Ask for maintenance after this many write commits.
        query_type (`str`, *optional*, defaults to `"vector"`): Default ``query_type`` of :meth:`retrieve`.
        device (`str`, *optional*, defaults to `"cpu"`): Torch device of the embedder.
        num_threads (`int`, *optional*): Torch threads of this actor's process (see :class:`Embedder`).
        **memory_kwargs: Further keyword arguments of :class:`EpisodeMemory`.
    """

    def __init__(
        self,
        uri: str,
        table: str = "episodes",
        embedder: str = "minilm",
        optimize_every: int = 32,
        query_type: QueryType = "vector",
        device: str = "cpu",
        num_threads: int | None = None,
        **memory_kwargs: Any,
    ):
        self.default_query_type = query_type
        self.memory = EpisodeMemory(
            uri,
            table=table,
            embedder=Embedder(embedder, device=device, num_threads=num_threads),
            optimize_every=optimize_every,
            **memory_kwargs,
        )

    def ready(self) -> bool:
        """Load the embedder (so the first request does not pay for it) and report readiness."""
        _ = self.memory.embedder.dim
        return True

    def upsert(self, episodes: list[Episode]) -> int:
        return self.memory.upsert(episodes)

    def retrieve(self, goal: str, k: int = 3, *, query_type: QueryType | None = None, **filters: Any) -> list[MemoryHit]:
        return self.memory.retrieve(goal, k, query_type=query_type or self.default_query_type, **filters)

    def count(self, **filters: Any) -> int:
        return self.memory.count(**filters)

    def get(self, episode_id: str) -> Episode | None:
        return self.memory.get(episode_id)

    def get_many(self, episode_ids: list[str]) -> dict[str, Episode]:
        return self.memory.get_many(episode_ids)

    def ids(self, run_id: str | None = None) -> set[str]:
        return self.memory.ids(run_id)

    def recent(self, n: int = 10, run_id: str | None = None) -> list[Episode]:
        return self.memory.recent(n, run_id=run_id)

    def stats_by_phase(self, run_id: str | None = None) -> dict[int, dict[str, float]]:
        return self.memory.stats_by_phase(run_id=run_id)

    def mastered_goals(self, threshold: float = 0.8, min_n: int = 2, run_id: str | None = None) -> set[str]:
        return self.memory.mastered_goals(threshold, min_n, run_id=run_id)

    def optimize(
        self, cleanup_older_than_s: float | None = None, timeout_s: float = DEFAULT_MAINTENANCE_TIMEOUT_S
    ) -> dict[str, int]:
        """Run maintenance now; ``TimeoutError`` after ``timeout_s`` (it goes on in the background)."""
        older = None if cleanup_older_than_s is None else timedelta(seconds=cleanup_older_than_s)
        return self.memory.optimize(cleanup_older_than=older, timeout_s=timeout_s)

    def flush(self, timeout_s: float = DEFAULT_MAINTENANCE_TIMEOUT_S) -> dict[str, int]:
        return self.memory.flush(timeout_s=timeout_s)

    def close(self, timeout_s: float = DEFAULT_MAINTENANCE_TIMEOUT_S) -> None:
        self.memory.close(timeout_s=timeout_s)

    def table_stats(self) -> dict[str, int]:
        return self.memory.table_stats()

    def maintenance_stats(self) -> dict[str, Any]:
        return self.memory.maintenance_stats()

    def info(self) -> dict[str, Any]:
        """URI, table, index names and embedding-cache counters (for the run report and debugging)."""
        return {
            "uri": self.memory.uri,
            "table": self.memory.table_name,
            "indices": sorted(self.memory.index_names()),
            "embed_cache": self.memory.embeddings.stats(),
        }


def create_memory_actor(
    cfg: Config,
    run_dir: str,
    name: str,
    *,
    namespace: str | None = None,
    lifetime: Literal["detached"] | None = None,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    wait_ready: bool = True,
) -> Any:
    """The run's memory actor, created on first call and looked up by name afterwards.

    Args:
        cfg (`Config`): Uses ``cfg.memory`` (uri, table, embedder, optimize_every, query_type,
            retrain_factor, embed_cache_size, read_timeout_s, keep_versions_s) and
            ``cfg.resources.memory`` (num_cpus, num_gpus).
        run_dir (`str`): Run folder or URI; the table lives under ``<run_dir>/memory`` unless
            ``cfg.memory.uri`` is set.
        name (`str`): Run name; the actor is called ``worldagent-memory-<name>``.
        namespace (`str`, *optional*): Ray namespace of the actor (default: the job's).
        lifetime (`str`, *optional*): ``"detached"`` to outlive the driver; default tied to it.
        max_concurrency (`int`, *optional*, defaults to `8`): Threads serving calls, so reads
            do not queue behind writes.
        wait_ready (`bool`, *optional*, defaults to `True`): Block until the embedder is loaded.

    Returns:
        `ray.actor.ActorHandle`: Handle of the :class:`MemoryActor`.
    """
    if not cfg.memory.enabled:
        raise ValueError("memory.enabled is false; no memory actor is created for this config")
    if not isinstance(run_dir, str) or not run_dir:
        raise ValueError(f"run_dir must be a non-empty str, got {run_dir!r}")
    m = cfg.memory
    uri = m.uri or f"{run_dir.rstrip('/')}/memory"
    if "://" not in uri:
        uri = os.path.abspath(uri)  # the actor's working directory may differ from the driver's
    res = cfg.resources.memory
    actor = (
        ray.remote(MemoryActor)
        .options(
            name=memory_actor_name(name),
            namespace=namespace,
            lifetime=lifetime,
            get_if_exists=True,
            **actor_options(res),
            max_concurrency=max_concurrency,
            max_restarts=1,
            max_task_retries=1,  # safe: writes are idempotent by episode id, the rest only read
        )
        .remote(
            uri,
            table=m.table,
            embedder=m.embedder,
            optimize_every=m.optimize_every,
            query_type=m.query_type,
            device="cuda" if res.num_gpus > 0 else "cpu",
            num_threads=max(1, int(res.num_cpus)),  # match the CPUs reserved for the actor
            retrain_factor=m.retrain_factor,
            embed_cache_size=m.embed_cache_size,
            read_timeout_s=m.read_timeout_s,
            keep_versions_s=m.keep_versions_s,
        )
    )
    if wait_ready:
        ray.get(actor.ready.remote())
    return actor
