"""World models: the sandbox (embedded default), diffusers video generation, and step-wise rendering.

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
            pipeline, building a builtin tiny one on first use); ``backend="stepwise"`` builds
            ``StepwiseWorld(world_cfg.stepwise)`` (SkyReels-V2 diffusion forcing or chained Wan
            image-to-video, one pipeline call per plan step).
        critic_frames (`int`, *optional*):
            PNG frames per rollout the world writes for the critic: ``agents.critic.num_frames``
            (default: that field's default).

    With ``world_cfg.reference_scene`` on, the backend's ``prepare_task(task, out_dir)``
    gives each proposed task its starting scene as ``reference_image``
    (:class:`~worldagent_ray.world.reference.ReferenceScenes`).

    Raises:
        ValueError: an unknown backend.
    """
    from .reference import ReferenceScenes

    scenes = ReferenceScenes(world_cfg) if world_cfg.reference_scene else None
    if world_cfg.backend == "sandbox":
        from .sandbox import SandboxWorld

        return SandboxWorld(world_cfg.sandbox, critic_frames=critic_frames, scenes=scenes)
    if world_cfg.backend == "diffusers":
        from .diffusers_world import DiffusersWorld

        return DiffusersWorld(world_cfg.diffusers, critic_frames=critic_frames, scenes=scenes)
    if world_cfg.backend == "stepwise":
        from .stepwise import StepwiseWorld

        return StepwiseWorld(world_cfg.stepwise, critic_frames=critic_frames, scenes=scenes)
    raise ValueError(f"world.backend must be 'sandbox', 'diffusers' or 'stepwise', got {world_cfg.backend!r}")


__all__ = ["WorldModel", "build_world"]
