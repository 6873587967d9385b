"""The world model as a Ray Serve deployment, scaled apart from the LLM agents.

Each replica builds one backend with :func:`worldagent_ray.world.build_world` (the sandbox, or
a diffusers Wan pipeline pinned to the replica's GPU) and serves ``render`` requests.
Concurrent requests are gathered by ``@serve.batch`` (``world.max_batch_size``,
``world.batch_wait_timeout_s``) and rendered together in a worker thread, so the replica's
event loop keeps accepting requests while a batch runs. A diffusers backend turns one batch
into as few pipeline calls as shapes and reference images allow (one replica serves one
``height x width x num_frames``, so shapes always agree within a replica).

A request with a malformed task fails alone with a ``ValueError`` naming the field; bad
plans and bad reference images come back as ``Rollout.error``; the replica keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Sequence

from pydantic import ValidationError
from ray import serve

from ..config import Config, WorldConfig
from ..schemas import Plan, Rollout, Task
from ..world import build_world
from ..world.diffusers_world import RenderRequest
from .metrics import WorldMetrics
from .placement import deployment_options

log = logging.getLogger(__name__)

def _as_task(task: Task | dict[str, Any]) -> Task:
    if isinstance(task, Task):
        return task
    try:
        return Task.model_validate(task)
    except ValidationError as e:
        # re-raised as a plain ValueError: it crosses the process boundary intact
        problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or '<task>'}: {x['msg']}" for x in e.errors())
        raise ValueError(f"render: invalid task: {problems}") from None


def _as_plan(plan: Any) -> Plan | Any:
    """Dicts from the wire become Plans; anything that does not validate is left for the
    world to report as ``Rollout.error``."""
    if plan is None or isinstance(plan, Plan) or not isinstance(plan, dict):
        return plan
    try:
        return Plan.model_validate(plan)
    except ValidationError:
        return plan


class WorldDeployment:
    """One world-model replica.

    Args:
        world_cfg (`dict` or `WorldConfig`):
            The ``world`` section (``WorldConfig.model_dump(mode="json")`` over the wire).
        critic_frames (`int`, *optional*):
            PNG frames written per rollout for the critic (``agents.critic.num_frames``).
    """

    def __init__(self, world_cfg: WorldConfig | dict[str, Any], critic_frames: int | None = None):
        self.cfg = world_cfg if isinstance(world_cfg, WorldConfig) else WorldConfig.model_validate(world_cfg)
        t0 = time.perf_counter()
        self.world = build_world(self.cfg, critic_frames=critic_frames)
        self.load_s = time.perf_counter() - t0
        self._render_batched.set_max_batch_size(self.cfg.max_batch_size)
        self._render_batched.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []
        self.requests_served = 0
        self._metrics = WorldMetrics(self.world.name)
        log.info("WorldDeployment replica: %s world ready in %.1fs", self.world.name, self.load_s)

    async def render(
        self,
        task: Task | dict[str, Any],
        plans: Sequence[Plan | dict[str, Any] | None],
        out_dir: str,
        reference_image: str | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Rollout]:
        """Render each plan of one task; one Rollout per plan, in order.

        Raises:
            ValueError: ``task`` is not a valid Task, or ``plans`` is not a list (the
                request fails alone; the replica keeps serving).
        """
        req = RenderRequest(
            task=_as_task(task),
            plans=self._as_plans(plans),
            out_dir=self._as_out_dir(out_dir),
            reference_image=reference_image,
            seeds=None if seeds is None else list(seeds),
        )
        return await self._render_batched(req)

    @staticmethod
    def _as_plans(plans: Any) -> list[Any]:
        if not isinstance(plans, (list, tuple)):
            raise ValueError(f"render: plans must be a list of plans, got {type(plans).__name__}")
        return [_as_plan(p) for p in plans]

    @staticmethod
    def _as_out_dir(out_dir: Any) -> str:
        if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir).strip():
            raise ValueError(f"render: out_dir must be a non-empty path or URI, got {out_dir!r}")
        return str(out_dir)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)  # reset from the config in __init__
    async def _render_batched(self, requests: list[RenderRequest]) -> list[list[Rollout]]:
        t0 = time.perf_counter()
        results = await asyncio.to_thread(self._render_sync, requests)
        self.batch_sizes.append(len(requests))
        self.requests_served += len(requests)
        self._metrics.record(len(requests), time.perf_counter() - t0, results)
        return results

    def _render_sync(self, requests: list[RenderRequest]) -> list[list[Rollout]]:
        render_batch = getattr(self.world, "render_batch", None)
        if render_batch is not None and len(requests) > 1:
            try:
                return render_batch(requests)
            except Exception:  # fall back to one call per request, so one cannot sink the rest
                log.exception("render_batch failed; rendering the %d requests one by one", len(requests))
        return [self._render_one(r) for r in requests]

    def _render_one(self, req: RenderRequest) -> list[Rollout]:
        try:
            return self.world.render(req.task, req.plans, req.out_dir, req.reference_image, req.seeds)
        except Exception as e:  # the protocol says render never raises; if it does, record it
            log.exception("world.render raised for task %s", req.task.id)
            msg = f"world {self.world.name!r} failed: {type(e).__name__}: {e}"[:2000]
            return [
                Rollout(task_id=req.task.id, plan_index=i, world=self.world.name, error=msg)
                for i in range(len(req.plans))
            ]

    async def prepare(self, task: Task | dict[str, Any], out_dir: str) -> Task:
        """World-specific set-up of a proposed task (a backend's optional ``prepare_task``; the
        sandbox renders the starting scene as the task's reference image); else the task as is."""
        task = _as_task(task)
        prepare_task = getattr(self.world, "prepare_task", None)
        if prepare_task is None:
            return task
        return await asyncio.to_thread(prepare_task, task, self._as_out_dir(out_dir))

    async def admissible_actions(self, task: Task | dict[str, Any]) -> list[str] | None:
        return self.world.admissible_actions(_as_task(task))

    async def info(self) -> dict[str, Any]:
        """What this replica serves and how it has batched so far."""
        backend = getattr(self.world, "info", None)
        return {
            "world": self.world.name,
            "backend": backend() if callable(backend) else {},
            "max_batch_size": self.cfg.max_batch_size,
            "batch_wait_timeout_s": self.cfg.batch_wait_timeout_s,
            "load_s": self.load_s,
            "requests_served": self.requests_served,
            "batch_sizes": list(self.batch_sizes[-256:]),
            "pid": os.getpid(),
        }

    async def health(self) -> dict[str, Any]:
        return {"ok": True, "world": self.world.name, "requests_served": self.requests_served}

    def check_health(self) -> None:
        """Serve's periodic health probe: a replica without a world is unhealthy."""
        if getattr(self, "world", None) is None:
            raise RuntimeError("WorldDeployment replica has no world backend")


def world_app(cfg: Config) -> serve.Application:
    """Bind :class:`WorldDeployment` with placement from ``cfg.resources.world``.

    Args:
        cfg (`Config`):
            ``cfg.world`` is what each replica builds, writing ``cfg.agents.critic.num_frames``
            PNG frames per rollout for the critic; ``cfg.resources.world`` gives
            ``num_cpus``/``num_gpus`` per replica, ``replicas`` or ``autoscaling``
            (min/max replicas, target ongoing requests) and ``max_ongoing_requests``.

    Returns:
        `serve.Application`: pass it to ``serve.run``.
    """
    res = cfg.resources.world
    opts = deployment_options(res)
    if res.max_ongoing_requests < cfg.world.max_batch_size:
        log.warning(
            "resources.world.max_ongoing_requests (%d) < world.max_batch_size (%d): batches never fill",
            res.max_ongoing_requests, cfg.world.max_batch_size,
        )
    return serve.deployment(WorldDeployment).options(**opts).bind(
        cfg.world.model_dump(mode="json"), cfg.agents.critic.num_frames)
