"""Engines as Ray Serve deployments, and an adapter that lets pure agent cores use them.

One deployment per named engine (``engine-policy``, ``engine-judge``...). Agents with the same
frozen model share one (the Critic's text judge and the Curriculum share ``judge`` on CPU).
The policy engine, which the learner updates, subscribes to the weight publisher.

:class:`RemoteEngine` implements the :class:`~worldagent_ray.engines.base.InferenceEngine`
protocol over a deployment handle, so ``ActionAgent``, ``Critic`` and ``CurriculumAgent`` run
unchanged inside other replicas (called from a worker thread, never the event loop).
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import Any, Mapping, Sequence

from ray import serve

from ..config import Config, EngineConfig, PartResources
from ..engines.base import EngineError, InferenceEngine
from ..schemas import Completion, SamplingParams
from .metrics import EngineMetrics
from .placement import deployment_options

log = logging.getLogger(__name__)


def engine_app_name(engine: str) -> str:
    return f"engine-{engine}"


class EngineDeployment:
    """One engine replica (a Serve deployment class).

    An exclusive asyncio lock serialises *every* ``generate`` call on this replica, and weight
    loads take the same lock, so a generation never mixes half-updated weights; concurrent
    requests to one replica therefore queue rather than batch."""

    def __init__(self, engine_cfg: dict[str, Any], engine_name: str, publisher: str | None = None,
                 namespace: str | None = None, poll_s: float = 0.5):
        from ..engines import build_engine

        self.cfg = EngineConfig.model_validate(engine_cfg)
        self.name = engine_name
        self.engine: InferenceEngine = build_engine(self.cfg)
        self.lock = asyncio.Lock()
        self.subscriber = None
        self._publisher = publisher
        self._namespace = namespace
        self._poll_s = poll_s
        self.replica_id = f"{engine_name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._metrics = EngineMetrics(engine_name)

    async def _ensure_subscriber(self) -> None:
        if self._publisher is None or self.subscriber is not None:
            return
        import ray

        from ..models import resolve_model
        from ..rl.weight_sync import WeightSubscriber, load_base_weights

        handle = ray.get_actor(self._publisher, namespace=self._namespace)
        model_path = resolve_model(self.cfg.model)
        self.subscriber = WeightSubscriber(
            self.engine, handle, self.replica_id, lock=self.lock,
            base_weights=lambda: load_base_weights(model_path),  # only used for LoRA payloads
        )
        await self.subscriber.register()
        self.subscriber.start(self._poll_s)

    async def generate(self, prompts: Sequence[Any], params: SamplingParams,
                       json_schema: Mapping[str, Any] | None = None) -> list[list[Completion]]:
        await self._ensure_subscriber()
        async with self.lock:
            out = await asyncio.to_thread(self.engine.generate, list(prompts), params, json_schema)
            self._metrics.weights_version(self.engine.weights_version)
            return out

    async def info(self) -> dict[str, Any]:
        await self._ensure_subscriber()
        return {"engine": self.name, "model": self.engine.model_name, "backend": type(self.engine).__name__,
                "weights_version": self.engine.weights_version, "replica": self.replica_id}

    def __del__(self):  # release vLLM's shared memory when Serve tears the replica down
        try:
            if self.subscriber is not None:
                self.subscriber.stop()
            self.engine.shutdown()
        except Exception:
            pass


def engine_app(cfg: Config, engine_name: str, publisher: str | None = None, namespace: str | None = None):
    """A Serve application for one named engine, placed per ``cfg.resources.engines``."""
    if engine_name not in cfg.engines:
        raise ValueError(f"unknown engine {engine_name!r}; defined: {sorted(cfg.engines)}")
    res = cfg.resources.engines.get(engine_name) or PartResources()
    opts = deployment_options(res)
    return serve.deployment(EngineDeployment).options(**opts).bind(
        cfg.engines[engine_name].model_dump(), engine_name, publisher, namespace
    )


class RemoteEngine:
    """The engine protocol over a Serve handle (blocking; call it from a worker thread)."""

    def __init__(self, handle: Any, model_name: str, timeout_s: float = 600.0):
        self._handle = handle
        self._model_name = model_name
        self.timeout_s = timeout_s

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def weights_version(self) -> int:
        return int(self._handle.info.remote().result(timeout_s=self.timeout_s)["weights_version"])

    def generate(self, prompts, params: SamplingParams, json_schema=None) -> list[list[Completion]]:
        try:
            return self._handle.generate.remote(list(prompts), params, json_schema).result(timeout_s=self.timeout_s)
        except TimeoutError as e:
            raise EngineError(f"engine {self._model_name!r} did not answer within {self.timeout_s}s") from e

    def load_weights(self, named_tensors, version: int) -> int:
        raise EngineError("weights reach a served engine through the weight publisher, not RemoteEngine")

    def tokenizer(self):
        raise EngineError("RemoteEngine has no local tokenizer")

    def shutdown(self) -> None:
        pass
