"""Rollout group buffer: the pure bookkeeping behind the Ray ``BufferActor``.

The buffer holds metadata of reward-scored GRPO groups (:class:`BufferEntry`) in insertion
(FIFO) order. Each entry carries an opaque ``ref`` payload: in the Ray shell an ``ObjectRef``
to the :class:`~worldagent_ray.schemas.ScoredGroup` in the object store, so the buffer never
holds the data itself. Nothing here imports Ray.

Rules:

- ``add`` accepts a group unless its id is already queued (``duplicate``), was already handed
  to the learner (``consumed``: in flight or acknowledged, also across a resume via
  :meth:`GroupBuffer.state_dict`), all its rewards are equal and ``drop_zero_variance`` is on
  (``zero_variance``: GRPO advantages would all be 0, so it carries no gradient), or the
  buffer is full (``full``; the Ray shell waits for space instead). Every refusal is counted
  by reason; nothing is lost silently. Capacity counts queued groups only: groups in flight
  are bounded by the learner (``groups_per_step * checkpoint_every``).
- ``take(n, current_version)`` hands out up to ``n`` groups, oldest first. A group is *stale*
  when ``current_version - policy_version > max_staleness``. With ``stale_policy="drop"``
  stale groups are discarded (counted as ``stale``) and the next ones are taken instead;
  with ``"correct"`` they are returned with ``needs_correction=True`` and the learner relies
  on importance weights computed from the rollout log-probs.

At-least-once learning. A handed-out group stays *in flight* (with its ``ref``) until the
learner acknowledges it with :meth:`GroupBuffer.ack`, which it does once a checkpoint that
includes the group's step is durable. :meth:`GroupBuffer.requeue` puts in-flight groups back
at the front of the queue, in hand-out order; the learner calls it when it (re)starts, so
that what a dead learner had taken but not durably trained is trained again. Acknowledged ids
are remembered (``state_dict`` / ``load_state_dict``), so a resumed run never trains twice on
one group; dropped groups are *not* consumed: a regenerated group with the same id (made by
newer weights) is welcome. Invariant (checked by the tests)::

    accepted == queued + in_flight + acknowledged + dropped_stale_after_accept
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Iterable, Literal, Mapping

from worldagent_ray.checks import check_int
from worldagent_ray.schemas import ScoredGroup

__all__ = ["AddResult", "BufferEntry", "GroupBuffer", "DROP_REASONS"]

DROP_REASONS: tuple[str, ...] = ("duplicate", "consumed", "zero_variance", "full", "stale")
"""Every reason a group can be refused or discarded; the keys of ``stats()["dropped"]``."""

_STATE_VERSION = 2


class AddResult(str, Enum):
    """Outcome of :meth:`GroupBuffer.add`."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    CONSUMED = "consumed"
    ZERO_VARIANCE = "zero_variance"
    FULL = "full"

    @property
    def accepted(self) -> bool:
        return self is AddResult.ACCEPTED


