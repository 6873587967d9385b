"""The driver's :class:`~worldagent_ray.orchestration.evolve.Services` over Ray: Serve handles for
the Curriculum, Action, World and Critic applications, and the memory actor.

Every method awaits one remote call. When the driver gives up on a call (its timeout, or the
run is stopping), the awaiting coroutine is cancelled and the adapter cancels the remote
request too (``DeploymentResponse.cancel`` / ``ray.cancel``), so abandoned work does not pile
up on the replicas behind the retries.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import ray

from ..schemas import (ActionRequest, CurriculumState, Episode, MemoryHit, Outcome, Plan, PlanSample, Proposal,
                       Rollout, Task, Verdict)
from .apps import Handles

STORED_EPISODES_BATCH = 64


async def _await_remote(response: Any) -> Any:
    """Await a ``DeploymentResponse`` or an ``ObjectRef``; cancel it remotely if we are cancelled."""
    try:
        return await response
    except asyncio.CancelledError:
        try:
            if isinstance(response, ray.ObjectRef):
                ray.cancel(response)
            else:
                response.cancel()
        except Exception:  # already finished, or the actor cannot cancel a running thread
            pass
        raise


class RayServices:
    """Adapter from the driver's protocol to Ray handles.

    Args:
        handles: the Serve handles of the deployed applications (:func:`runtime.apps.deploy`).
        memory: the memory actor handle, or None when ``memory.enabled`` is false.
        vocabulary: the world's admissible-action function (pure and local), or None.
    """

    def __init__(self, handles: Handles, memory: Any | None, vocabulary: Callable[[Task], list[str] | None] | None):
        self.handles = handles
        self.memory = memory
        self._vocabulary = vocabulary

    async def _call(self, response: Any) -> Any:
        return await _await_remote(response)

    def _memory(self) -> Any:
        if self.memory is None:
            raise RuntimeError("memory is disabled (memory.enabled: false); the driver must not call it")
        return self.memory

    async def propose(self, state: CurriculumState, recent: list[Outcome], mastered: set[str], n: int,
                      round_index: int) -> Proposal:
        return await self._call(self.handles.curriculum.propose.remote(state, recent, mastered, n, round_index))

    async def prepare(self, task: Task, out_dir: str) -> Task:
        return await self._call(self.handles.world.prepare.remote(task, out_dir))

    async def act(self, request: ActionRequest) -> list[PlanSample]:
        [samples] = await self._call(self.handles.action.act.remote([request]))
        return samples

    async def render(self, task: Task, plans: list[Plan | None], out_dir: str, seeds: list[int]) -> list[Rollout]:
        return await self._call(self.handles.world.render.remote(task, plans, out_dir, task.reference_image, seeds))

    async def score(self, items: list[tuple[Task, Plan | None, Rollout]]) -> list[Verdict]:
        return await self._call(self.handles.critic.score.remote(items))

    async def remember(self, episodes: list[Episode]) -> None:
        await self._call(self._memory().upsert.remote(episodes))

    async def recall(self, goal: str, k: int) -> list[MemoryHit]:
        return await self._call(self._memory().retrieve.remote(goal, k))

    async def stored_ids(self, run_id: str) -> set[str]:
        return set(await self._call(self._memory().ids.remote(run_id)))

    async def stored_episodes(self, ids: list[str]) -> list[Episode]:
        out: list[Episode] = []
        for i in range(0, len(ids), STORED_EPISODES_BATCH):
            chunk = ids[i:i + STORED_EPISODES_BATCH]
            got = await asyncio.gather(*(self._call(self._memory().get.remote(e)) for e in chunk))
            out.extend(e for e in got if e is not None)
        return out

    async def mastered_goals(self, threshold: float, min_n: int) -> set[str]:
        return set(await self._call(self._memory().mastered_goals.remote(threshold, min_n)))

    def vocabulary(self, task: Task) -> list[str] | None:
        return self._vocabulary(task) if self._vocabulary is not None else None

    def optimize_memory(self, timeout_s: float) -> dict[str, int] | None:
        """Compact memory and refresh its indices at the end of a run (bounded; None on failure)."""
        if self.memory is None:
            return None
        try:
            return ray.get(self.memory.optimize.remote(), timeout=timeout_s)
        except Exception as e:  # the episodes are stored; an unoptimised table is only slower
            import logging

            logging.getLogger(__name__).warning("memory optimize failed: %s", e)
            return None
