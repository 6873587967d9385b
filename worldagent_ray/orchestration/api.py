"""The driver's contracts: what the loop needs from the rest of the system, as plain async
methods. ``runtime/services.py`` implements them over Ray; tests implement them in-process."""

from __future__ import annotations

from typing import Protocol

from ..schemas import (ActionRequest, CurriculumState, Episode, MemoryHit, Outcome, Plan, PlanSample, Proposal,
                       Rollout, ScoredGroup, Task, Verdict)


class Services(Protocol):
    """Everything the driver needs from the rest of the system, as plain async methods."""

    async def propose(self, state: CurriculumState, recent: list[Outcome], mastered: set[str], n: int,
                      round_index: int) -> Proposal:
        """The Curriculum: the next ``n`` tasks."""

    async def prepare(self, task: Task, out_dir: str) -> Task:
        """World-specific set-up of a proposed task (the sandbox renders its starting scene as
        the reference image under ``out_dir``); returns the task to dispatch."""

    async def act(self, request: ActionRequest) -> list[PlanSample]:
        """The Action agent: G plan samples for one task."""

    async def render(self, task: Task, plans: list[Plan | None], out_dir: str, seeds: list[int]) -> list[Rollout]:
        """The world model: one rollout per plan (errors come back as ``Rollout.error``)."""

    async def score(self, items: list[tuple[Task, Plan | None, Rollout]]) -> list[Verdict]:
        """The Critic: one verdict per rollout."""

    async def remember(self, episodes: list[Episode]) -> None:
        """Memory: idempotent upsert by episode id."""

    async def recall(self, goal: str, k: int) -> list[MemoryHit]:
        """Memory: the ``k`` most relevant past episodes for a goal."""

    async def stored_ids(self, run_id: str) -> set[str]:
        """Memory: ids of this run's stored episodes."""

    async def stored_episodes(self, ids: list[str]) -> list[Episode]:
        """Memory: the stored episodes with these ids (missing ones are left out)."""

    async def mastered_goals(self, threshold: float, min_n: int) -> set[str]:
        """Memory: goals whose success rate is at least ``threshold`` over ``min_n`` episodes."""

    def vocabulary(self, task: Task) -> list[str] | None:
        """The world's admissible actions for a task, if it has a vocabulary."""


class Learner(Protocol):
    """The asynchronous learner, seen from the driver (with ``--learn``)."""

    async def feed(self, group: ScoredGroup) -> bool:
        """Queue one reward-scored group; False when the buffer refused it (counted there)."""

    async def healthy(self) -> str | None:
        """None while the learner runs; otherwise why it stopped."""
