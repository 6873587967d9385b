"""Typed memory filters, rendered once into a SQL ``where`` clause (pure core, no Ray).

A :class:`MemoryFilter` is the one description of "which episodes": every read of
:class:`~worldagent_ray.memory.store.EpisodeMemory` that filters (``retrieve``, ``count``, ...)
takes the same keyword arguments and builds one of these. Values are validated when the filter
is built and rendered by type, so no caller text reaches the SQL unquoted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np

STATUSES: tuple[str, ...] = ("ok", "failed")
SPLITS: tuple[str, ...] = ("train", "heldout")
PHASES: tuple[int, ...] = (1, 2, 3)


class MemoryFilterError(ValueError):
    """A retrieval or count filter with a bad value; the message names the filter and value."""


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
    sql_str(value)  # rejects NUL characters, naming the value
    return value


@dataclass(frozen=True)
class MemoryFilter:
    """Which episodes a read considers; ``None`` fields do not filter.

    Args:
        success (`bool`, *optional*): Only successful (``True``) or failed (``False``) episodes.
        phase (`int`, *optional*): Curriculum phase, 1, 2 or 3.
        min_reward (`float`, *optional*): Keep episodes with ``reward >= min_reward`` (a finite number).
        run_id (`str`, *optional*): Only episodes of this run.
        split (`str`, *optional*): ``"train"`` or ``"heldout"``.
        status (`str`, *optional*): ``"ok"`` or ``"failed"``.
        exclude_run_task (`tuple[str, str]`, *optional*): ``(run_id, task_id)`` whose episodes are
            left out (e.g. the siblings of the group being planned).

    Raises:
        MemoryFilterError: naming the filter and the bad value.
    """

    success: bool | None = None
    phase: int | None = None
    min_reward: float | None = None
    run_id: str | None = None
    split: str | None = None
    status: str | None = None
    exclude_run_task: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        norm: dict[str, Any] = {}
        if self.success is not None:
            norm["success"] = _check_bool("success", self.success)
        if self.phase is not None:
            if isinstance(self.phase, bool) or not isinstance(self.phase, (int, np.integer)):
                raise MemoryFilterError(f"phase must be an int in {list(PHASES)} or None, got {self.phase!r}")
            norm["phase"] = int(_check_choice("phase", int(self.phase), PHASES))
        if self.min_reward is not None:
            r = self.min_reward
            if isinstance(r, bool) or not isinstance(r, (int, float, np.floating, np.integer)):
                raise MemoryFilterError(f"min_reward must be a number or None, got {r!r}")
            if not math.isfinite(float(r)):
                raise MemoryFilterError(f"min_reward must be finite, got {r!r}")
            norm["min_reward"] = float(r)
        if self.run_id is not None:
            _check_str("run_id", self.run_id)
        if self.split is not None:
            _check_choice("split", self.split, SPLITS)
        if self.status is not None:
            _check_choice("status", self.status, STATUSES)
        if self.exclude_run_task is not None:
            pair = self.exclude_run_task
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise MemoryFilterError(f"exclude_run_task must be a (run_id, task_id) pair or None, got {pair!r}")
            norm["exclude_run_task"] = (
                _check_str("exclude_run_task[0] (run_id)", pair[0]),
                _check_str("exclude_run_task[1] (task_id)", pair[1]),
            )
        for name, value in norm.items():  # frozen: store the normalised values
            object.__setattr__(self, name, value)

    @classmethod
    def from_kwargs(cls, filters: Mapping[str, Any]) -> "MemoryFilter":
        """Build a filter from keyword arguments; unknown names are a :class:`MemoryFilterError`."""
        unknown = sorted(set(filters) - set(FILTER_FIELDS))
        if unknown:
            raise MemoryFilterError(f"unknown memory filter(s) {unknown}; known: {list(FILTER_FIELDS)}")
        return cls(**filters)

    def where(self) -> str | None:
        """The SQL clause (conditions joined by ``AND``), or ``None`` when nothing is filtered."""
        parts: list[str] = []
        if self.success is not None:
            parts.append(f"success = {'true' if self.success else 'false'}")
        if self.phase is not None:
            parts.append(f"phase = {self.phase}")
        if self.min_reward is not None:
            parts.append(f"reward >= {self.min_reward!r}")
        for column in ("run_id", "split", "status"):  # string columns: exact match
            if (value := getattr(self, column)) is not None:
                parts.append(f"{column} = {sql_str(value)}")
        if self.exclude_run_task is not None:
            r, t = self.exclude_run_task
            parts.append(f"NOT (run_id = {sql_str(r)} AND task_id = {sql_str(t)})")
        return " AND ".join(f"({p})" for p in parts) if parts else None

    def matches(self, row: Mapping[str, Any]) -> bool:
        """Whether a row (a mapping with the filtered columns) passes, exactly as :meth:`where`."""
        if self.success is not None and bool(row["success"]) != self.success:
            return False
        if self.phase is not None and row["phase"] != self.phase:
            return False
        if self.min_reward is not None and not row["reward"] >= self.min_reward:
            return False
        if self.run_id is not None and row["run_id"] != self.run_id:
            return False
        if self.split is not None and row["split"] != self.split:
            return False
        if self.status is not None and row["status"] != self.status:
            return False
        if self.exclude_run_task is not None and (row["run_id"], row["task_id"]) == self.exclude_run_task:
            return False
        return True


FILTER_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(MemoryFilter))


def build_where(**filters: Any) -> str | None:
    """SQL ``where`` clause of ``MemoryFilter(**filters)``; see :class:`MemoryFilter`."""
    return MemoryFilter.from_kwargs(filters).where()
