"""Deploy (or attach to) the whole service: engines, world, critic, curriculum and action.

Every part is its own Serve application, so each scales on its own (``serve status`` and the
dashboard show one row per part). :func:`deploy` is what the driver calls: it deploys every
application, or with ``attach=True`` uses the ones already running (started once with
``serve deploy deployments/<profile>.yaml``) without redeploying them. :func:`build_app` is
the one import path ``serve deploy`` uses for every application.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from ray import serve

from ..config import Config, load_config, used_engines
from .agent_deployments import action_app, critic_app, curriculum_app
from .engine_deployment import engine_app, engine_app_name
from .reward_model_deployment import REWARD_MODEL_APP, reward_model_app
from .world_deployment import world_app

log = logging.getLogger(__name__)

PART_APPS = ("world", "critic", "curriculum", "action")
"""Application names of the parts (engines are ``engine-<name>``)."""


@dataclass
class Handles:
    action: Any
    world: Any
    critic: Any
    curriculum: Any
    engines: dict[str, Any]
    attached: bool = False

    reward_model: Any = None

    @property
    def app_names(self) -> list[str]:
        rm = [REWARD_MODEL_APP] if self.reward_model is not None else []
        return [engine_app_name(e) for e in self.engines] + rm + list(PART_APPS)


class AttachError(RuntimeError):
    """``--attach`` found an application missing or not running."""


def uses_reward_model(cfg: Config) -> bool:
    return "reward_model" in cfg.agents.critic.scorers


def app_names(cfg: Config) -> list[str]:
    rm = [REWARD_MODEL_APP] if uses_reward_model(cfg) else []
    return [engine_app_name(e) for e in used_engines(cfg)] + rm + list(PART_APPS)


def start_serve() -> None:
    """Start Serve bound to localhost (a cluster exposes it deliberately, not by default)."""
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})


def _parts(cfg: Config) -> dict[str, Callable[[Config], Any]]:
    return {"world": world_app, "critic": critic_app, "curriculum": curriculum_app, "action": action_app}


def deploy(cfg: Config, publisher: str | None = None, namespace: str | None = None,
           progress: Callable[[str], None] = print) -> Handles:
    """Deploy every part (engines first: agents look their engine up by name)."""
    start_serve()
    engines = {}
    for name in used_engines(cfg):
        t0 = time.time()
        pub = publisher if name == cfg.agents.action.engine else None
        engines[name] = serve.run(engine_app(cfg, name, pub, namespace), name=engine_app_name(name),
                                  route_prefix=None)
        progress(f"engine {name!r} ({cfg.engines[name].model}) ready in {time.time() - t0:.1f}s")
    reward_model = None
    if uses_reward_model(cfg):  # the frozen learned Critic, before the critic that calls it
        t0 = time.time()
        reward_model = serve.run(reward_model_app(cfg), name=REWARD_MODEL_APP, route_prefix=None)
        progress(f"reward model ({cfg.agents.critic.reward_model}) ready in {time.time() - t0:.1f}s")
    handles = {}
    for name, build in _parts(cfg).items():
        t0 = time.time()
        handles[name] = serve.run(build(cfg), name=name, route_prefix=None)
        progress(f"{name} ready in {time.time() - t0:.1f}s")
    return Handles(engines=engines, reward_model=reward_model, **handles)


def attach(cfg: Config, progress: Callable[[str], None] = print) -> Handles:
    """Handles of applications that are already running; nothing is deployed.

    Raises:
        AttachError: an application the config needs is missing or not RUNNING (names it and
            says how to start it).
    """
    status = serve.status().applications
    needed = app_names(cfg)
    bad = {n: (str(status[n].status.value) if n in status else "missing") for n in needed
           if n not in status or status[n].status != "RUNNING"}
    if bad:
        raise AttachError(
            f"--attach needs these Serve applications running: {bad}; start them with "
            f"`serve deploy deployments/{cfg.profile}.yaml` (running: {sorted(status)})")
    handles = {n: serve.get_app_handle(n) for n in PART_APPS}
    engines = {e: serve.get_app_handle(engine_app_name(e)) for e in used_engines(cfg)}
    reward_model = serve.get_app_handle(REWARD_MODEL_APP) if uses_reward_model(cfg) else None
    progress(f"attached to {len(needed)} running applications: {', '.join(needed)}")
    return Handles(engines=engines, attached=True, reward_model=reward_model, **handles)


def owned_apps(handles: Handles | None) -> list[str]:
    """The applications this driver deployed, in the order to delete them (agents first, then
    the world, then the engines); none when it attached (attached applications stay up). The
    Serve controller is left alone: on a cluster other jobs share it, and a Ray this process
    started ends with the process. Engines shut down in their replicas' destructors (which
    frees vLLM's shared memory). See :func:`~worldagent_ray.runtime.lifecycle.orderly_shutdown`."""
    if handles is None or handles.attached:
        return []
    rm = [REWARD_MODEL_APP] if handles.reward_model is not None else []
    return ["action", "curriculum", "critic", *rm, "world", *(engine_app_name(e) for e in handles.engines)]


# ----------------------------------------------------------------- serve deploy


def build_app(args: dict[str, Any]):
    """The import path of every application in ``deployments/<profile>.yaml``.

    ``args``: ``profile`` (name or YAML path), ``app`` (``world``, ``critic``, ``curriculum``,
    ``action``, ``reward-model`` or ``engine-<name>``), optional ``overrides`` (``section.field=value`` strings),
    and for the policy engine optional ``publisher``/``namespace`` of a weight publisher.
    """
    cfg = load_config(args.get("profile", "local-cpu"), overrides=args.get("overrides", []))
    app = args.get("app")
    if isinstance(app, str) and app.startswith("engine-"):
        return engine_app(cfg, app[len("engine-"):], args.get("publisher"), args.get("namespace"))
    if app == REWARD_MODEL_APP:
        return reward_model_app(cfg)
    parts = _parts(cfg)
    if app not in parts:
        raise ValueError(f"args.app must be one of {sorted(parts)} or 'engine-<name>', got {app!r}")
    return parts[app](cfg)
