"""World memory: episodes in a LanceDB table, retrieved by goal similarity.

Pure core (no Ray). One row per :class:`~worldagent_ray.schemas.Episode`: flat columns for
filtering and search, the goal embedding in ``vector``, and the full episode as JSON in
``episode_json`` so that :meth:`EpisodeMemory.get` returns exactly what was written.

Writes are idempotent by episode id (``merge_insert`` on ``id``). LanceDB lets several
processes write one table, but two concurrent ``merge_insert`` calls that both insert the
same *new* id each commit their row (measured: 4 writers, 10 shared ids, 5 duplicates). So:

* on a local folder, writers of a table serialise their merges with a file lock next to the
  table (no duplicate can arise);
* on an object store (no lock), readers collapse duplicate rows to the newest write
  (``updated_at``, then ``write_id``), and :meth:`EpisodeMemory.optimize` deletes the stale
  copies.

Commit conflicts that LanceDB does not resolve itself are retried with exponential backoff.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
import uuid
from collections import Counter
from datetime import timedelta
from typing import Any, Callable, Literal, Sequence, TypeVar

import numpy as np
import pyarrow as pa

from worldagent_ray.memory.embedder import Embedder
from worldagent_ray.schemas import Episode, MemoryHit

logger = logging.getLogger(__name__)

QueryType = Literal["vector", "fts", "hybrid"]
QUERY_TYPES: tuple[str, ...] = ("vector", "fts", "hybrid")
STATUSES: tuple[str, ...] = ("ok", "failed")
SPLITS: tuple[str, ...] = ("train", "heldout")
PHASES: tuple[int, ...] = (1, 2, 3)

_T = TypeVar("_T")

# Substrings of LanceDB/Lance error messages that mean "another writer committed first; try again".
_RETRYABLE_MARKERS: tuple[str, ...] = ("conflict", "retry", "preempted", "too many requests", "slow down")


class MemoryFilterError(ValueError):
    """A retrieval or count filter with a bad value; the message names the filter and value."""


# --------------------------------------------------------------------------- SQL helpers


def sql_str(value: str) -> str:
    """Quote a string as a SQL literal (single quotes doubled); rejects NUL characters."""
    if not isinstance(value, str):
        raise TypeError(f"expected a str for a SQL string literal, got {type(value).__name__}")
    if "\x00" in value:
        raise MemoryFilterError(f"string filter value contains a NUL character: {value!r}")
    return "'" + value.replace("'", "''") + "'"


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise MemoryFilterError(f"{name} must be True, False or None, got {value!r}")
    return bool(value)


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if isinstance(value, bool) or value not in choices:
        raise MemoryFilterError(f"{name} must be one of {list(choices)} or None, got {value!r}")
    return value


def _check_str(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise MemoryFilterError(f"{name} must be a non-empty str or None, got {value!r}")
    return value


def build_where(
    *,
    success: bool | None = None,
    phase: int | None = None,
    min_reward: float | None = None,
    run_id: str | None = None,
    split: str | None = None,
    status: str | None = None,
    exclude_run_task: tuple[str, str] | None = None,
) -> str | None:
    """Build a SQL ``where`` clause from typed filters.

    Every value is validated and rendered by type (booleans and integers as literals, floats
    with ``repr``, strings quoted by :func:`sql_str`), so no caller text reaches the SQL
    unquoted.

    Args:
        success (`bool`, *optional*): Only successful (``True``) or failed (``False``) episodes.
        phase (`int`, *optional*): Curriculum phase, 1, 2 or 3.
        min_reward (`float`, *optional*): Keep episodes with ``reward >= min_reward`` (a finite number).
        run_id (`str`, *optional*): Only episodes of this run.
        split (`str`, *optional*): ``"train"`` or ``"heldout"``.
        status (`str`, *optional*): ``"ok"`` or ``"failed"``.
        exclude_run_task (`tuple[str, str]`, *optional*): ``(run_id, task_id)`` whose episodes are
            left out (e.g. the siblings of the group being planned).

    Returns:
        `str | None`: The clause, or ``None`` when no filter is set.

    Raises:
        MemoryFilterError: naming the filter and the bad value.
    """
    parts: list[str] = []
    if success is not None:
        parts.append(f"success = {'true' if _check_bool('success', success) else 'false'}")
    if phase is not None:
        if isinstance(phase, bool) or not isinstance(phase, (int, np.integer)):
            raise MemoryFilterError(f"phase must be an int in {list(PHASES)} or None, got {phase!r}")
        parts.append(f"phase = {int(_check_choice('phase', int(phase), PHASES))}")
    if min_reward is not None:
        if isinstance(min_reward, bool) or not isinstance(min_reward, (int, float, np.floating, np.integer)):
            raise MemoryFilterError(f"min_reward must be a number or None, got {min_reward!r}")
        if not math.isfinite(float(min_reward)):
            raise MemoryFilterError(f"min_reward must be finite, got {min_reward!r}")
        parts.append(f"reward >= {float(min_reward)!r}")
    if run_id is not None:
        parts.append(f"run_id = {sql_str(_check_str('run_id', run_id))}")
    if split is not None:
        parts.append(f"split = {sql_str(_check_choice('split', split, SPLITS))}")
    if status is not None:
        parts.append(f"status = {sql_str(_check_choice('status', status, STATUSES))}")
    if exclude_run_task is not None:
        if not (isinstance(exclude_run_task, (tuple, list)) and len(exclude_run_task) == 2):
            raise MemoryFilterError(
                f"exclude_run_task must be a (run_id, task_id) pair or None, got {exclude_run_task!r}"
            )
        r = _check_str("exclude_run_task[0] (run_id)", exclude_run_task[0])
        t = _check_str("exclude_run_task[1] (task_id)", exclude_run_task[1])
        parts.append(f"NOT (run_id = {sql_str(r)} AND task_id = {sql_str(t)})")
    return " AND ".join(f"({p})" for p in parts) if parts else None


# --------------------------------------------------------------------------- rows


def episode_schema(dim: int) -> pa.Schema:
    """Arrow schema of the episodes table for goal vectors of dimension ``dim``."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("run_id", pa.string()),
            pa.field("task_id", pa.string()),
            pa.field("group_id", pa.string()),
            pa.field("sample_index", pa.int32()),
            pa.field("goal", pa.string()),
            pa.field("phase", pa.int32()),
            pa.field("split", pa.string()),
            pa.field("success", pa.bool_()),
            pa.field("reward", pa.float64()),
            pa.field("status", pa.string()),
            pa.field("policy_version", pa.int64()),
            pa.field("caption", pa.string()),
            pa.field("plan_text", pa.string()),
            pa.field("plan_actions", pa.list_(pa.string())),
            pa.field("feedback", pa.string()),
            pa.field("created_at", pa.float64()),
            pa.field("updated_at", pa.float64()),
            pa.field("write_id", pa.string()),
            pa.field("episode_json", pa.string()),
            pa.field("vector", pa.list_(pa.float32(), dim)),
        ]
    )


