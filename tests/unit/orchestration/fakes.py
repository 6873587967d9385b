"""In-process implementations of the driver's ``Services`` and ``Learner`` protocols.

They run the real pure cores (the sandbox world, the verifiable critic, the rule-based
curriculum over the sandbox task generator) in the test process; memory is a dict and the
policy is scripted (each sample is the task's reference plan with probability ``skill``,
else a plan with its steps reversed), so a run is fast and deterministic. Subclasses inject
faults by overriding one method.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from typing import Any

from worldagent_ray.agents.curriculum import CurriculumAgent
from worldagent_ray.config import Config, load_config
from worldagent_ray.critic import Critic
from worldagent_ray.schemas import (ActionRequest, Completion, CurriculumState, Episode, MemoryHit, Outcome, Plan,
                                    PlanSample, Proposal, Rollout, ScoredGroup, Task, Verdict)
from worldagent_ray.world.sandbox import SandboxWorld
from worldagent_ray.world.sandbox.tasks import SandboxTaskGenerator, reference_plan


def fast_config(*overrides: str) -> Config:
    """local-cpu shaped for in-process driver tests: no judge, no videos, short timeouts."""
    base = [
        "agents.critic.scorers=[verifiable]", "agents.curriculum.use_llm=false",
        "world.sandbox.write_mp4=false", "world.sandbox.write_gif=false", "agents.critic.num_frames=1",
        "world.sandbox.image_size=32", "world.sandbox.frames_per_step=1",
        "run.iterations=3", "run.stage_timeout_s=5", "run.memory_timeout_s=2", "run.retry_backoff_s=0.01",
        "run.max_retries=2", "agents.curriculum.window=4",
    ]
    return load_config("local-cpu", overrides=[*base, *overrides], environ={})


class InProcessServices:
    """The ``Services`` protocol over the pure cores (see the module docstring)."""

    def __init__(self, cfg: Config, skill: float = 0.6, seed: int = 0):
        self.cfg = cfg
        self.G = cfg.agents.action.group_size
        self.world = SandboxWorld(cfg.world.sandbox)
        self.critic = Critic(cfg.agents.critic)
        self.curriculum = CurriculumAgent(cfg.agents.curriculum, SandboxTaskGenerator(seed=seed), None)
        self.memory: dict[str, Episode] = {}
        self.skill = skill
        self.calls: Counter[str] = Counter()
        self.active: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()

    async def _enter(self, what: str) -> None:
        self.calls[what] += 1
        self.active[what] += 1
        self.peak[what] = max(self.peak[what], self.active[what])
        await asyncio.sleep(0)

    def _leave(self, what: str) -> None:
        self.active[what] -= 1

    async def propose(self, state: CurriculumState, recent: list[Outcome], mastered: set[str], n: int,
                      round_index: int) -> Proposal:
        await self._enter("propose")
        try:
            return self.curriculum.propose(state, recent, mastered, n, round_index)
        finally:
            self._leave("propose")

    async def prepare(self, task: Task, out_dir: str) -> Task:
        return task

    async def act(self, request: ActionRequest) -> list[PlanSample]:
        await self._enter("act")
        try:
            rng = random.Random(request.seed)
            ref = reference_plan(request.task).actions
            out = []
            for _ in range(self.G):
                actions = ref if rng.random() < self.skill else list(reversed(ref))
                text = json.dumps({"steps": [{"step": i + 1, "action": a} for i, a in enumerate(actions)]})
                ids = list(range(1, len(actions) + 2))
                out.append(PlanSample(plan=Plan.from_actions(actions), prompt=request.task.goal,
                                      completion=Completion(text=text, token_ids=ids, logprobs=[-0.5] * len(ids),
                                                            prompt_token_ids=[7, 8, 9])))
            return out
        finally:
            self._leave("act")

    async def render(self, task: Task, plans: list[Plan | None], out_dir: str, seeds: list[int]) -> list[Rollout]:
        await self._enter("render")
        try:
            return self.world.render(task, plans, out_dir, None, seeds)
        finally:
            self._leave("render")

    async def score(self, items: list[tuple[Task, Plan | None, Rollout]]) -> list[Verdict]:
        await self._enter("score")
        try:
            return self.critic.score_batch(items)
        finally:
            self._leave("score")

    async def remember(self, episodes: list[Episode]) -> None:
        await self._enter("remember")
        try:
            self.memory.update({e.id: e for e in episodes})
        finally:
            self._leave("remember")

    async def recall(self, goal: str, k: int) -> list[MemoryHit]:
        self.calls["recall"] += 1
        same = [e for e in self.memory.values() if e.task.goal == goal and e.plan is not None][:k]
        return [MemoryHit(episode_id=e.id, goal=e.task.goal, phase=e.task.phase, plan=e.plan.actions,
                          success=e.success, reward=e.reward) for e in same]

    async def stored_ids(self, run_id: str) -> set[str]:
        self.calls["stored_ids"] += 1
        return {i for i, e in self.memory.items() if e.run_id == run_id}

    async def stored_episodes(self, ids: list[str]) -> list[Episode]:
        return [self.memory[i] for i in ids if i in self.memory]

    async def mastered_goals(self, threshold: float, min_n: int) -> set[str]:
        self.calls["mastered_goals"] += 1
        return set()

    def vocabulary(self, task: Task) -> list[str] | None:
        return self.world.admissible_actions(task)


class FakeLearner:
    """Counts fed groups; ``dies_after`` makes ``healthy`` report a dead learner after that many."""

    def __init__(self, dies_after: int | None = None):
        self.groups: list[ScoredGroup] = []
        self.dies_after = dies_after

    async def feed(self, group: ScoredGroup) -> bool:
        self.groups.append(group)
        return True

    async def healthy(self) -> str | None:
        if self.dies_after is not None and len(self.groups) >= self.dies_after:
            return "learner worker died: RuntimeError('injected')"
        return None


def ledger_ids(run: Any) -> set[str]:
    return {r.id for r in run.episode_rows()}
