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
    """Start Serve with no HTTP proxy: the loop calls its applications through handles (none
    has an HTTP route), so no port is taken and two runs on one machine cannot collide. On a
    cluster where Serve already runs (``serve deploy``), this joins it as it is."""
    serve.start(proxy_location="Disabled")


def _parts(cfg: Config) -> dict[str, Callable[[Config], Any]]:
    return {"world": world_app, "critic": critic_app, "curriculum": curriculum_app, "action": action_app}


class DeployError(RuntimeError):
    """A Serve application failed to deploy, or was not RUNNING within ``run.deploy_timeout_s``."""


def run_together(apps: dict[str, Any], timeout_s: float, progress: Callable[[str], None] = print,
                 labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Deploy the applications ``{name: app}`` at once and wait until every one is RUNNING.

    Replicas of different applications start in parallel (``serve.run`` one by one would wait
    for each in turn). Each application is announced as it becomes ready.

    Returns:
        `dict[str, DeploymentHandle]`: the ingress handle of each application.

    Raises:
        DeployError: an application is DEPLOY_FAILED (its message is quoted), or some are not
            RUNNING after ``timeout_s`` (they are named with their status).
    """
    t0 = time.monotonic()
    names = list(apps)
    started = serve.run_many([serve.RunTarget(apps[n], name=n, route_prefix=None) for n in names],
                             wait_for_applications_running=False)  # waits only for the ingress to exist
    handles = dict(zip(names, started))
    pending = set(apps)
    while pending:
        status = serve.status().applications
        for name in sorted(pending):
            st = status.get(name)
            if st is None:
                continue
            if st.status == "RUNNING":
                pending.discard(name)
                progress(f"{(labels or {}).get(name, name)} ready in {time.monotonic() - t0:.1f}s")
            elif st.status == "DEPLOY_FAILED":
                why = "; ".join(f"{d}: {ds.message}" for d, ds in st.deployments.items() if ds.message)
                raise DeployError(f"Serve application {name!r} failed to deploy: {why or st.message}")
        if pending and time.monotonic() - t0 > timeout_s:
            raise DeployError(
                f"Serve applications not RUNNING after run.deploy_timeout_s={timeout_s:g}s: "
                + ", ".join(f"{n} ({status[n].status.value if n in status else 'missing'})" for n in sorted(pending)))
        if pending:
            time.sleep(0.2)
    return handles


def deploy(cfg: Config, publisher: str | None = None, namespace: str | None = None,
           progress: Callable[[str], None] = print) -> Handles:
    """Deploy every part, in two waves of applications that start in parallel: the engines,
    the reward model and the world (which call nothing), then the critic, curriculum and
    action agents (which look their engines up by name when they start).

    Raises:
        DeployError: see :func:`run_together` (bounded by ``run.deploy_timeout_s``).
    """
    start_serve()
    deadline = time.monotonic() + cfg.run.deploy_timeout_s
    first: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for name in used_engines(cfg):
        pub = publisher if name == cfg.agents.action.engine else None
        first[engine_app_name(name)] = engine_app(cfg, name, pub, namespace)
        labels[engine_app_name(name)] = f"engine {name!r} ({cfg.engines[name].model})"
    if uses_reward_model(cfg):  # the frozen learned Critic, before the critic that calls it
        first[REWARD_MODEL_APP] = reward_model_app(cfg)
        labels[REWARD_MODEL_APP] = f"reward model ({cfg.agents.critic.reward_model})"
    first["world"] = world_app(cfg)
    ready = run_together(first, cfg.run.deploy_timeout_s, progress, labels)
    agents = {name: build(cfg) for name, build in _parts(cfg).items() if name != "world"}
    ready |= run_together(agents, max(1.0, deadline - time.monotonic()), progress)
    return Handles(engines={e: ready[engine_app_name(e)] for e in used_engines(cfg)},
                   reward_model=ready.get(REWARD_MODEL_APP),
                   **{name: ready[name] for name in PART_APPS})


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


def owned_apps(handles: Handles | None) -> list[list[str]]:
    """The applications this driver deployed, in waves to delete (callers before callees: the
    agents and the world, then the reward model and the engines); none when it attached
    (attached applications stay up). The Serve controller is left alone: on a cluster other
    jobs share it, and a Ray this process started ends with the process. Engines shut down in
    their replicas' destructors (which frees vLLM's shared memory). See
    :func:`~worldagent_ray.runtime.lifecycle.orderly_shutdown`."""
    if handles is None or handles.attached:
        return []
    rm = [REWARD_MODEL_APP] if handles.reward_model is not None else []
    return [["action", "curriculum", "critic", "world"], [*rm, *(engine_app_name(e) for e in handles.engines)]]


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
