"""The world-model protocol: plans in, one Rollout per plan out.

Backends: ``sandbox`` (the embedded default, a verifiable symbolic kitchen), ``diffusers``
(Wan2.2 T2V / I2V / TI2V) and ``stepwise``. They subclass :class:`WorldModel`, which resolves
the arguments every backend treats alike and calls their :meth:`~WorldModel.render_plans`.
All write their artefacts under ``out_dir``, which may be a local folder or a filesystem URI
such as ``s3://bucket/run/videos``.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

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
        failed to produce and yields a Rollout with ``error`` set.

        ``reference_image`` defaults to ``task.reference_image``; ``seeds`` (one per plan)
        default to the backend's own seeds. A backend that subclasses this protocol gets this
        method, which passes the resolved reference image on to :meth:`render_plans`.
        """
        ref = reference_image if reference_image is not None else task.reference_image
        return self.render_plans(task, plans, out_dir, ref, seeds)

    def render_plans(self, task: Task, plans: Sequence[Plan | None], out_dir: str, reference_image: str | None,
                     seeds: Sequence[int] | None) -> list[Rollout]:
        """:meth:`render` with ``reference_image`` resolved (None: the task has none)."""
        ...

    def admissible_actions(self, task: Task) -> list[str] | None:
        """Action strings the world understands for this task, or None if it takes free text."""
        ...


def coerce_plan(plan: Any) -> Plan | None:
    """A Plan, or a dict that validates as one (requests over the wire); else None."""
    if isinstance(plan, Plan):
        return plan
    try:
        return Plan.model_validate(plan)
    except Exception:
        return None
