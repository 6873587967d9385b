"""Deploy the whole service: engines, world, critic, curriculum and action applications.

Every part is its own Serve application, so each scales on its own (``serve status`` and the
dashboard show one row per part). :func:`deploy` is what the driver calls; the ``*_builder``
functions are the import paths used by ``serve deploy deployments/<profile>.yaml``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from ray import serve

from ..config import Config, load_config
from .agent_deployments import action_app, critic_app, curriculum_app
from .engine_deployment import engine_app, engine_app_name
from .world_deployment import world_app

log = logging.getLogger(__name__)



@dataclass
class Handles:
    action: Any
    world: Any
    critic: Any
    curriculum: Any
    engines: dict[str, Any]


def used_engines(cfg: Config) -> list[str]:
    a = cfg.agents
    names = [a.action.engine]
    if any(s in ("text_judge", "vlm_judge") for s in a.critic.scorers):
        names.append(a.critic.engine)
    if a.curriculum.use_llm:
        names.append(a.curriculum.engine)
    return list(dict.fromkeys(names))


def start_serve() -> None:
    """Start Serve bound to localhost (a cluster exposes it deliberately, not by default)."""
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})


def deploy(cfg: Config, publisher: str | None = None, namespace: str | None = None,
           progress=print) -> Handles:
    """Deploy every part (engines first: agents look their engine up by name)."""
    start_serve()
    engines = {}
    for name in used_engines(cfg):
        t0 = time.time()
        pub = publisher if name == cfg.agents.action.engine else None
        engines[name] = serve.run(engine_app(cfg, name, pub, namespace), name=engine_app_name(name),
                                  route_prefix=None)
        progress(f"engine {name!r} ({cfg.engines[name].model}) ready in {time.time() - t0:.1f}s")
    parts = {"world": world_app, "critic": critic_app, "curriculum": curriculum_app, "action": action_app}
    handles = {}
    for name, build in parts.items():
        t0 = time.time()
        handles[name] = serve.run(build(cfg), name=name, route_prefix=None)
        progress(f"{name} ready in {time.time() - t0:.1f}s")
    return Handles(engines=engines, **handles)


def teardown() -> None:
    """Shut Serve down; replicas' ``__del__`` shuts their engines down (frees vLLM's /dev/shm)."""
    try:
        serve.shutdown()
    except Exception as e:  # Ray already gone
        log.debug("serve.shutdown: %s", e)


# ----------------------------------------------------------------- serve deploy builders


def _cfg(args: dict[str, Any]) -> Config:
    return load_config(args.get("profile", "local-cpu"), overrides=args.get("overrides", []))


def engine_builder(args: dict[str, Any]):
    cfg = _cfg(args)
    return engine_app(cfg, args["engine"], args.get("publisher"), args.get("namespace"))


def world_builder(args: dict[str, Any]):
    return world_app(_cfg(args))


def critic_builder(args: dict[str, Any]):
    return critic_app(_cfg(args))


def curriculum_builder(args: dict[str, Any]):
    return curriculum_app(_cfg(args))


def action_builder(args: dict[str, Any]):
    return action_app(_cfg(args))
