"""The world-model protocol: plans in, one Rollout per plan out.

Backends: ``sandbox`` (the embedded default, a verifiable symbolic kitchen) and
``diffusers`` (Wan2.2 T2V / I2V / TI2V). Both write their artefacts under ``out_dir``,
which may be a local folder or a filesystem URI such as ``s3://bucket/run/videos``.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from ..schemas import Plan, Rollout, Task


@runtime_checkable
class WorldModel(Protocol):
    name: str

    def render(
        self,
        task: Task,
        plans: Sequence[Plan | None],
        out_dir: str,
        reference_image: str | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Rollout]:
        """Render each plan. Never raises for bad input (empty plan, unknown object,
        corrupt image...): the Rollout records the failure in ``error`` or in its ground
        truth, and the worker keeps serving. ``None`` stands for a plan the Action agent
        failed to produce and yields a Rollout with ``error`` set."""
        ...

    def admissible_actions(self, task: Task) -> list[str] | None:
        """Action strings the world understands for this task, or None if it takes free text."""
        ...
