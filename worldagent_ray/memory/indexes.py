"""The episodes table's indices: which ones, how the vector index is sized, when it is retrained.

* scalar indices, built when the table is created (cheap on an empty table) and kept up to
  date by maintenance: a BTREE on ``id`` (upsert matching and ``get``), full text on ``goal``,
  bitmaps on the filter columns (a filtered search computes its prefilter from them);
* an IVF_PQ index on ``vector``, trained once the table has ``min_rows`` rows and retrained,
  with partitions set from the row count, whenever the table has grown by a factor since the
  last training. The training is recorded in the vector column's field metadata, so a restarted
  process knows when it is due. LanceDB's ``optimize`` adds the rows written since the last one
  as a new *segment* of the index (searched separately, and its fragments are never compacted
  with the others), so the index is also rebuilt when it has more than ``max_segments``
  segments; the store limits those rebuilds to a share of its time (see ``rebuild_due``).

Pure core (no Ray); the functions take a LanceDB table and a ``retry`` wrapper.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

#: Scalar indices: (column, kind, name).
SCALAR_INDICES: tuple[tuple[str, str, str], ...] = (
    ("id", "btree", "id_idx"),
    ("goal", "fts", "goal_idx"),
    ("success", "bitmap", "success_idx"),
    ("phase", "bitmap", "phase_idx"),
    ("split", "bitmap", "split_idx"),
    ("status", "bitmap", "status_idx"),
    ("run_id", "bitmap", "run_id_idx"),
)
VECTOR_INDEX = "vector_idx"
FTS_INDEX = "goal_idx"
#: Exact re-ranking of ``REFINE_FACTOR * limit`` PQ candidates (PQ distances are approximate).
REFINE_FACTOR = 5
# k-means on 64 sampled rows per partition, 10 iterations: a 100k-row rebuild took 18 s instead
# of 35 s (256 rows, 25 iterations) on 2 busy cores, recall@3 0.979 against 0.983.
IVF_SAMPLE_RATE = 64
IVF_MAX_ITERATIONS = 10

#: Keys of the vector column's field metadata that record the last index training.
TRAINED_ROWS_KEY = "worldagent:ivf_trained_rows"
PARTITIONS_KEY = "worldagent:ivf_partitions"

MAX_PARTITIONS = 4096
MIN_ROWS_PER_PARTITION = 256
MIN_NPROBES = 20
PROBE_FRACTION = 1 / 16


def ivf_partitions(n_rows: int) -> int:
    """IVF partitions for a table of ``n_rows``: about ``sqrt(n_rows)`` (316 at 100k), so a
    partition holds about as many rows as there are partitions, but never fewer than 256 rows per
    partition (LanceDB trains no more than that, e.g. 1 partition for 300 rows)."""
    if n_rows < 1:
        raise ValueError(f"n_rows must be >= 1, got {n_rows}")
    return max(1, min(MAX_PARTITIONS, round(math.sqrt(n_rows)), n_rows // MIN_ROWS_PER_PARTITION))


def pq_sub_vectors(dim: int) -> int:
    """PQ sub-vectors for ``dim``-dimensional vectors: 8 dimensions each where ``dim`` allows it
    (48 for MiniLM's 384, the SIMD-friendly split LanceDB recommends), else the largest divisor
    of ``dim`` that leaves at least 8 dimensions each, else 1."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    for width in range(8, dim + 1):
        if dim % width == 0:
            return dim // width
    return 1


def nprobes(partitions: int) -> int:
    """Partitions a query probes: at least 20, and 1/16 of them on large tables (so the share of
    the table a query scores, and with it recall, stays about the same as the table grows)."""
    return max(1, min(partitions, max(MIN_NPROBES, math.ceil(partitions * PROBE_FRACTION))))


def rebuild_due(
    n_rows: int, trained_rows: int | None, segments: int, *, min_rows: int, factor: float, max_segments: int
) -> str | None:
    """Why to (re)build the vector index now, or ``None``: ``"first"`` at ``min_rows`` rows,
    ``"grown"`` once the table has grown by ``factor`` since the last training, ``"segments"``
    when the index has more than ``max_segments`` segments."""
    if n_rows < min_rows:
        return None
    if trained_rows is None:
        return "first"
    if n_rows >= factor * trained_rows:
        return "grown"
    if segments > max_segments:
        return "segments"
    return None


class IndexBuildPolicy:
    """When the store (re)builds its vector index: :func:`rebuild_due`, with rebuilds for
    segments (not for growth) limited to ``duty`` of the time, measured from the last build's
    duration (a 20 s build is followed by at least 60 s without one at ``duty=0.25``).

    Attributes:
        builds (`int`): Builds recorded so far.
    """

    def __init__(self, min_rows: int, factor: float, max_segments: int, duty: float = 0.25):
        self.min_rows, self.factor, self.max_segments, self.duty = min_rows, factor, max_segments, duty
        self.builds = 0
        self._last_end, self._last_s = float("-inf"), 0.0

    def due(self, n_rows: int, trained_rows: int | None, segments: int, now: float | None = None) -> str | None:
        """Why to build now (see :func:`rebuild_due`), or ``None``; ``trained_rows`` is ``None``
        when there is no index."""
        why = rebuild_due(n_rows, trained_rows, segments, min_rows=self.min_rows, factor=self.factor,
                          max_segments=self.max_segments)
        now = time.monotonic() if now is None else now
        if why == "segments" and now - self._last_end < self._last_s * (1 / self.duty - 1):
            return None
        return why

    def record(self, seconds: float, now: float | None = None) -> None:
        """A build just ended after ``seconds``."""
        self.builds += 1
        self._last_end, self._last_s = (time.monotonic() if now is None else now), seconds


Retry = Callable[[Callable[[], Any], str], Any]


def ensure_scalar_indices(table: Any, retry: Retry) -> list[str]:
    """Build the scalar indices the table lacks; returns the names built."""
    from lancedb.index import FTS, Bitmap, BTree

    kinds = {"btree": BTree, "bitmap": Bitmap, "fts": FTS}
    have = {i.name for i in retry(table.list_indices, "list indices")}
    built = []
    for column, kind, name in SCALAR_INDICES:
        if name not in have:
            retry(lambda: table.create_index(column, config=kinds[kind](), name=name, replace=True), f"index {name}")
            built.append(name)
    return built


def vector_segments(table: Any) -> int:
    """Segments of the vector index (0 without one)."""
    return next((int(i.num_segments) for i in table.list_indices() if i.name == VECTOR_INDEX), 0)


def recorded_training(table: Any) -> tuple[int, int] | None:
    """``(rows, partitions)`` of the last vector-index training recorded on the table, if any."""
    raw = table.schema.field("vector").metadata or {}
    meta = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v for k, v in raw.items()}
    if TRAINED_ROWS_KEY in meta and PARTITIONS_KEY in meta:
        return int(meta[TRAINED_ROWS_KEY]), int(meta[PARTITIONS_KEY])
    return None


def train_vector_index(table: Any, n_rows: int, dim: int, retry: Retry) -> tuple[int, int]:
    """(Re)train the IVF_PQ index for a table of ``n_rows`` and record it; returns
    ``(n_rows, partitions)``. Readers keep using the old index (or exact search) until the new
    one commits; rows written meanwhile are searched exactly until the next index update."""
    from lancedb.index import IvfPq

    parts = ivf_partitions(n_rows)
    config = IvfPq(
        distance_type="cosine", num_partitions=parts, num_sub_vectors=pq_sub_vectors(dim),
        max_iterations=IVF_MAX_ITERATIONS, sample_rate=IVF_SAMPLE_RATE,
    )
    retry(lambda: table.create_index("vector", config=config, name=VECTOR_INDEX, replace=True), f"train {VECTOR_INDEX}")
    meta = {TRAINED_ROWS_KEY: str(n_rows), PARTITIONS_KEY: str(parts)}
    retry(lambda: table.update_field_metadata({"path": "vector", "metadata": meta}), "record index training")
    return n_rows, parts
