"""World memory: episodes in a LanceDB table, retrieved by goal similarity (pure core, no Ray).

Parts: the row layout in :mod:`~worldagent_ray.memory.rows`, filters in
:mod:`~worldagent_ray.memory.filters`, the per-episode summary behind ``ids``/``count``/stats in
:mod:`~worldagent_ray.memory.catalog`, the indices in :mod:`~worldagent_ray.memory.indexes`, the
background thread in :mod:`~worldagent_ray.memory.maintenance`.

Writes are idempotent by episode id (``merge_insert`` on ``id``). LanceDB lets several
processes write one table, but two concurrent ``merge_insert`` calls that both insert the
same *new* id each commit their row (measured: 4 writers, 10 shared ids, 5 duplicates). So:

* on a local folder, writers of a table serialise their merges with a file lock next to the
  table (no duplicate can arise);
* on an object store (no lock), readers collapse duplicate rows to the newest write
  (:func:`~worldagent_ray.memory.rows.write_key`), and maintenance deletes the stale copies.

Every storage call is bounded: reads have a timeout and, like writes, retry commit conflicts
and transient object-store errors with jittered backoff within a budget. Compaction and index
upkeep run on a background thread; an upsert only asks for them. Rows written since the last
index update are searched exactly.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Literal, Sequence, TypeVar

import numpy as np
import pyarrow as pa

from worldagent_ray.checks import check_int, list_of
from worldagent_ray.memory.catalog import CATALOG_COLUMNS, Catalog, mark_row_versions, tracks_row_versions
from worldagent_ray.memory.embed_cache import EmbeddingCache
from worldagent_ray.memory.embedder import Embedder
from worldagent_ray.memory.filters import MemoryFilter, MemoryFilterError, sql_str
from worldagent_ray.memory.indexes import (
    FTS_INDEX,
    REFINE_FACTOR,
    VECTOR_INDEX,
    IndexBuildPolicy,
    ensure_scalar_indices,
    nprobes,
    recorded_training,
)
from worldagent_ray.memory.maintenance import BackgroundMaintainer
from worldagent_ray.memory.upkeep import Upkeep
from worldagent_ray.memory.retry import retry_with_backoff
from worldagent_ray.memory.rows import (
    HIT_COLUMNS,
    WRITE_ORDER,
    episode_row,
    episode_schema,
    hit_from_row,
    newest_per_id,
)
from worldagent_ray.memory.storage import is_local_uri, local_path, storage_options_from_env
from worldagent_ray.schemas import Episode, MemoryHit

QueryType = Literal["vector", "fts", "hybrid"]
QUERY_TYPES: tuple[str, ...] = ("vector", "fts", "hybrid")

_T = TypeVar("_T")


class EpisodeMemory(Upkeep):
    """Episodes in a LanceDB table, retrievable by goal similarity, full text or both.

    Args:
        uri (`str`):
            LanceDB URI: a local folder (created if missing) or an object-store URI (``s3://...``,
            ``gs://...``), passed to ``lancedb.connect`` unchanged.
        table (`str`, *optional*, defaults to `"episodes"`): Table name.
        embedder (`Embedder`, *optional*): Goal encoder; defaults to ``Embedder("minilm")``.
        optimize_every (`int`, *optional*, defaults to `32`):
            Ask for background maintenance (compaction, index upkeep) after this many write commits
            (each :meth:`upsert` batch of up to ``write_batch_size`` episodes is one).
        vector_index_min_rows (`int`, *optional*, defaults to `256`):
            Train the IVF_PQ vector index once the table has this many rows (below it a flat
            search is exact and fast). PQ training needs at least 256 rows.
        retrain_factor (`float`, *optional*, defaults to `2.0`):
            Retrain the vector index (partitions set from the row count) when the table has
            grown by this factor since the last training.
        max_index_segments (`int`, *optional*, defaults to `6`):
            Rebuild the vector index when maintenance has left it in more segments than this
            (each pass adds one for the rows written since the previous pass), at most
            a quarter of the time (see :class:`~worldagent_ray.memory.indexes.IndexBuildPolicy`).
        write_batch_size (`int`, *optional*, defaults to `256`): Rows per ``merge_insert`` commit.
        max_write_attempts (`int`, *optional*, defaults to `8`):
            Tries per commit or maintenance step that fails with a commit conflict or a
            transient object-store error.
        retry_base_delay_s (`float`, *optional*, defaults to `0.05`):
            First backoff delay; doubled on each retry (with jitter), capped at 2 s.
        read_timeout_s (`float`, *optional*, defaults to `30.0`):
            Most time one read query may take; a timed-out or transiently failed read is retried
            (up to ``max_read_attempts`` tries, all within ``max_read_attempts * read_timeout_s``).
        max_read_attempts (`int`, *optional*, defaults to `3`): Tries per read.
        lock_writes (`bool`, *optional*):
            Serialise writers across processes with a file lock. Defaults to ``True`` for local
            folders; object stores cannot be locked (duplicates are then repaired, see module doc).
        read_consistency_s (`float | None`, *optional*, defaults to `0.0`):
            How stale a read may be, in seconds; ``0`` sees other processes' commits at once,
            ``None`` never refreshes (fastest, for a single-writer setup).
        embed_cache_size (`int`, *optional*, defaults to `4096`):
            Goal texts whose embeddings are kept (LRU); see :class:`EmbeddingCache`.
        keep_versions_s (`float | None`, *optional*, defaults to `600`):
            Maintenance deletes table versions older than this (each compaction leaves the
            replaced files behind until then); ``None`` keeps LanceDB's default (7 days). A
            reader still on a deleted version fails, so keep it well above the longest read.
        storage_options (`dict`, *optional*):
            Object-store options for ``lancedb.connect``, over those read from the environment
            (see :func:`~worldagent_ray.memory.storage.storage_options_from_env`).
    """

    def __init__(
        self,
        uri: str,
        table: str = "episodes",
        embedder: Embedder | None = None,
        optimize_every: int = 32,
        *,
        vector_index_min_rows: int = 256,
        retrain_factor: float = 2.0,
        max_index_segments: int = 6,
        write_batch_size: int = 256,
        max_write_attempts: int = 8,
        retry_base_delay_s: float = 0.05,
        read_timeout_s: float = 30.0,
        max_read_attempts: int = 3,
        lock_writes: bool | None = None,
        read_consistency_s: float | None = 0.0,
        embed_cache_size: int = 4096,
        keep_versions_s: float | None = 600.0,
        storage_options: dict[str, str] | None = None,
    ):
        import lancedb

        if not isinstance(uri, str) or not uri:
            raise ValueError(f"uri must be a non-empty str, got {uri!r}")
        if not isinstance(table, str) or not table.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"table must be a name of letters, digits, '_' or '-', got {table!r}")
        for name, value, kind, lo in (
            ("optimize_every", optimize_every, int, 1),
            ("vector_index_min_rows", vector_index_min_rows, int, 256),
            ("write_batch_size", write_batch_size, int, 1),
            ("max_write_attempts", max_write_attempts, int, 1),
            ("max_read_attempts", max_read_attempts, int, 1),
            ("embed_cache_size", embed_cache_size, int, 0),
            ("retrain_factor", retrain_factor, (int, float), 1.1),
            ("max_index_segments", max_index_segments, int, 1),
            ("read_timeout_s", read_timeout_s, (int, float), 1e-9),
            ("keep_versions_s", 0 if keep_versions_s is None else keep_versions_s, (int, float), 0),
        ):
            if isinstance(value, bool) or not isinstance(value, kind) or not value >= lo:
                raise ValueError(f"{name} must be {'an int' if kind is int else 'a number'} >= {lo}, got {value!r}")
        self.uri = uri
        self.table_name = table
        self.embedder = embedder if embedder is not None else Embedder("minilm")
        self.embeddings = EmbeddingCache(self.embedder, capacity=embed_cache_size)
        self.optimize_every = optimize_every
        self.vector_index_min_rows = vector_index_min_rows
        self.retrain_factor = float(retrain_factor)
        self.max_index_segments = max_index_segments
        self.write_batch_size = write_batch_size
        self.max_write_attempts = max_write_attempts
        self.retry_base_delay_s = retry_base_delay_s
        self.read_timeout_s = float(read_timeout_s)
        self.max_read_attempts = max_read_attempts
        self.keep_versions_s = keep_versions_s
        local = is_local_uri(uri)
        if local:
            os.makedirs(local_path(uri), exist_ok=True)
        self.lock_writes = local if lock_writes is None else bool(lock_writes)
        if self.lock_writes and not local:
            raise ValueError(f"lock_writes=True needs a local folder uri, got {uri!r}")
        self._file_lock: Any = contextlib.nullcontext()
        if self.lock_writes:
            from filelock import FileLock

            self._file_lock = FileLock(os.path.join(local_path(uri), f".{table}.write.lock"))
        self._write_lock = threading.RLock()  # this process's writers, one merge at a time
        self._catalog_lock = threading.Lock()
        self._index_lock = threading.Lock()  # index builds: maintenance or a first full-text read
        self._state_lock = threading.Lock()
        consistency = None if read_consistency_s is None else timedelta(seconds=read_consistency_s)
        options = {**(storage_options_from_env(uri) or {}), **(storage_options or {})}
        self._db = lancedb.connect(uri, read_consistency_interval=consistency, storage_options=options or None)
        self._table: Any = None
        self._dim: int | None = None
        self._schema: pa.Schema | None = None
        self._catalog = Catalog()
        self._ann: tuple[int, int] | None = None  # (rows at the last training, partitions)
        self._commits_since_maintenance = 0
        self._index_builds = IndexBuildPolicy(vector_index_min_rows, self.retrain_factor, max_index_segments)
        self._cleanup_older_than: timedelta | None = None
        self._index_names: set[str] | None = None
        self._closed = False
        self._maintainer = BackgroundMaintainer(self._maintain, name=f"memory-maintenance-{table}")

    # ------------------------------------------------------------------ table

    def _open(self, create: bool) -> Any:
        """The table, opening (or, when ``create``, creating) it on first use; None if absent."""
        if self._table is not None:
            return self._table
        with self._state_lock:
            if self._table is not None:
                return self._table
            try:
                table = self._db.open_table(self.table_name)
            except (ValueError, FileNotFoundError):
                if not create:
                    return None
                table = self._create_table()
            self._schema = table.schema
            self._dim = self._schema.field("vector").type.list_size
            self._ann = recorded_training(table)
            self._catalog.row_versions = tracks_row_versions(table)
            self._table = table
            return table

    def _create_table(self) -> Any:
        schema = episode_schema(self.embeddings.dim)
        try:
            # Stable row ids give every row the version that last wrote it (the catalog's feed).
            table = self._db.create_table(
                self.table_name, schema=schema, storage_options={"new_table_enable_stable_row_ids": "true"}
            )
        except Exception:  # another process created it between our open and create
            return self._db.open_table(self.table_name)
        self._retry(lambda: mark_row_versions(table), "mark row versions")
        self._ensure_scalar_indices(table)
        return table

    def _ensure_scalar_indices(self, table: Any) -> None:
        with self._index_lock:
            ensure_scalar_indices(table, self._retry)
            self._index_names = None

    def _indices(self) -> set[str]:
        if self._index_names is None:
            table = self._open(create=False)
            names = set() if table is None else {i.name for i in self._retry(table.list_indices, "list indices")}
            self._index_names = names
        return self._index_names

    def _retry(self, fn: Callable[[], _T], what: str) -> _T:
        return retry_with_backoff(fn, attempts=self.max_write_attempts, base_delay_s=self.retry_base_delay_s, what=what)

    def _read(self, build: Callable[[Any], Any], what: str) -> list[dict[str, Any]]:
        """Run the query ``build(table)`` with the read timeout and retries; rows as dicts."""
        timeout = timedelta(seconds=self.read_timeout_s)

        def attempt() -> list[dict[str, Any]]:
            return build(self._open(create=False)).to_arrow(timeout=timeout).to_pylist()

        return retry_with_backoff(
            attempt,
            attempts=self.max_read_attempts,
            base_delay_s=self.retry_base_delay_s,
            deadline_s=self.max_read_attempts * self.read_timeout_s,
            what=what,
        )

    def _encode(self, texts: list[str]) -> np.ndarray:
        vecs = self.embeddings.encode(texts)
        if self._dim is not None and vecs.shape[1] != self._dim:
            raise ValueError(
                f"table {self.table_name!r} holds {self._dim}-dim vectors but embedder "
                f"{self.embedder.name!r} makes {vecs.shape[1]}-dim ones"
            )
        return vecs

    # ------------------------------------------------------------------ writes

    def upsert(self, episodes: Sequence[Episode]) -> int:
        """Insert or replace episodes by id (idempotent); never waits for maintenance.

        Args:
            episodes (`Sequence[Episode]`): Episodes to write; when an id occurs twice, the later
                one wins.

        Returns:
            `int`: Rows written (inserted plus updated).

        Raises:
            TypeError: when an item is not an ``Episode``.
        """
        episodes = list_of(episodes, Episode, call="upsert", arg="episodes", plural="Episode", one="an Episode")
        if self._closed:
            raise RuntimeError(f"EpisodeMemory at {self.uri!r} is closed")
        unique = list({ep.id: ep for ep in episodes}.values())
        if not unique:
            return 0
        table = self._open(create=True)
        goals = sorted({ep.task.goal for ep in unique})
        vec_by_goal = dict(zip(goals, self._encode(goals)))
        written = commits = 0
        with self._write_lock:
            for start in range(0, len(unique), self.write_batch_size):
                chunk = unique[start : start + self.write_batch_size]
                now = time.time()
                rows = [episode_row(ep, vec_by_goal[ep.task.goal], now) for ep in chunk]
                written += self._merge(table, pa.Table.from_pylist(rows, schema=self._schema))
                commits += 1
        with self._state_lock:
            self._commits_since_maintenance += commits
            due = self._commits_since_maintenance >= self.optimize_every
        if due:
            self._maintainer.request()
        return written

    def _merge(self, table: Any, data: pa.Table) -> int:
        def attempt() -> int:
            with self._file_lock:
                res = (
                    table.merge_insert("id")
                    .when_matched_update_all()
                    .when_not_matched_insert_all()
                    .execute(data)
                )
            return int(res.num_inserted_rows + res.num_updated_rows)

        return self._retry(attempt, f"merge_insert of {data.num_rows} rows into {self.table_name!r}")

    def close(self, timeout_s: float | None = 600.0) -> None:
        """Flush, stop the maintenance thread and release the table; later writes raise."""
        if self._closed:
            return
        try:
            self.flush(timeout_s=timeout_s)
        finally:
            self._closed = True
            self._maintainer.close(timeout_s)
            self._table = None

    # ------------------------------------------------------------------ catalog

    def _sync_catalog(self) -> Catalog:
        """The catalog, brought up to the table's current version (reads changed rows only)."""
        with self._catalog_lock:
            table = self._open(create=False)
            if table is not None:
                version = self._retry(lambda: table.version, "table version")
                self._catalog.sync(version, lambda where: self._read(
                    lambda t: t.search().where(where).select(list(CATALOG_COLUMNS)).limit(None)
                    if where else t.search().select(list(CATALOG_COLUMNS)).limit(None), "catalog sync"))
            return self._catalog

    # ------------------------------------------------------------------ reads

    def retrieve(
        self, goal: str, k: int = 3, *, query_type: QueryType = "vector", oversample: int = 4, **filters: Any
    ) -> list[MemoryHit]:
        """Episodes whose goals are most like ``goal``, successful ones first.

        The ``k * oversample`` nearest candidates passing the filters (a prefilter, computed from
        the bitmap indices, so filtering never empties a non-empty answer) are ordered by success
        (successful first), then score, and the first ``k`` returned.

        Args:
            goal (`str`): The goal to match.
            k (`int`, *optional*, defaults to `3`): Hits wanted; 0 returns ``[]``.
            query_type (`str`, *optional*, defaults to `"vector"`): ``"vector"`` (cosine similarity
                of goal embeddings; score in [-1, 1]), ``"fts"`` (BM25 on goal text) or ``"hybrid"``
                (both, fused by reciprocal-rank fusion).
            oversample (`int`, *optional*, defaults to `4`): Candidate pool size as a multiple of ``k``.
            **filters: Fields of :class:`MemoryFilter` (``success``, ``phase``, ``min_reward``,
                ``run_id``, ``split``, ``status``, ``exclude_run_task``).

        Returns:
            `list[MemoryHit]`: At most ``k`` hits, one per episode.

        Raises:
            MemoryFilterError: for a bad filter, ``k``, ``query_type`` or ``goal``.
        """
        if not isinstance(goal, str) or not goal.strip():
            raise MemoryFilterError(f"goal must be a non-empty str, got {goal!r}")
        check_int("k", k, 0, MemoryFilterError)
        if query_type not in QUERY_TYPES:
            raise MemoryFilterError(f"query_type must be one of {list(QUERY_TYPES)}, got {query_type!r}")
        check_int("oversample", oversample, 1, MemoryFilterError)
        where = MemoryFilter.from_kwargs(filters).where()
        table = self._open(create=False)
        if k == 0 or table is None:
            return []
        goal, pool = goal.strip(), k * oversample
        if query_type != "vector" and FTS_INDEX not in self._indices():
            self._ensure_scalar_indices(table)
        vec = self._encode([goal])[0] if query_type != "fts" else None
        ann = self._ann if query_type == "vector" and VECTOR_INDEX in self._indices() else None
        score_col = {"vector": "_distance", "fts": "_score", "hybrid": "_relevance_score"}[query_type]

        def build(t: Any) -> Any:
            if query_type == "vector":
                q = t.search(vec, vector_column_name="vector").distance_type("cosine")
                if ann is not None:
                    q = q.nprobes(nprobes(ann[1])).refine_factor(REFINE_FACTOR)
            elif query_type == "fts":
                q = t.search(goal, query_type="fts", fts_columns="goal")
            else:
                from lancedb.rerankers import RRFReranker

                q = (t.search(query_type="hybrid", vector_column_name="vector", fts_columns="goal")
                     .vector(vec).text(goal).distance_type("cosine").rerank(RRFReranker()))
            # Name the score column (LanceDB warns when it is projected implicitly); hybrid adds its own.
            q = q.select(list(HIT_COLUMNS) + ([score_col] if query_type != "hybrid" else [])).limit(pool)
            return q.where(where, prefilter=True) if where else q

        rows = self._read(build, f"{query_type} retrieval")
        for r in rows:
            r["_s"] = 1.0 - float(r[score_col]) if query_type == "vector" else float(r[score_col])
        best = newest_per_id(rows)
        best.sort(key=lambda r: (not r["success"], -r["_s"], r["id"]))
        return [hit_from_row(r, r["_s"]) for r in best[:k]]

    def count(self, **filters: Any) -> int:
        """Number of distinct episodes matching the filters (fields of :class:`MemoryFilter`)."""
        return self._sync_catalog().count(MemoryFilter.from_kwargs(filters))

    def get(self, episode_id: str) -> Episode | None:
        """The episode with this id exactly as written last, or ``None`` if absent."""
        if not isinstance(episode_id, str) or not episode_id:
            raise MemoryFilterError(f"episode_id must be a non-empty str, got {episode_id!r}")
        return self._episodes([episode_id], "get").get(episode_id)

    def get_many(self, episode_ids: Sequence[str]) -> dict[str, Episode]:
        """The stored episodes among ``episode_ids``, by id (absent ids are left out); one
        indexed read per 512 ids instead of one per id."""
        ids = list(dict.fromkeys(episode_ids))
        for i, e in enumerate(ids):
            if not isinstance(e, str) or not e:
                raise MemoryFilterError(f"episode_ids[{i}] must be a non-empty str, got {e!r}")
        out: dict[str, Episode] = {}
        for start in range(0, len(ids), 512):
            out.update(self._episodes(ids[start : start + 512], "get_many"))
        return out

    def _episodes(self, ids: list[str], what: str) -> dict[str, Episode]:
        """The stored episodes of ``ids`` (newest write of each), by id."""
        if not ids or self._open(create=False) is None:
            return {}
        where = "id IN (" + ", ".join(sql_str(i) for i in ids) + ")"
        rows = self._read(lambda t: t.search().where(where).select(["id", "episode_json", *WRITE_ORDER]).limit(None), what)
        return {r["id"]: Episode.model_validate_json(r["episode_json"]) for r in newest_per_id(rows)}

    def ids(self, run_id: str | None = None) -> set[str]:
        """Ids of all stored episodes (of one run when ``run_id`` is given)."""
        if run_id is not None:
            MemoryFilter(run_id=run_id)  # validates, naming the value
        return self._sync_catalog().ids(run_id)

    def recent(self, n: int = 10, *, run_id: str | None = None) -> list[Episode]:
        """The ``n`` most recently created episodes (by ``created_at``, newest first)."""
        check_int("n", n, 0, MemoryFilterError)
        if run_id is not None:
            MemoryFilter(run_id=run_id)
        top = self._sync_catalog().recent_ids(n, run_id) if n else []
        by_id = self._episodes(top, "recent")
        return [by_id[i] for i in top if i in by_id]

    def stats_by_phase(self, *, run_id: str | None = None) -> dict[int, dict[str, float]]:
        """Per phase: ``n`` episodes, ``success_rate`` and ``mean_reward``."""
        if run_id is not None:
            MemoryFilter(run_id=run_id)
        return self._sync_catalog().stats_by_phase(run_id)

    def mastered_goals(
        self, threshold: float = 0.8, min_n: int = 2, *, run_id: str | None = None, phase: int | None = None
    ) -> set[str]:
        """Goals attempted at least ``min_n`` times with a success rate of at least ``threshold``."""
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise MemoryFilterError(f"threshold must be a number in [0, 1], got {threshold!r}")
        check_int("min_n", min_n, 1, MemoryFilterError)
        flt = MemoryFilter(run_id=run_id, phase=phase)
        return self._sync_catalog().mastered_goals(float(threshold), min_n, flt.run_id, flt.phase)

    def index_names(self) -> set[str]:
        """Names of the table's indices (``goal_idx`` full text, ``vector_idx`` IVF_PQ, ``id_idx``
        and the bitmap indices of the filter columns)."""
        self._index_names = None
        return set(self._indices())

    def table_stats(self) -> dict[str, int]:
        """Physical state of the table: ``rows`` (including not yet repaired duplicates),
        ``fragments`` and ``version``; zeros when the table does not exist yet."""
        table = self._open(create=False)
        if table is None:
            return {"rows": 0, "fragments": 0, "version": 0}
        st = self._retry(table.stats, "table stats")
        frags = st["fragment_stats"]["num_fragments"] if isinstance(st, dict) else st.fragment_stats.num_fragments
        return {"rows": self._retry(table.count_rows, "count rows"), "fragments": int(frags), "version": int(table.version)}

    def __repr__(self) -> str:
        return f"EpisodeMemory(uri={self.uri!r}, table={self.table_name!r}, embedder={self.embedder!r})"
