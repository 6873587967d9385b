"""The episodes table: its Arrow schema, the one Episode -> row mapping, and "newest write wins".

One row per :class:`~worldagent_ray.schemas.Episode`: flat columns for filtering and search,
the goal embedding in ``vector``, and the full episode as JSON in ``episode_json`` so that a
read returns exactly what was written. Pure core (no Ray).
"""

from __future__ import annotations

import uuid
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from worldagent_ray.schemas import Episode, MemoryHit

#: Columns that decide which of two rows of one id is the newer write (see :func:`write_key`).
WRITE_ORDER: tuple[str, ...] = ("updated_at", "write_id")

#: Columns a retrieval reads to build a :class:`MemoryHit` (plus the write order).
HIT_COLUMNS: tuple[str, ...] = (
    "id", "goal", "phase", "plan_actions", "success", "reward", "caption", "feedback", *WRITE_ORDER
)


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
    """The table row of one episode (``vector`` is its goal embedding, ``now`` the write time).

    This is the only place an :class:`Episode` is flattened for memory."""
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


def write_key(row: Mapping[str, Any]) -> tuple[float, str]:
    """Order of writes of one id: the later ``updated_at`` wins, ties go to the larger ``write_id``.

    Two rows of one id exist only when unlocked writers (an object store) race to insert it;
    every read keeps the row with the largest key, and the duplicate repair deletes the rest."""
    return (float(row["updated_at"]), str(row["write_id"]))


def newest_per_id(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Collapse rows sharing an ``id`` to the newest write (by :func:`write_key`), keeping the
    order of first appearance."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        cur = best.get(r["id"])
        if cur is None or write_key(r) > write_key(cur):
            best[r["id"]] = r
    return list(best.values())


def delete_stale_duplicates(table: Any, scan: list[dict[str, Any]]) -> int:
    """Delete every row of a duplicated id but the newest; returns the number deleted.

    ``scan`` holds ``id``, the :data:`WRITE_ORDER` columns and ``_rowid`` of every row.
    Duplicates can be byte-identical (LanceDB re-applies a merge after a commit conflict),
    so stale copies are deleted by row id."""
    seen: dict[str, int] = {}
    for r in scan:
        seen[r["id"]] = seen.get(r["id"], 0) + 1
    rows = [r for r in scan if seen[r["id"]] > 1]
    keep = {r["_rowid"] for r in newest_per_id(rows)}
    stale = [int(r["_rowid"]) for r in rows if r["_rowid"] not in keep]
    for i in range(0, len(stale), 1_000):
        table.delete("_rowid IN (" + ", ".join(str(x) for x in stale[i : i + 1_000]) + ")")
    return len(stale)


def hit_from_row(row: Mapping[str, Any], score: float) -> MemoryHit:
    """The :class:`MemoryHit` of a row read with :data:`HIT_COLUMNS`."""
    return MemoryHit(
        episode_id=row["id"],
        goal=row["goal"],
        phase=int(row["phase"]),
        plan=list(row["plan_actions"] or []),
        success=bool(row["success"]),
        reward=float(row["reward"]),
        caption=row["caption"] or "",
        feedback=row["feedback"] or "",
        score=score,
    )
