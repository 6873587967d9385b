"""The frozen learned reward model as its own Ray Serve deployment, and an adapter that lets
the pure :class:`~worldagent_ray.critic.Critic` use it.

The deployment holds an :class:`~worldagent_ray.critic.reward_model.HFRewardModel` (placed per
``cfg.resources.critic``). It has no weight-loading method and never subscribes to the weight
publisher: its ``weights_version`` is 0 for its whole life, however the policy learns.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

from ray import serve

from ..config import Config, CriticConfig
from ..critic.reward_model import Conversation, HFRewardModel
from .placement import deployment_options

REWARD_MODEL_APP = "reward-model"


class RewardModelDeployment:
    """One replica of the frozen reward model (a Serve deployment class)."""

    def __init__(self, critic_cfg: dict[str, Any]):
        cfg = CriticConfig.model_validate(critic_cfg)
        if not cfg.reward_model:
            raise ValueError("agents.critic.reward_model must name the reward model to serve")
        self.model = HFRewardModel(cfg.reward_model, max_length=cfg.reward_model_max_length)
        self.lock = asyncio.Lock()

    async def score(self, conversations: Sequence[Conversation]) -> list[float]:
        async with self.lock:
            return await asyncio.to_thread(self.model.score, list(conversations))

    async def info(self) -> dict[str, Any]:
        return {"model": self.model.name, "weights_version": self.model.weights_version,
                "center": self.model.calibration.center, "scale": self.model.calibration.scale}


def reward_model_app(cfg: Config):
    """The Serve application of the reward model (deploy it as ``REWARD_MODEL_APP``)."""
    return serve.deployment(RewardModelDeployment).options(**deployment_options(cfg.resources.critic)).bind(
        cfg.agents.critic.model_dump(mode="json"))


class RemoteRewardModel:
    """The :class:`~worldagent_ray.critic.reward_model.RewardModel` protocol over a Serve handle
    (blocking; call it from a worker thread, never an event loop)."""

    def __init__(self, handle: Any, timeout_s: float = 600.0):
        self._handle = handle
        self.timeout_s = timeout_s

    @property
    def weights_version(self) -> int:
        return int(self._handle.info.remote().result(timeout_s=self.timeout_s)["weights_version"])

    def score(self, conversations: Sequence[Conversation]) -> list[float]:
        return list(self._handle.score.remote(list(conversations)).result(timeout_s=self.timeout_s))