@dataclass
class BufferEntry:
    """Metadata of one queued group, plus an opaque ``ref`` to its data.

    ``staleness`` and ``needs_correction`` are filled in by :meth:`GroupBuffer.take`.
    """

    group_id: str
    policy_version: int
    reward_mean: float
    reward_std: float
    num_samples: int
    task_id: str = ""
    ref: Any = None
    staleness: int = 0
    needs_correction: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.group_id, str) or not self.group_id:
            raise ValueError(f"group_id must be a non-empty string, got {self.group_id!r}")
        check_int("policy_version", self.policy_version, 0)
        check_int("num_samples", self.num_samples, 1)
        for name in ("reward_mean", "reward_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.reward_std < 0:
            raise ValueError(f"reward_std must be >= 0, got {self.reward_std}")

    @classmethod
    def from_group(cls, group: ScoredGroup, ref: Any = None) -> "BufferEntry":
        """Entry for ``group`` (its reward statistics are computed here)."""
        return cls.from_meta(meta_of(group), ref)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], ref: Any = None) -> "BufferEntry":
        """Entry from a metadata dict (see :func:`meta_of`); unknown keys go to ``extra``."""
        if not isinstance(meta, Mapping):
            raise TypeError(f"meta must be a mapping, got {type(meta).__name__}")
        required = ("group_id", "policy_version", "reward_mean", "reward_std", "num_samples")
        missing = [k for k in required if k not in meta]
        if missing:
            raise ValueError(f"meta is missing required keys {missing} (got keys {sorted(meta)})")
        known = {*required, "task_id"}
        return cls(
            group_id=meta["group_id"],
            policy_version=meta["policy_version"],
            reward_mean=meta["reward_mean"],
            reward_std=meta["reward_std"],
            num_samples=meta["num_samples"],
            task_id=meta.get("task_id", ""),
            ref=ref,
            extra={k: v for k, v in meta.items() if k not in known},
        )

    def meta(self) -> dict[str, Any]:
        """The metadata as a plain dict (no ``ref``), including ``staleness`` and ``needs_correction``."""
        return {
            "group_id": self.group_id,
            "task_id": self.task_id,
            "policy_version": self.policy_version,
            "reward_mean": self.reward_mean,
            "reward_std": self.reward_std,
            "num_samples": self.num_samples,
            "staleness": self.staleness,
            "needs_correction": self.needs_correction,
            **self.extra,
        }


def meta_of(group: ScoredGroup) -> dict[str, Any]:
    """The metadata dict the buffer keeps for ``group`` (population std of its rewards)."""
    s = group.reward_stats()
    return {
        "group_id": group.group_id,
        "task_id": group.task_id,
        "policy_version": group.policy_version,
        "reward_mean": s["mean"],
        "reward_std": s["std"],
        "num_samples": group.num_samples,
    }