def episode_feedback(ep: Episode) -> str:
    """A one-line summary of the critic's judgement (scores and notes), or the failure reason."""
    parts: list[str] = []
    if ep.status == "failed":
        parts.append(f"failed: {ep.failure_reason}")
    v = ep.verdict
    if v is not None:
        parts.append("scores: " + ", ".join(f"{k}={s:.2f}" for k, s in v.scores.as_dict().items()))
        if v.notes:
            parts.append("notes: " + "; ".join(v.notes))
    if ep.rollout is not None and ep.rollout.error:
        parts.append(f"world error: {ep.rollout.error}")
    return " | ".join(parts)


def episode_row(ep: Episode, vector: np.ndarray, now: float) -> dict[str, Any]:
    """The table row of one episode (``vector`` is its goal embedding)."""
    return {
        "id": ep.id,
        "run_id": ep.run_id,
        "task_id": ep.task.id,
        "group_id": ep.group_id,
        "sample_index": ep.sample_index,
        "goal": ep.task.goal,
        "phase": ep.task.phase,
        "split": ep.task.split,
        "success": ep.success,
        "reward": float(ep.reward),
        "status": ep.status,
        "policy_version": ep.policy_version,
        "caption": ep.verdict.state_caption if ep.verdict else "",
        "plan_text": ep.plan.as_text() if ep.plan else "",
        "plan_actions": ep.plan.actions if ep.plan else [],
        "feedback": episode_feedback(ep),
        "created_at": float(ep.created_at),
        "updated_at": now,
        "write_id": uuid.uuid4().hex,
        "episode_json": ep.model_dump_json(),
        "vector": vector,
    }


