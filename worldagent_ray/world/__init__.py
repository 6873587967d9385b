"""World models: the sandbox (embedded default), diffusers video generation, and step-wise rendering.

:func:`build_world` turns ``WorldConfig`` into a ``WorldModel``; backends are imported
lazily, so the sandbox never pays for torch/diffusers and vice versa.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import WorldModel

if TYPE_CHECKING:
    from ..config import WorldConfig


def build_world(world_cfg: "WorldConfig") -> WorldModel:
    """Build the world backend named by ``world_cfg.backend``.

    Args:
        world_cfg (`WorldConfig`):
            ``backend="sandbox"`` builds ``SandboxWorld(world_cfg.sandbox)``;
            ``backend="diffusers"`` builds ``DiffusersWorld(world_cfg.diffusers)`` (loads the
            pipeline, building a builtin tiny one on first use); ``backend="stepwise"`` builds
            ``StepwiseWorld(world_cfg.stepwise)`` (SkyReels-V2 diffusion forcing or chained Wan
            image-to-video, one pipeline call per plan step).

    Raises:
        ValueError: an unknown backend.
    """
    if world_cfg.backend == "sandbox":
        from .sandbox import SandboxWorld

        return SandboxWorld(world_cfg.sandbox)
    if world_cfg.backend == "diffusers":
        from .diffusers_world import DiffusersWorld

        return DiffusersWorld(world_cfg.diffusers)
    if world_cfg.backend == "stepwise":
        from .stepwise import StepwiseWorld

        return StepwiseWorld(world_cfg.stepwise)
    raise ValueError(f"world.backend must be 'sandbox', 'diffusers' or 'stepwise', got {world_cfg.backend!r}")


__all__ = ["WorldModel", "build_world"]