class GroupBuffer:
    """FIFO buffer of GRPO group metadata with staleness control.

    Args:
        max_groups (`int`): capacity; ``add`` answers ``FULL`` beyond it.
        max_staleness (`int`): a group is stale when ``current_version - policy_version`` exceeds it.
        stale_policy (`str`): ``"drop"`` discards stale groups; ``"correct"`` returns them flagged
            ``needs_correction=True``.
        drop_zero_variance (`bool`): refuse groups whose rewards are all equal.
        zero_variance_tol (`float`): a group is zero-variance when ``reward_std <= zero_variance_tol``.
    """

    def __init__(
        self,
        max_groups: int,
        max_staleness: int,
        stale_policy: Literal["drop", "correct"] = "correct",
        drop_zero_variance: bool = True,
        zero_variance_tol: float = 0.0,
    ):
        check_int("max_groups", max_groups, 1)
        check_int("max_staleness", max_staleness, 0)
        if stale_policy not in ("drop", "correct"):
            raise ValueError(f"stale_policy must be 'drop' or 'correct', got {stale_policy!r}")
        if zero_variance_tol < 0:
            raise ValueError(f"zero_variance_tol must be >= 0, got {zero_variance_tol}")
        self.max_groups = max_groups
        self.max_staleness = max_staleness
        self.stale_policy = stale_policy
        self.drop_zero_variance = drop_zero_variance
        self.zero_variance_tol = zero_variance_tol
        self._queue: OrderedDict[str, BufferEntry] = OrderedDict()
        self._inflight: OrderedDict[str, BufferEntry] = OrderedDict()
        self.acked_ids: set[str] = set()
        self.dropped: Counter[str] = Counter({r: 0 for r in DROP_REASONS})
        self.accepted_total = 0
        self.taken_total = 0
        self.requeued_total = 0
        self.corrected_total = 0
        self.taken_staleness: Counter[int] = Counter()

    # ------------------------------------------------------------------ queue

    def __len__(self) -> int:
        return len(self._queue)

    def __contains__(self, group_id: object) -> bool:
        return group_id in self._queue

    @property
    def full(self) -> bool:
        return len(self._queue) >= self.max_groups

    @property
    def consumed_ids(self) -> set[str]:
        """Ids handed to the learner and not returned: in flight or acknowledged."""
        return self.acked_ids | set(self._inflight)

    @property
    def in_flight(self) -> list[str]:
        """Ids handed out and not yet acknowledged, in hand-out order."""
        return list(self._inflight)

    def staleness(self, entry: BufferEntry, current_version: int) -> int:
        """``max(0, current_version - entry.policy_version)``."""
        return max(0, current_version - entry.policy_version)

    def is_stale(self, entry: BufferEntry, current_version: int) -> bool:
        return self.staleness(entry, current_version) > self.max_staleness

    def check(self, entry: BufferEntry) -> AddResult:
        """What :meth:`add` would answer for ``entry``, without changing anything."""
        if not isinstance(entry, BufferEntry):
            raise TypeError(f"entry must be a BufferEntry, got {type(entry).__name__}")
        if entry.group_id in self._queue:
            return AddResult.DUPLICATE
        if entry.group_id in self._inflight or entry.group_id in self.acked_ids:
            return AddResult.CONSUMED
        if self.drop_zero_variance and entry.reward_std <= self.zero_variance_tol:
            return AddResult.ZERO_VARIANCE
        if self.full:
            return AddResult.FULL
        return AddResult.ACCEPTED

    def add(self, entry: BufferEntry) -> AddResult:
        """Queue ``entry`` or say why not (the reason is counted in ``dropped``)."""
        result = self.check(entry)
        if result is AddResult.ACCEPTED:
            self._queue[entry.group_id] = entry
            self.accepted_total += 1
        else:
            self.dropped[result.value] += 1
        return result

    def take(self, n: int, current_version: int) -> list[BufferEntry]:
        """Pop up to ``n`` groups, oldest first, applying the staleness policy.

        Returned entries have ``staleness`` set and stay in flight (with their ``ref``) until
        :meth:`ack` or :meth:`requeue`. Under ``"drop"``, stale groups met on the way are
        discarded (see :meth:`evict_stale`) and do not count towards ``n``.
        """
        check_int("n", n, 0)
        out: list[BufferEntry] = []
        while self._queue and len(out) < n:
            _, entry = self._queue.popitem(last=False)
            s = self.staleness(entry, current_version)
            stale = s > self.max_staleness
            if stale and self.stale_policy == "drop":
                self.dropped["stale"] += 1
                continue
            entry = replace(entry, staleness=s, needs_correction=stale)
            self._inflight[entry.group_id] = entry
            self.taken_total += 1
            self.corrected_total += int(stale)
            self.taken_staleness[s] += 1
            out.append(entry)
        return out

    def ack(self, group_ids: Iterable[str]) -> tuple[int, list[str]]:
        """Acknowledge in-flight groups (their training is in a durable checkpoint): they leave
        the buffer for good. Idempotent: ids already acknowledged are ignored.

        Returns:
            ``(acknowledged now, unknown ids)``: ids neither in flight nor acknowledged before
            (the shell logs them; they change nothing).
        """
        done, unknown = 0, []
        for gid in group_ids:
            if gid in self._inflight:
                del self._inflight[gid]
                self.acked_ids.add(gid)
                done += 1
            elif gid not in self.acked_ids:
                unknown.append(gid)
        return done, unknown

    def requeue(self) -> list[str]:
        """Put every in-flight group back at the front of the queue, in hand-out order, so that
        the next :meth:`take` hands them out again (a restarted learner lost them). The queue
        may exceed ``max_groups`` for a while: a group is never dropped for it.

        Returns:
            The requeued ids.
        """
        back = list(self._inflight.values())
        self._inflight.clear()
        rest = list(self._queue.values())
        self._queue = OrderedDict((e.group_id, replace(e, staleness=0, needs_correction=False)) for e in back)
        self._queue.update((e.group_id, e) for e in rest)
        self.requeued_total += len(back)
        return [e.group_id for e in back]

    def restore(self, trained_ids: Iterable[str]) -> list[str]:
        """A learner (re)started from a checkpoint that contains ``trained_ids``: those are
        acknowledged (taken out of the queue or the in-flight set if there; remembered
        otherwise, e.g. by a fresh buffer of a resumed run), and every other in-flight group
        is requeued (see :meth:`requeue`). Returns the requeued ids."""
        for gid in trained_ids:
            self._inflight.pop(gid, None)
            self._queue.pop(gid, None)
            self.acked_ids.add(gid)
        return self.requeue()

    def evict_stale(self, current_version: int) -> list[BufferEntry]:
        """Under ``stale_policy="drop"``, discard every queued stale group now (frees space).

        Returns the discarded entries (so a shell can release their refs); a no-op under ``"correct"``.
        """
        if self.stale_policy != "drop":
            return []
        stale = [e for e in self._queue.values() if self.is_stale(e, current_version)]
        for e in stale:
            del self._queue[e.group_id]
        self.dropped["stale"] += len(stale)
        return stale

    # ------------------------------------------------------------------ observability

    def queued_staleness(self, current_version: int) -> dict[int, int]:
        """Histogram ``{staleness: count}`` of the queued groups at ``current_version``."""
        return dict(sorted(Counter(self.staleness(e, current_version) for e in self._queue.values()).items()))

    def stats(self, current_version: int | None = None) -> dict[str, Any]:
        """Size, capacity, totals, drop counts by reason and staleness histograms.

        ``taken`` counts hand-outs (a requeued group counts again), ``in_flight`` the groups
        handed out and not acknowledged, ``acked`` the acknowledged ones, ``consumed_ids`` both
        together; at the end of a run ``in_flight == 0`` and ``consumed_ids == acked``."""
        out: dict[str, Any] = {
            "size": len(self._queue),
            "max_groups": self.max_groups,
            "accepted": self.accepted_total,
            "taken": self.taken_total,
            "in_flight": len(self._inflight),
            "acked": len(self.acked_ids),
            "requeued": self.requeued_total,
            "corrected": self.corrected_total,
            "consumed_ids": len(self.acked_ids) + len(self._inflight),
            "dropped": {r: self.dropped[r] for r in DROP_REASONS},
            "taken_staleness": dict(sorted(self.taken_staleness.items())),
        }
        if current_version is not None:
            out["queued_staleness"] = self.queued_staleness(current_version)
        return out

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """What a resumed buffer needs: acknowledged ids and counters (JSON-safe).

        Queued and in-flight entries are not included: their refs do not outlive the process
        that holds them (a resumed run regenerates those groups).
        """
        return {
            "version": _STATE_VERSION,
            "acked_ids": sorted(self.acked_ids),
            "dropped": {r: self.dropped[r] for r in DROP_REASONS},
            "accepted": self.accepted_total,
            "taken": self.taken_total,
            "requeued": self.requeued_total,
            "corrected": self.corrected_total,
            "taken_staleness": {str(k): v for k, v in sorted(self.taken_staleness.items())},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (merging acknowledged ids into those already known).
        Version 1 states (``consumed_ids``: ids handed out, before acknowledgements existed)
        load as acknowledged ids."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        version = state.get("version")
        if version not in (1, _STATE_VERSION):
            raise ValueError(f"state version must be 1 or {_STATE_VERSION}, got {version!r}")
        key = "consumed_ids" if version == 1 else "acked_ids"
        ids = state.get(key)
        if not isinstance(ids, (list, tuple, set)) or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"state[{key!r}] must be a list of strings")
        self.acked_ids |= set(ids)
        for r, c in dict(state.get("dropped", {})).items():
            if r not in DROP_REASONS:
                raise ValueError(f"state['dropped'] has unknown reason {r!r} (known: {DROP_REASONS})")
            self.dropped[r] = int(c)
        self.accepted_total = int(state.get("accepted", 0))
        self.taken_total = int(state.get("taken", 0))
        self.requeued_total = int(state.get("requeued", 0))
        self.corrected_total = int(state.get("corrected", 0))
        self.taken_staleness = Counter({int(k): int(v) for k, v in dict(state.get("taken_staleness", {})).items()})
