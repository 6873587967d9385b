"""Maintenance of the episodes table, the part of :class:`~worldagent_ray.memory.store.EpisodeMemory`
that runs on its background thread: duplicate repair, compaction, index upkeep and (re)builds.

A mixin: it uses the store's table access (``_open``, ``_retry``, ``_read``), locks and state;
it is kept apart from the read and write paths to keep each file about one thing. Pure core.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from worldagent_ray.memory.indexes import VECTOR_INDEX, train_vector_index, vector_segments
from worldagent_ray.memory.rows import WRITE_ORDER, delete_stale_duplicates

logger = logging.getLogger(__name__)


class Upkeep:
    """Maintenance methods of :class:`~worldagent_ray.memory.store.EpisodeMemory`."""

    # Set by EpisodeMemory.__init__ (see there).
    table_name: str
    keep_versions_s: float | None
    embeddings: Any
    _state_lock: Any
    _index_lock: Any
    _file_lock: Any
    _maintainer: Any
    _catalog: Any
    _index_builds: Any
    _ann: tuple[int, int] | None
    _dim: int | None
    _commits_since_maintenance: int
    _cleanup_older_than: timedelta | None
    _index_names: set[str] | None

    def optimize(self, cleanup_older_than: timedelta | None = None, *, timeout_s: float | None = 600.0) -> dict[str, int]:
        """Run maintenance now and wait for it: compact fragments, bring indices up to date
        (training or retraining the vector index when due) and repair duplicate ids.

        Args:
            cleanup_older_than (`timedelta`, *optional*): Also delete table versions older than
                this (default: ``keep_versions_s``, else LanceDB's 7 days).
            timeout_s (`float`, *optional*, defaults to `600`): Most time to wait; the work goes
                on in the background after a ``TimeoutError``.

        Returns:
            `dict[str, int]`: ``rows`` (distinct episodes) and ``duplicates_removed``.
        """
        if cleanup_older_than is not None:
            with self._state_lock:
                self._cleanup_older_than = cleanup_older_than
        return self._maintainer.run_now(timeout_s)

    def _maintain(self) -> dict[str, int]:
        """One maintenance pass (on the maintenance thread)."""
        with self._state_lock:
            self._commits_since_maintenance = 0
            older, self._cleanup_older_than = self._cleanup_older_than, None
        table = self._open(create=False)
        if table is None:
            return {"rows": 0, "duplicates_removed": 0}
        if older is None and self.keep_versions_s is not None:
            older = timedelta(seconds=self.keep_versions_s)
        removed = 0
        # Rows counted before the catalog syncs to a version at least as new: more rows than
        # distinct ids means duplicates (only racing unlocked writers make them).
        physical = self._retry(table.count_rows, "count rows")
        if physical > len(self._sync_catalog()):
            removed = self._remove_duplicates(table)
        self._ensure_scalar_indices(table)
        self._retry(lambda: table.optimize(cleanup_older_than=older), f"optimize {self.table_name!r}")
        n_rows = self._retry(table.count_rows, "count rows")
        segments = self._retry(lambda: vector_segments(table), "list indices")
        why = self._index_builds.due(n_rows, self._ann[0] if self._ann and segments else None, segments)
        if why is not None:
            t0 = time.monotonic()
            with self._index_lock:
                self._ann = train_vector_index(table, n_rows, self._dim or self.embeddings.dim, self._retry)
            self._index_builds.record(time.monotonic() - t0)
            logger.info("built %s (%s) on %d rows, %d partitions, in %.1fs",
                        VECTOR_INDEX, why, n_rows, self._ann[1], time.monotonic() - t0)
        self._index_names = None
        return {"rows": len(self._sync_catalog()), "duplicates_removed": removed}

    def _remove_duplicates(self, table: Any) -> int:
        def attempt() -> int:
            with self._file_lock:
                scan = self._read(
                    lambda t: t.search().select(["id", *WRITE_ORDER]).with_row_id(True).limit(None), "duplicate scan"
                )
                return delete_stale_duplicates(table, scan)

        removed = self._retry(attempt, "duplicate repair")
        if removed:
            logger.warning("removed %d duplicate rows from %r", removed, self.table_name)
        return removed

    def flush(self, timeout_s: float | None = 600.0) -> dict[str, int]:
        """Run :meth:`optimize` if anything was written since the last maintenance or maintenance
        is under way; otherwise just report the row count."""
        with self._state_lock:
            dirty = self._commits_since_maintenance > 0
        if dirty or self._maintainer.busy:
            return self.optimize(timeout_s=timeout_s)
        return {"rows": self.count(), "duplicates_removed": 0}

    def wait_for_maintenance(self, timeout_s: float | None = 600.0) -> bool:
        """Wait until the maintenance asked for so far has finished; False on timeout."""
        return self._maintainer.wait_idle(timeout_s)

    def maintenance_stats(self) -> dict[str, Any]:
        """The maintenance thread's ``runs``, ``errors``, ``last_error``, ``last_duration_s`` and
        ``busy``; the vector index's ``trained_rows`` and ``partitions`` (None before training)
        and ``index_builds`` (by this process);
        ``catalog_rows_read``, the rows the catalog has read from the table so far."""
        trained, parts = self._ann if self._ann is not None else (None, None)
        return {**self._maintainer.stats(), "trained_rows": trained, "partitions": parts,
                "index_builds": self._index_builds.builds, "catalog_rows_read": self._catalog.rows_read}
