"""The Action, Critic and Curriculum agents as Ray Serve deployments.

Each is a thin shell: it builds the pure core once per replica with a :class:`RemoteEngine`
over the engine deployment it names, and runs the core's blocking work in a thread so the
replica's event loop keeps accepting requests.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

from ray import serve

from ..agents.action import ActionAgent
from ..agents.curriculum import CurriculumAgent
from ..config import Config
from ..schemas import ActionRequest, CurriculumState, Outcome, Plan, PlanSample, Proposal, Rollout, Task, Verdict
from .engine_deployment import RemoteEngine, engine_app_name
from .placement import deployment_options


def _remote(cfg: Config, engine: str) -> RemoteEngine:
    handle = serve.get_app_handle(engine_app_name(engine))
    return RemoteEngine.for_stage(handle, cfg.engines[engine].model, cfg.run.stage_timeout_s)


def _task_space(cfg: Config):
    if cfg.world.backend == "sandbox":
        from ..world.sandbox.tasks import SandboxTaskGenerator

        return SandboxTaskGenerator(seed=cfg.run.seed)
    return None


class ActionDeployment:
    def __init__(self, cfg: dict[str, Any]):
        self.cfg = Config.model_validate(cfg)
        self.agent = ActionAgent(self.cfg.agents.action, _remote(self.cfg, self.cfg.agents.action.engine))

    async def act(self, requests: Sequence[ActionRequest]) -> list[list[PlanSample]]:
        return await asyncio.to_thread(self.agent.act, list(requests))


class CriticDeployment:
    def __init__(self, cfg: dict[str, Any]):
        from ..critic import Critic

        self.cfg = Config.model_validate(cfg)
        c = self.cfg.agents.critic
        needs_engine = any(s in ("text_judge", "vlm_judge") for s in c.scorers)
        engines = {c.engine: _remote(self.cfg, c.engine)} if needs_engine else None
        self.critic = Critic(c, engines, _reward_model(self.cfg) if "reward_model" in c.scorers else None)

    async def score(self, items: Sequence[tuple[Task, Plan | None, Rollout]]) -> list[Verdict]:
        return await asyncio.to_thread(self.critic.score_batch, list(items))


def _reward_model(cfg: Config):
    """The served reward model when its application is deployed, else None (the Critic then
    loads ``agents.critic.reward_model`` in this replica)."""
    from .reward_model_deployment import REWARD_MODEL_APP, RemoteRewardModel

    try:
        handle = serve.get_app_handle(REWARD_MODEL_APP)
    except Exception:  # not deployed: load it in process
        return None
    return RemoteRewardModel(handle, timeout_s=cfg.run.stage_timeout_s)


class CurriculumDeployment:
    def __init__(self, cfg: dict[str, Any]):
        self.cfg = Config.model_validate(cfg)
        c = self.cfg.agents.curriculum
        engine = _remote(self.cfg, c.engine) if c.use_llm else None
        self.agent = CurriculumAgent(c, _task_space(self.cfg), engine)

    async def propose(self, state: CurriculumState, recent: Sequence[Outcome], mastered: set[str],
                      n: int | None, round_index: int) -> Proposal:
        return await asyncio.to_thread(self.agent.propose, state, list(recent), set(mastered), n, round_index)


def action_app(cfg: Config):
    return serve.deployment(ActionDeployment).options(**deployment_options(cfg.resources.action)).bind(
        cfg.model_dump(mode="json"))


def critic_app(cfg: Config):
    return serve.deployment(CriticDeployment).options(**deployment_options(cfg.resources.critic)).bind(
        cfg.model_dump(mode="json"))


def curriculum_app(cfg: Config):
    return serve.deployment(CurriculumDeployment).options(**deployment_options(cfg.resources.curriculum)).bind(
        cfg.model_dump(mode="json"))
