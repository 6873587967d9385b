"""World models: the sandbox (embedded default) and diffusers video generation.

:func:`build_world` turns ``WorldConfig`` into a ``WorldModel``; backends are imported
lazily, so the sandbox never pays for torch/diffusers and vice versa.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import WorldModel

if TYPE_CHECKING:
    from ..config import WorldConfig


def build_world(world_cfg: "WorldConfig", critic_frames: int | None = None) -> WorldModel:
    """Build the world backend named by ``world_cfg.backend``.

    Args:
        world_cfg (`WorldConfig`):
            ``backend="sandbox"`` builds ``SandboxWorld(world_cfg.sandbox)``;
            ``backend="diffusers"`` builds ``DiffusersWorld(world_cfg.diffusers)`` (loads the
            pipeline, building a builtin tiny one on first use).
        critic_frames (`int`, *optional*):
            PNG frames per rollout the world writes for the critic: ``agents.critic.num_frames``
            (default: that field's default).

    Raises:
        ValueError: an unknown backend.
    """
    if world_cfg.backend == "sandbox":
        from .sandbox import SandboxWorld

        return SandboxWorld(world_cfg.sandbox, critic_frames=critic_frames)
    if world_cfg.backend == "diffusers":
        from .diffusers_world import DiffusersWorld

        return DiffusersWorld(world_cfg.diffusers, critic_frames=critic_frames)
    raise ValueError(f"world.backend must be 'sandbox' or 'diffusers', got {world_cfg.backend!r}")


__all__ = ["WorldModel", "build_world"]