def _newest_per_id(tbl: pa.Table) -> pa.Table:
    """Collapse rows sharing an ``id`` to the newest write (``updated_at``, then ``write_id``)."""
    if tbl.num_rows == 0:
        return tbl
    ids = tbl["id"].to_pylist()
    if len(set(ids)) == len(ids):
        return tbl
    order = tbl.sort_by([("id", "ascending"), ("updated_at", "descending"), ("write_id", "descending")])
    sorted_ids = order["id"].to_pylist()
    keep = [i for i, x in enumerate(sorted_ids) if i == 0 or sorted_ids[i - 1] != x]
    return order.take(pa.array(keep, type=pa.int64()))


def is_retryable_write_error(exc: BaseException) -> bool:
    """True for a commit conflict or another transient write failure worth retrying."""
    if isinstance(exc, (TypeError, MemoryFilterError)):
        return False
    text = f"{type(exc).__name__} {exc}".lower()
    return any(m in text for m in _RETRYABLE_MARKERS)


def retry_with_backoff(
    fn: Callable[[], _T],
    *,
    attempts: int,
    base_delay_s: float,
    max_delay_s: float = 2.0,
    is_retryable: Callable[[BaseException], bool] = is_retryable_write_error,
    what: str = "write",
) -> _T:
    """Call ``fn`` until it succeeds, retrying retryable errors with jittered exponential backoff.

    Raises the last error when it is not retryable or after ``attempts`` tries.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            if attempt >= attempts or not is_retryable(e):
                raise
            delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1)) * (0.5 + random.random())
            logger.warning("%s attempt %d/%d failed (%s); retrying in %.3fs", what, attempt, attempts, e, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _is_local_uri(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _local_path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


class _NullLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


# --------------------------------------------------------------------------- store


class EpisodeMemory:
    """Episodes in a LanceDB table, retrievable by goal similarity, full text or both.

    Args:
        uri (`str`):
            LanceDB URI: a local folder (created if missing) or an object-store URI (``s3://...``,
            ``gs://...``), passed to ``lancedb.connect`` unchanged.
        table (`str`, *optional*, defaults to `"episodes"`):
            Table name.
        embedder (`Embedder`, *optional*):
            Goal encoder; defaults to ``Embedder("minilm")`` (loaded on first use).
        optimize_every (`int`, *optional*, defaults to `64`):
            Run :meth:`optimize` after this many write commits (each :meth:`upsert` batch is one).
        vector_index_min_rows (`int`, *optional*, defaults to `256`):
            Build the IVF_PQ vector index once the table has this many rows (below it a flat
            search is exact and fast). PQ training needs at least 256 rows.
        write_batch_size (`int`, *optional*, defaults to `256`):
            Rows per ``merge_insert`` commit.
        max_write_attempts (`int`, *optional*, defaults to `8`):
            Tries per commit when it fails with a commit conflict.
        retry_base_delay_s (`float`, *optional*, defaults to `0.05`):
            First backoff delay; doubled on each retry (with jitter), capped at 2 s.
        lock_writes (`bool`, *optional*):
            Serialise writers across processes with a file lock. Defaults to ``True`` for local
            folders; object stores cannot be locked (duplicates are then repaired, see module doc).
        read_consistency_s (`float | None`, *optional*, defaults to `0.0`):
            How stale a read may be, in seconds; ``0`` sees other processes' commits at once,
            ``None`` never refreshes (fastest, for a single-writer setup).
        storage_options (`dict`, *optional*):
            Object-store options passed to ``lancedb.connect``.
    """

    def __init__(
        self,
        uri: str,
        table: str = "episodes",
        embedder: Embedder | None = None,
        optimize_every: int = 64,
        *,
        vector_index_min_rows: int = 256,
        write_batch_size: int = 256,
        max_write_attempts: int = 8,
        retry_base_delay_s: float = 0.05,
        lock_writes: bool | None = None,
        read_consistency_s: float | None = 0.0,
        storage_options: dict[str, str] | None = None,
    ):
        import lancedb

        if not isinstance(uri, str) or not uri:
            raise ValueError(f"uri must be a non-empty str, got {uri!r}")
        if not isinstance(table, str) or not table.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"table must be a name of letters, digits, '_' or '-', got {table!r}")
        for name, value, lo in (
            ("optimize_every", optimize_every, 1),
            ("vector_index_min_rows", vector_index_min_rows, 256),
            ("write_batch_size", write_batch_size, 1),
            ("max_write_attempts", max_write_attempts, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
        self.uri = uri
        self.table_name = table
        self.embedder = embedder if embedder is not None else Embedder("minilm")
        self.optimize_every = optimize_every
        self.vector_index_min_rows = vector_index_min_rows
        self.write_batch_size = write_batch_size
        self.max_write_attempts = max_write_attempts
        self.retry_base_delay_s = retry_base_delay_s
        local = _is_local_uri(uri)
        if local:
            os.makedirs(_local_path(uri), exist_ok=True)
        self.lock_writes = local if lock_writes is None else bool(lock_writes)
        if self.lock_writes and not local:
            raise ValueError(f"lock_writes=True needs a local folder uri, got {uri!r}")
        self._file_lock: Any = _NullLock()
        if self.lock_writes:
            from filelock import FileLock

            self._file_lock = FileLock(os.path.join(_local_path(uri), f".{table}.write.lock"))
        self._write_lock = threading.RLock()
        consistency = None if read_consistency_s is None else timedelta(seconds=read_consistency_s)
        self._db = lancedb.connect(uri, read_consistency_interval=consistency, storage_options=storage_options)
        self._table: Any = None
        self._writes_since_optimize = 0
        self._index_names: set[str] | None = None
        self._closed = False

    # ------------------------------------------------------------------ table

    def _open(self, create: bool) -> Any:
        """The table, opening (or, when ``create``, creating) it on first use; None if absent."""
        if self._table is not None:
            return self._table
        try:
            self._table = self._db.open_table(self.table_name)
        except (ValueError, FileNotFoundError):
            if not create:
                return None
            schema = episode_schema(self.embedder.dim)
            try:
                self._table = self._db.create_table(self.table_name, schema=schema, exist_ok=True)
            except Exception:  # another process created it between our open and create
                self._table = self._db.open_table(self.table_name)
        return self._table

    def _encode(self, texts: list[str]) -> np.ndarray:
        vecs = self.embedder.encode(texts)
        table = self._open(create=False)
        if table is not None:
            dim = table.schema.field("vector").type.list_size
            if vecs.shape[1] != dim:
                raise ValueError(
                    f"table {self.table_name!r} holds {dim}-dim vectors but embedder "
                    f"{self.embedder.name!r} makes {vecs.shape[1]}-dim ones"
                )
        return vecs

    def _indices(self) -> set[str]:
        if self._index_names is None:
            table = self._open(create=False)
            self._index_names = set() if table is None else {i.name for i in table.list_indices()}
        return self._index_names

    # ------------------------------------------------------------------ writes

    def upsert(self, episodes: Sequence[Episode]) -> int:
        """Insert or replace episodes by id (idempotent).

        Args:
            episodes (`Sequence[Episode]`): Episodes to write; when an id occurs twice, the later
                one wins.

        Returns:
            `int`: Rows written (inserted plus updated).

        Raises:
            TypeError: when an item is not an ``Episode``.
        """
        if isinstance(episodes, Episode):
            raise TypeError("upsert expects a list of Episode, got a single Episode (wrap it in a list)")
        episodes = list(episodes)
        for i, ep in enumerate(episodes):
            if not isinstance(ep, Episode):
                raise TypeError(f"episodes[{i}] must be an Episode, got {type(ep).__name__}")
        if self._closed:
            raise RuntimeError(f"EpisodeMemory at {self.uri!r} is closed")
        unique = list({ep.id: ep for ep in episodes}.values())
        if not unique:
            return 0
        goals = sorted({ep.task.goal for ep in unique})
        vec_by_goal = dict(zip(goals, self._encode(goals)))
        written = 0
        with self._write_lock:
            table = self._open(create=True)
            schema = table.schema
            for start in range(0, len(unique), self.write_batch_size):
                chunk = unique[start : start + self.write_batch_size]
                now = time.time()
                rows = [episode_row(ep, vec_by_goal[ep.task.goal], now) for ep in chunk]
                data = pa.Table.from_pylist(rows, schema=schema)
                written += self._merge(table, data)
                self._writes_since_optimize += 1
            self._ensure_fts_index()
            if self._writes_since_optimize >= self.optimize_every:
                self.optimize()
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

        return retry_with_backoff(
            attempt,
            attempts=self.max_write_attempts,
            base_delay_s=self.retry_base_delay_s,
            what=f"merge_insert of {data.num_rows} rows into {self.table_name!r}",
        )

    def _create_index_once(self, name: str, create: Callable[[Any], None]) -> None:
        """Build index ``name`` unless it exists; another writer building it first is fine."""
        table = self._open(create=False)

        def attempt() -> None:
            if name in {i.name for i in table.list_indices()}:
                return
            try:
                with self._file_lock:
                    create(table)
            except Exception as e:
                if name in {i.name for i in table.list_indices()}:  # lost a race to build it
                    return
                if "exist" in str(e).lower():
                    return
                raise

        retry_with_backoff(
            attempt, attempts=self.max_write_attempts, base_delay_s=self.retry_base_delay_s, what=f"index {name}"
        )
        self._index_names = None

    def _ensure_fts_index(self) -> None:
        if "goal_idx" in self._indices():
            return
        from lancedb.index import FTS

        self._create_index_once("goal_idx", lambda t: t.create_index("goal", config=FTS(), name="goal_idx"))

    def _ensure_vector_index(self, n_rows: int) -> None:
        if "vector_idx" in self._indices() or n_rows < self.vector_index_min_rows:
            return
        dim = self._open(create=False).schema.field("vector").type.list_size
        sub = next(s for s in (48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1) if dim % s == 0)
        self._create_index_once(
            "vector_idx",
            lambda t: t.create_index(
                metric="cosine",
                num_partitions=max(1, int(math.sqrt(n_rows))),
                num_sub_vectors=sub,
                vector_column_name="vector",
                index_type="IVF_PQ",
                name="vector_idx",
            ),
        )

    def optimize(self, cleanup_older_than: timedelta | None = None) -> dict[str, int]:
        """Compact fragments, bring indices up to date and repair duplicate ids.

        Builds the FTS index on ``goal`` if missing and the vector index once the table holds
        ``vector_index_min_rows`` rows; rows written after an index build are added to it here.

        Args:
            cleanup_older_than (`timedelta`, *optional*): Also delete table versions older than
                this (LanceDB's default keeps 7 days, so concurrent readers of old versions are safe).

        Returns:
            `dict[str, int]`: ``rows`` in the table and ``duplicates_removed``.
        """
        with self._write_lock:
            self._writes_since_optimize = 0
            table = self._open(create=False)
            if table is None:
                return {"rows": 0, "duplicates_removed": 0}
            removed = self._remove_duplicates(table)
            n_rows = table.count_rows()
            if n_rows:
                self._ensure_fts_index()
                self._ensure_vector_index(n_rows)

            def run() -> None:
                with self._file_lock:
                    table.optimize(cleanup_older_than=cleanup_older_than)

            retry_with_backoff(
                run, attempts=self.max_write_attempts, base_delay_s=self.retry_base_delay_s, what="optimize"
            )
            self._index_names = None
            return {"rows": table.count_rows(), "duplicates_removed": removed}

    def _remove_duplicates(self, table: Any) -> int:
        """Delete every row of a duplicated id but the newest; returns the number deleted.

        Duplicates can be byte-identical (LanceDB re-applies a merge after a commit conflict),
        so stale copies are deleted by row id, recomputed on each retry."""

        def attempt() -> int:
            with self._file_lock:
                scan = (
                    table.search()
                    .select(["id", "updated_at", "write_id"])
                    .with_row_id(True)
                    .limit(None)
                    .to_arrow()
                )
                dup_ids = {i for i, c in Counter(scan["id"].to_pylist()).items() if c > 1}
                if not dup_ids:
                    return 0
                rows = [r for r in scan.to_pylist() if r["id"] in dup_ids]
                newest = {}
                for r in rows:  # ties on updated_at: the larger write_id wins, as in _newest_per_id
                    cur = newest.get(r["id"])
                    if cur is None or (r["updated_at"], r["write_id"]) > (cur["updated_at"], cur["write_id"]):
                        newest[r["id"]] = r
                keep = {r["_rowid"] for r in newest.values()}
                stale = [r["_rowid"] for r in rows if r["_rowid"] not in keep]
                for i in range(0, len(stale), 1_000):
                    table.delete("_rowid IN (" + ", ".join(str(int(x)) for x in stale[i : i + 1_000]) + ")")
                logger.warning(
                    "removed %d duplicate rows of %d ids from %r", len(stale), len(dup_ids), self.table_name
                )
                return len(stale)

        return retry_with_backoff(
            attempt, attempts=self.max_write_attempts, base_delay_s=self.retry_base_delay_s, what="duplicate repair"
        )

    # ------------------------------------------------------------------ reads

    def _scan(self, columns: list[str], where: str | None, dedupe: bool = True) -> pa.Table:
        """All rows matching ``where`` (only ``columns``), collapsed to one row per id."""
        table = self._open(create=False)
        if table is None:
            return pa.table({c: pa.array([], type=pa.null()) for c in columns})
        cols = list(dict.fromkeys(columns + (["id", "updated_at", "write_id"] if dedupe else [])))
        q = table.search().select(cols).limit(None)
        if where:
            q = q.where(where)
        out = q.to_arrow()
        return _newest_per_id(out).select(columns) if dedupe else out.select(columns)

    def retrieve(
        self,
        goal: str,
        k: int = 3,
        *,
        success: bool | None = None,
        phase: int | None = None,
        min_reward: float | None = None,
        run_id: str | None = None,
        split: str | None = None,
        status: str | None = None,
        exclude_run_task: tuple[str, str] | None = None,
        query_type: QueryType = "vector",
        oversample: int = 4,
    ) -> list[MemoryHit]:
        """Episodes whose goals are most like ``goal``, successful ones first.

        The ``k * oversample`` nearest candidates passing the filters (a prefilter, so filtering
        never empties a non-empty answer) are ordered by success (successful first), then score,
        and the first ``k`` returned.

        Args:
            goal (`str`): The goal to match.
            k (`int`, *optional*, defaults to `3`): Hits wanted; 0 returns ``[]``.
            success, phase, min_reward, run_id, split, status, exclude_run_task: Filters, see
                :func:`build_where`.
            query_type (`str`, *optional*, defaults to `"vector"`): ``"vector"`` (cosine similarity
                of goal embeddings; score in [-1, 1]), ``"fts"`` (BM25 on goal text) or ``"hybrid"``
                (both, fused by reciprocal-rank fusion).
            oversample (`int`, *optional*, defaults to `4`): Candidate pool size as a multiple of ``k``.

        Returns:
            `list[MemoryHit]`: At most ``k`` hits, one per episode.

        Raises:
            MemoryFilterError: for a bad filter, ``k``, ``query_type`` or ``goal``.
        """
        if not isinstance(goal, str) or not goal.strip():
            raise MemoryFilterError(f"goal must be a non-empty str, got {goal!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise MemoryFilterError(f"k must be an int >= 0, got {k!r}")
        if query_type not in QUERY_TYPES:
            raise MemoryFilterError(f"query_type must be one of {list(QUERY_TYPES)}, got {query_type!r}")
        if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 1:
            raise MemoryFilterError(f"oversample must be an int >= 1, got {oversample!r}")
        where = build_where(
            success=success,
            phase=phase,
            min_reward=min_reward,
            run_id=run_id,
            split=split,
            status=status,
            exclude_run_task=exclude_run_task,
        )
        table = self._open(create=False)
        if k == 0 or table is None or table.count_rows() == 0:
            return []
        goal = goal.strip()
        fetch = k * oversample
        cols = ["id", "goal", "phase", "plan_actions", "success", "reward", "caption", "feedback", "updated_at", "write_id"]
        if query_type == "vector":
            q = table.search(self._encode([goal])[0], vector_column_name="vector").distance_type("cosine")
            if "vector_idx" in self._indices():
                q = q.nprobes(20).refine_factor(10)
            score_col = "_distance"
        else:
            self._ensure_fts_index_for_read()
            if query_type == "fts":
                q = table.search(goal, query_type="fts", fts_columns="goal")
                score_col = "_score"
            else:
                from lancedb.rerankers import RRFReranker

                q = (
                    table.search(query_type="hybrid", vector_column_name="vector", fts_columns="goal")
                    .vector(self._encode([goal])[0])
                    .text(goal)
                    .distance_type("cosine")
                    .rerank(RRFReranker())
                )
                score_col = "_relevance_score"
        # Name the score column explicitly (LanceDB warns when it is projected implicitly).
        q = q.select(cols + ([score_col] if query_type != "hybrid" else [])).limit(fetch)
        if where:
            q = q.where(where, prefilter=True)
        rows = q.to_arrow().to_pylist()
        return self._rank_hits(rows, score_col, k)

    def _ensure_fts_index_for_read(self) -> None:
        if "goal_idx" not in self._indices():
            with self._write_lock:
                self._ensure_fts_index()

    @staticmethod
    def _rank_hits(rows: list[dict[str, Any]], score_col: str, k: int) -> list[MemoryHit]:
        best: dict[str, dict[str, Any]] = {}
        for r in rows:
            score = 1.0 - float(r[score_col]) if score_col == "_distance" else float(r[score_col])
            r = {**r, "_s": score}
            cur = best.get(r["id"])
            if cur is None or (r["updated_at"], r["write_id"]) > (cur["updated_at"], cur["write_id"]):
                best[r["id"]] = r
        ordered = sorted(best.values(), key=lambda r: (not r["success"], -r["_s"], r["id"]))
        return [
            MemoryHit(
                episode_id=r["id"],
                goal=r["goal"],
                phase=int(r["phase"]),
                plan=list(r["plan_actions"] or []),
                success=bool(r["success"]),
                reward=float(r["reward"]),
                caption=r["caption"] or "",
                feedback=r["feedback"] or "",
                score=r["_s"],
            )
            for r in ordered[:k]
        ]

    def count(
        self,
        *,
        success: bool | None = None,
        phase: int | None = None,
        min_reward: float | None = None,
        run_id: str | None = None,
        split: str | None = None,
        status: str | None = None,
        exclude_run_task: tuple[str, str] | None = None,
    ) -> int:
        """Number of distinct episodes matching the filters (see :func:`build_where`)."""
        where = build_where(
            success=success,
            phase=phase,
            min_reward=min_reward,
            run_id=run_id,
            split=split,
            status=status,
            exclude_run_task=exclude_run_task,
        )
        if self._open(create=False) is None:
            return 0
        ids = self._scan(["id"], where, dedupe=False)["id"]
        return len(set(ids.to_pylist()))

    def get(self, episode_id: str) -> Episode | None:
        """The episode with this id exactly as written last, or ``None`` if absent."""
        if not isinstance(episode_id, str) or not episode_id:
            raise MemoryFilterError(f"episode_id must be a non-empty str, got {episode_id!r}")
        if self._open(create=False) is None:
            return None
        rows = self._scan(["episode_json"], f"id = {sql_str(episode_id)}").to_pylist()
        return Episode.model_validate_json(rows[0]["episode_json"]) if rows else None

    def ids(self, run_id: str | None = None) -> set[str]:
        """Ids of all stored episodes (of one run when ``run_id`` is given)."""
        where = build_where(run_id=run_id)
        if self._open(create=False) is None:
            return set()
        return set(self._scan(["id"], where, dedupe=False)["id"].to_pylist())

    def recent(self, n: int = 10, *, run_id: str | None = None) -> list[Episode]:
        """The ``n`` most recently created episodes (by ``created_at``, newest first)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise MemoryFilterError(f"n must be an int >= 0, got {n!r}")
        if n == 0 or self._open(create=False) is None:
            return []
        meta = self._scan(["id", "created_at"], build_where(run_id=run_id))
        if meta.num_rows == 0:
            return []
        top = meta.sort_by([("created_at", "descending"), ("id", "ascending")]).slice(0, n)["id"].to_pylist()
        where = "id IN (" + ", ".join(sql_str(i) for i in top) + ")"
        by_id = {r["id"]: r["episode_json"] for r in self._scan(["id", "episode_json"], where).to_pylist()}
        return [Episode.model_validate_json(by_id[i]) for i in top if i in by_id]

    def stats_by_phase(self, *, run_id: str | None = None) -> dict[int, dict[str, float]]:
        """Per phase: ``n`` episodes, ``success_rate`` and ``mean_reward``."""
        tbl = self._scan(["phase", "success", "reward"], build_where(run_id=run_id))
        out: dict[int, dict[str, float]] = {}
        if tbl.num_rows == 0:
            return out
        for phase, success, reward in zip(*(tbl[c].to_pylist() for c in ("phase", "success", "reward"))):
            s = out.setdefault(int(phase), {"n": 0, "successes": 0, "reward_sum": 0.0})
            s["n"] += 1
            s["successes"] += int(bool(success))
            s["reward_sum"] += float(reward)
        return {
            p: {"n": s["n"], "success_rate": s["successes"] / s["n"], "mean_reward": s["reward_sum"] / s["n"]}
            for p, s in sorted(out.items())
        }

    def mastered_goals(
        self, threshold: float = 0.8, min_n: int = 2, *, run_id: str | None = None, phase: int | None = None
    ) -> set[str]:
        """Goals attempted at least ``min_n`` times with a success rate of at least ``threshold``."""
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise MemoryFilterError(f"threshold must be a number in [0, 1], got {threshold!r}")
        if isinstance(min_n, bool) or not isinstance(min_n, int) or min_n < 1:
            raise MemoryFilterError(f"min_n must be an int >= 1, got {min_n!r}")
        tbl = self._scan(["goal", "success"], build_where(run_id=run_id, phase=phase))
        n: dict[str, int] = {}
        wins: dict[str, int] = {}
        for goal, success in zip(tbl["goal"].to_pylist(), tbl["success"].to_pylist()):
            n[goal] = n.get(goal, 0) + 1
            wins[goal] = wins.get(goal, 0) + int(bool(success))
        return {g for g, c in n.items() if c >= min_n and wins[g] / c >= threshold}

    def index_names(self) -> set[str]:
        """Names of the table's indices (``goal_idx`` full text, ``vector_idx`` IVF_PQ)."""
        self._index_names = None
        return set(self._indices())

    def table_stats(self) -> dict[str, int]:
        """Physical state of the table: ``rows`` (including not yet repaired duplicates),
        ``fragments`` and ``version``; zeros when the table does not exist yet."""
        table = self._open(create=False)
        if table is None:
            return {"rows": 0, "fragments": 0, "version": 0}
        st = table.stats()
        frags = st["fragment_stats"]["num_fragments"] if isinstance(st, dict) else st.fragment_stats.num_fragments
        return {"rows": table.count_rows(), "fragments": int(frags), "version": int(table.version)}

    def flush(self) -> dict[str, int]:
        """Run :meth:`optimize` if anything was written since the last one."""
        if self._writes_since_optimize:
            return self.optimize()
        return {"rows": self.count(), "duplicates_removed": 0}

    def close(self) -> None:
        """Flush and release the table; later writes raise."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._table = None

    def __repr__(self) -> str:
        return f"EpisodeMemory(uri={self.uri!r}, table={self.table_name!r}, embedder={self.embedder!r})"
