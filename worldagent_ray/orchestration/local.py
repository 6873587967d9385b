"""The driver's :class:`~worldagent_ray.orchestration.api.Services` in one process, without Ray:
the same pure cores the Serve deployments hold (curriculum, Action agent on an engine, world,
critic, LanceDB memory), each blocking call run in a worker thread.

Used by the benchmarks (the pipeline benchmark compares drivers on identical parts) and for
debugging the loop in a single process (``pdb`` works everywhere).
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..agents.action import ActionAgent
from ..agents.curriculum import CurriculumAgent
from ..config import Config
from ..critic import Critic
from ..schemas import (ActionRequest, CurriculumState, Episode, MemoryHit, Outcome, Plan, PlanSample, Proposal,
                       Rollout, Task, Verdict)
from ..world import build_world


def task_space(cfg: Config) -> Any:
    """The world's task space for the curriculum (the sandbox's generator), or None."""
    if cfg.world.backend != "sandbox":
        return None
    from ..world.sandbox.tasks import SandboxTaskGenerator

    return SandboxTaskGenerator(seed=cfg.run.seed)


class LocalServices:
    """In-process services (see the module docstring).

    Args:
        cfg: the whole config.
        engines: inference engines by name (``cfg.engines`` keys) for the agents that use one;
            the Action agent needs ``engines[cfg.agents.action.engine]``.
        memory: an :class:`~worldagent_ray.memory.EpisodeMemory`, or None (memory disabled).
        world: a world backend (default: :func:`~worldagent_ray.world.build_world`).
    """

    def __init__(self, cfg: Config, engines: dict[str, Any], memory: Any = None, world: Any = None):
        a = cfg.agents
        self.cfg = cfg
        self.world = world if world is not None else build_world(cfg.world, critic_frames=a.critic.num_frames)
        self.action = ActionAgent(a.action, engines[a.action.engine])
        self.critic = Critic(a.critic, engines)
        self.curriculum = CurriculumAgent(a.curriculum, task_space(cfg),
                                          engines.get(a.curriculum.engine) if a.curriculum.use_llm else None)
        self.memory = memory

    async def propose(self, state: CurriculumState, recent: list[Outcome], mastered: set[str], n: int,
                      round_index: int) -> Proposal:
        return await asyncio.to_thread(self.curriculum.propose, state, recent, mastered, n, round_index)

    async def prepare(self, task: Task, out_dir: str) -> Task:
        prepare_task = getattr(self.world, "prepare_task", None)
        return task if prepare_task is None else await asyncio.to_thread(prepare_task, task, out_dir)

    async def act(self, request: ActionRequest) -> list[PlanSample]:
        [samples] = await asyncio.to_thread(self.action.act, [request])
        return samples

    async def render(self, task: Task, plans: list[Plan | None], out_dir: str, seeds: list[int]) -> list[Rollout]:
        return await asyncio.to_thread(self.world.render, task, plans, out_dir, task.reference_image, seeds)

    async def score(self, items: list[tuple[Task, Plan | None, Rollout]]) -> list[Verdict]:
        return await asyncio.to_thread(self.critic.score_batch, items)

    async def remember(self, episodes: list[Episode]) -> None:
        await asyncio.to_thread(self.memory.upsert, episodes)

    async def recall(self, goal: str, k: int) -> list[MemoryHit]:
        return await asyncio.to_thread(self.memory.retrieve, goal, k)

    async def stored_ids(self, run_id: str) -> set[str]:
        return set(await asyncio.to_thread(self.memory.ids, run_id))

    async def stored_episodes(self, ids: list[str]) -> list[Episode]:
        got = [await asyncio.to_thread(self.memory.get, i) for i in ids]
        return [e for e in got if e is not None]

    async def mastered_goals(self, threshold: float, min_n: int) -> set[str]:
        return set(await asyncio.to_thread(self.memory.mastered_goals, threshold, min_n))

    def vocabulary(self, task: Task) -> list[str] | None:
        if not self.cfg.agents.action.constrain_to_vocabulary:
            return None
        return self.world.admissible_actions(task)
