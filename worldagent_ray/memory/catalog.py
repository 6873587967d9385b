"""An in-process summary of every episode in the table, kept current by reading only what changed.

``ids``, ``count``, ``stats_by_phase``, ``mastered_goals`` and ``recent`` need a few small
columns of every episode. Reading those columns from a 100k-row table on every call (the driver
asks for mastered goals every round) costs a full scan each time. The catalog instead holds,
per episode id, the newest row's small columns (no vector, no JSON: about 300 bytes an episode)
and is brought up to date from the table's *row versions*: Lance records, for every row, the
table version that last wrote it (``_row_last_updated_at_version``, kept through compaction),
so "what changed since version v" is one filtered read of the new rows only, whoever wrote them
(this process, another process, another machine). That needs stable row ids, which the store
turns on when it creates a table and records in the table (:func:`mark_row_versions`); a table
made without them (by an earlier version of the store) is read whole whenever it has changed.

Deletions are not replayed: the store deletes rows only to repair duplicates of an id, and the
catalog already keeps the newest row of each id (:func:`~worldagent_ray.memory.rows.write_key`),
which is the one the repair keeps. Pure core (no Ray).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, NamedTuple

from worldagent_ray.memory.filters import MemoryFilter
from worldagent_ray.memory.rows import write_key

#: Lance's per-row "last written at table version" (tables with stable row ids).
ROW_VERSION_COLUMN = "_row_last_updated_at_version"
#: Field metadata on ``id`` saying the table was created with stable row ids. Without them Lance
#: still answers the row-version column, but with a constant, so it cannot be trusted.
ROW_VERSIONS_KEY = "worldagent:row_versions"


def mark_row_versions(table: Any) -> None:
    """Record on a table created with stable row ids that its row versions can be trusted."""
    table.update_field_metadata({"path": "id", "metadata": {ROW_VERSIONS_KEY: "true"}})


def tracks_row_versions(table: Any) -> bool:
    """Whether ``table`` was marked by :func:`mark_row_versions`."""
    meta = table.schema.field("id").metadata or {}
    return meta.get(ROW_VERSIONS_KEY.encode()) == b"true"


#: Columns the catalog reads from the table.
CATALOG_COLUMNS: tuple[str, ...] = (
    "id", "run_id", "task_id", "goal", "phase", "split", "status", "success", "reward",
    "created_at", "updated_at", "write_id",
)


class Entry(NamedTuple):
    """The catalog's view of one episode (its newest row)."""

    id: str
    run_id: str
    task_id: str
    goal: str
    phase: int
    split: str
    status: str
    success: bool
    reward: float
    created_at: float
    updated_at: float
    write_id: str


def _intern(s: Any) -> str:
    return sys.intern(s) if isinstance(s, str) else ("" if s is None else str(s))


class Catalog:
    """Newest row per episode id, with the aggregate queries of the store.

    Not thread-safe by itself: the store serialises :meth:`apply` with the queries.

    Attributes:
        version (`int | None`): The table version the catalog reflects (``None``: never synced).
    """

    def __init__(self) -> None:
        self._rows: dict[str, Entry] = {}
        self.version: int | None = None
        self.row_versions = False  # set from the table (tracks_row_versions); False: full rescans
        self.rows_read = 0  # rows read by all syncs (for stats and tests)

    def sync(self, version: int, read: Callable[[str | None], list[dict[str, Any]]]) -> None:
        """Bring the catalog to table ``version``.

        Args:
            version: The table's current version.
            read: Reads :data:`CATALOG_COLUMNS` of the rows matching a ``where`` clause (all rows
                for ``None``).
        """
        if self.version == version:
            return
        if self.version is not None and self.row_versions:
            rows = read(f"{ROW_VERSION_COLUMN} > {int(self.version)}")
        else:
            self._rows.clear()
            rows = read(None)
        self.rows_read += len(rows)
        self.apply(rows)
        self.version = version

    def __len__(self) -> int:
        return len(self._rows)

    def reset(self) -> None:
        """Forget everything (the next sync reads the whole table)."""
        self._rows.clear()
        self.version = None

    def apply(self, rows: Iterable[dict[str, Any]]) -> int:
        """Merge rows (dicts with :data:`CATALOG_COLUMNS`); the newer write of an id wins.

        Returns:
            `int`: Entries added or replaced.
        """
        changed = 0
        for r in rows:
            cur = self._rows.get(r["id"])
            if cur is not None and write_key(r) <= write_key(cur._asdict()):
                continue
            self._rows[r["id"]] = Entry(
                id=r["id"],
                run_id=_intern(r["run_id"]),
                task_id=_intern(r["task_id"]),
                goal=_intern(r["goal"]),
                phase=int(r["phase"]),
                split=_intern(r["split"]),
                status=_intern(r["status"]),
                success=bool(r["success"]),
                reward=float(r["reward"]),
                created_at=float(r["created_at"]),
                updated_at=float(r["updated_at"]),
                write_id=str(r["write_id"]),
            )
            changed += 1
        return changed

    def entries(self, flt: MemoryFilter | None = None) -> Iterable[Entry]:
        """Entries passing ``flt`` (all when ``None``)."""
        if flt is None or flt.where() is None:
            return self._rows.values()
        return (e for e in self._rows.values() if flt.matches(e._asdict()))

    def ids(self, run_id: str | None = None) -> set[str]:
        return {e.id for e in self._rows.values() if run_id is None or e.run_id == run_id}

    def count(self, flt: MemoryFilter | None = None) -> int:
        if flt is None or flt.where() is None:
            return len(self._rows)
        return sum(1 for _ in self.entries(flt))

    def recent_ids(self, n: int, run_id: str | None = None) -> list[str]:
        """Ids of the ``n`` newest episodes by ``created_at`` (ties by id)."""
        pool = [e for e in self._rows.values() if run_id is None or e.run_id == run_id]
        pool.sort(key=lambda e: (-e.created_at, e.id))
        return [e.id for e in pool[:n]]

    def stats_by_phase(self, run_id: str | None = None) -> dict[int, dict[str, float]]:
        acc: dict[int, list[float]] = {}
        for e in self._rows.values():
            if run_id is not None and e.run_id != run_id:
                continue
            a = acc.setdefault(e.phase, [0, 0, 0.0])
            a[0] += 1
            a[1] += int(e.success)
            a[2] += e.reward
        return {p: {"n": a[0], "success_rate": a[1] / a[0], "mean_reward": a[2] / a[0]} for p, a in sorted(acc.items())}

    def mastered_goals(
        self, threshold: float, min_n: int, run_id: str | None = None, phase: int | None = None
    ) -> set[str]:
        n: dict[str, int] = {}
        wins: dict[str, int] = {}
        for e in self._rows.values():
            if (run_id is not None and e.run_id != run_id) or (phase is not None and e.phase != phase):
                continue
            n[e.goal] = n.get(e.goal, 0) + 1
            wins[e.goal] = wins.get(e.goal, 0) + int(e.success)
        return {g for g, c in n.items() if c >= min_n and wins[g] / c >= threshold}
