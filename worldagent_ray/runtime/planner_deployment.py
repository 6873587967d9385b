"""The planner (``plan`` mode) as a Ray Serve application with an HTTP route.

One application holds the planner and what it imagines with: its own world-model deployment,
critic deployment and policy-engine deployment (Serve model composition), each placed from its
``cfg.resources`` section, so a planner service scales apart from a running evolve loop. A
critic with judge scorers looks its judge engine up by name (``engine-<name>``), so
:func:`serve_planner` deploys that engine application first when the critic needs one.

HTTP (bound to ``planner.http_host``, 127.0.0.1 by default)::

    curl -s -X POST http://127.0.0.1:8000/plan -d '{"goal": "Crack an egg into the bowl and whisk it"}'

The body is a :class:`~worldagent_ray.schemas.PlanRequest`; the answer is a
:class:`~worldagent_ray.schemas.PlanResult` as JSON (best plan, its imagined video and verdict,
the search trace). A bad request answers 422 with the field named; the search itself never
waits without a timeout (``run.stage_timeout_s`` bounds each world, critic and engine call).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import os
from typing import Any

from pydantic import ValidationError
from ray import serve

from ..agents.planner import ActionProposer, Planner
from ..config import Config
from ..schemas import Plan, PlanRequest, PlanResult, Rollout, Task, Verdict
from ..world import media
from ..world.reference import ReferenceImageError, load_reference_image
from .agent_deployments import critic_app
from .engine_deployment import RemoteEngine, engine_app, engine_app_name
from .placement import deployment_options
from .world_deployment import world_app

log = logging.getLogger(__name__)

PLANNER_APP = "planner"


class _Remote:
    """Blocking calls over a deployment handle, each bounded by a timeout (call from a worker thread)."""

    def __init__(self, handle: Any, timeout_s: float):
        self.handle = handle
        self.timeout_s = timeout_s

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.handle, method).remote(*args).result(timeout_s=self.timeout_s)


class RemoteImagination(_Remote):
    """Imagines through the world deployment, writing under ``out_dir``."""

    def __init__(self, handle: Any, timeout_s: float, out_dir: str):
        super().__init__(handle, timeout_s)
        self.out_dir = out_dir

    def imagine(self, task: Task, plans: list[Plan], seeds: list[int]) -> list[Rollout]:
        return self.call("render", task, plans, self.out_dir, task.reference_image, seeds)


class RemoteJudge(_Remote):
    def judge(self, items: list[tuple[Task, Plan, Rollout]]) -> list[Verdict]:
        return self.call("score", items)


def request_task(req: PlanRequest) -> Task:
    """The task of a request: its own, or one made from the goal (``source="user"``)."""
    if req.task is not None:
        return req.task
    goal = (req.goal or "").strip()
    digest = hashlib.sha256(f"{goal}\x1f{req.phase}".encode()).hexdigest()[:12]
    return Task(id=f"plan.{digest}", goal=goal, phase=req.phase, source="user")


class PlannerDeployment:
    """The planner replica: a pure :class:`~worldagent_ray.agents.planner.Planner` over handles.

    Args:
        cfg (`dict`): the whole config (``Config.model_dump(mode="json")``).
        world, critic, policy: handles of the world, critic and policy-engine deployments.
        artifacts (`str`): folder or URI for imagined videos (absolute when local).
    """

    def __init__(self, cfg: dict[str, Any], world: Any, critic: Any, policy: Any, artifacts: str):
        self.cfg = Config.model_validate(cfg)
        timeout = self.cfg.run.stage_timeout_s
        a = self.cfg.agents.action
        self.world = _Remote(world, timeout)
        self.critic = critic
        self.proposer = ActionProposer(a, RemoteEngine(policy, self.cfg.engines[a.engine].model, timeout_s=timeout))
        self.artifacts = artifacts.rstrip("/")
        self.requests = 0

    def _reference(self, req: PlanRequest, out_dir: str) -> str | None:
        if req.reference_image_b64 is None:
            return req.reference_image
        limit = self.cfg.planner.max_image_bytes
        if len(req.reference_image_b64) > 4 * (limit // 3 + 1):
            raise ValueError(f"reference_image_b64 decodes to more than planner.max_image_bytes={limit} bytes")
        try:
            data = base64.b64decode(req.reference_image_b64, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("reference_image_b64 is not valid base64") from None
        uri = media.write_bytes(media.join(out_dir, "reference.img"), data)
        try:
            world = self.cfg.world
            load_reference_image(uri, getattr(world, world.backend).max_reference_pixels)
        except ReferenceImageError as e:
            raise ValueError(f"reference_image_b64: {e}") from None
        return uri

    def _plan_sync(self, req: PlanRequest) -> PlanResult:
        task = request_task(req)
        seed = self.cfg.planner.seed if req.seed is None else req.seed
        key = hashlib.sha256(req.model_dump_json(exclude={"reference_image_b64"}).encode()).hexdigest()[:10]
        out_dir = f"{self.artifacts}/{task.id.replace(':', '_')}/{key}"
        ref = self._reference(req, out_dir)
        if ref is not None:
            task = task.model_copy(update={"reference_image": ref})
        vocab = self.world.call("admissible_actions", task) if self.cfg.agents.action.constrain_to_vocabulary else None
        planner = Planner(self.cfg.planner, self.proposer,
                          RemoteImagination(self.world.handle, self.world.timeout_s, out_dir),
                          RemoteJudge(self.critic, self.world.timeout_s), max_steps=self.cfg.agents.action.max_steps)
        result = planner.plan(task, vocab, method=req.method, num_candidates=req.num_candidates,
                              iterations=req.iterations, seed=seed)
        self.requests += 1
        log.info("planned %s (%s): best reward %.3f after %d world calls", task.id, result.method,
                 result.best.reward if result.best else 0.0, result.world_calls)
        return result

    async def plan(self, request: PlanRequest | dict[str, Any]) -> PlanResult:
        """Plan for one request (a handle call). Raises ValueError naming a bad field."""
        req = request if isinstance(request, PlanRequest) else _parse(request)
        return await asyncio.to_thread(self._plan_sync, req)

    async def __call__(self, http_request: Any) -> Any:
        """``POST <route>`` with a PlanRequest body: 200 and a PlanResult, or 422 naming the problem."""
        from starlette.responses import JSONResponse

        if http_request.method != "POST":
            return JSONResponse({"error": "POST a JSON PlanRequest, e.g. {\"goal\": \"Open the fridge\"}"},
                                status_code=405)
        try:
            body = await http_request.json()
        except Exception:
            return JSONResponse({"error": "the body is not JSON"}, status_code=422)
        try:
            result = await self.plan(body if isinstance(body, dict) else {"_": body})
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=422)
        except Exception as e:  # a failed dependency: say what failed, keep serving
            log.exception("planning failed")
            return JSONResponse({"error": f"{type(e).__name__}: {e}"[:2000]}, status_code=500)
        return JSONResponse(result.model_dump(mode="json"))

    async def health(self) -> dict[str, Any]:
        return {"ok": True, "requests": self.requests}


def _parse(body: dict[str, Any]) -> PlanRequest:
    try:
        return PlanRequest.model_validate(body)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or '<request>'}: {x['msg']}" for x in e.errors())
        raise ValueError(f"invalid plan request: {problems}") from None


def planner_artifacts(cfg: Config) -> str:
    """``planner.artifacts``, else ``<run.root>/planner``; absolute when local (replicas' cwd differs)."""
    uri = cfg.planner.artifacts or f"{cfg.run.root.rstrip('/')}/planner"
    return uri if "://" in uri else os.path.abspath(uri)


def planner_app(cfg: Config) -> serve.Application:
    """The planner application: :class:`PlannerDeployment` bound to its own world, critic and
    policy-engine deployments, each placed from ``cfg.resources`` (``planner``, ``world``,
    ``critic``, ``engines.<policy>``)."""
    policy = cfg.agents.action.engine
    return serve.deployment(PlannerDeployment).options(**deployment_options(cfg.resources.planner)).bind(
        cfg.model_dump(mode="json"), world_app(cfg), critic_app(cfg), engine_app(cfg, policy),
        planner_artifacts(cfg))


def critic_engine(cfg: Config) -> str | None:
    """The engine the critic's judges look up by name, or None when it scores without one."""
    c = cfg.agents.critic
    return c.engine if any(s in ("text_judge", "vlm_judge") for s in c.scorers) else None


def serve_planner(cfg: Config, name: str = PLANNER_APP) -> Any:
    """Start Serve's HTTP proxy on ``planner.http_host:http_port`` (if Serve is not running yet),
    deploy the critic's judge engine when it needs one, then the planner at ``planner.route_prefix``.
    Returns the planner's handle."""
    serve.start(http_options={"host": cfg.planner.http_host, "port": cfg.planner.http_port})
    judge = critic_engine(cfg)
    if judge is not None:
        serve.run(engine_app(cfg, judge), name=engine_app_name(judge), route_prefix=None)
    return serve.run(planner_app(cfg), name=name, route_prefix=cfg.planner.route_prefix)


def planner_builder(args: dict[str, Any]) -> serve.Application:
    """For ``serve deploy`` configs: ``import_path: worldagent_ray.runtime.planner_deployment:planner_builder``
    with ``args: {profile: local-cpu, overrides: [...]}`` (the judge engine app must be deployed too)."""
    from ..config import load_config

    return planner_app(load_config(args.get("profile", "local-cpu"), overrides=args.get("overrides", [])))
