"""Engines as Ray Serve deployments, and an adapter that lets pure agent cores use them.

One deployment per named engine (``engine-policy``, ``engine-judge``...). Agents with the same
frozen model share one (the Critic's text judge and the Curriculum share ``judge`` on CPU).
The policy engine, which the learner updates, subscribes to the weight publisher.

:class:`RemoteEngine` implements the :class:`~worldagent_ray.engines.base.InferenceEngine`
protocol over a deployment handle, so ``ActionAgent``, ``Critic`` and ``CurriculumAgent`` run
unchanged inside other replicas (called from a worker thread, never the event loop). Its
timeout is shorter than the driver's stage timeout (:func:`engine_call_timeout_s`), and a call
that times out is cancelled, which aborts its requests inside the engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import Any, Mapping, Sequence

from ray import serve

from ..config import Config, EngineConfig, PartResources
from ..engines.aio import bounded
from ..engines.base import EngineError, EngineTimeoutError, InferenceEngine, StaleWeightsError, WeightSyncError
from ..engines.locks import AsyncRWLock
from ..schemas import Completion, SamplingParams
from .metrics import EngineMetrics
from .placement import deployment_options

log = logging.getLogger(__name__)

ENGINE_TIMEOUT_FRACTION = 0.8
"""An engine call may take this fraction of the driver's ``run.stage_timeout_s``."""


def engine_app_name(engine: str) -> str:
    return f"engine-{engine}"


def engine_call_timeout_s(stage_timeout_s: float) -> float:
    """The timeout of one :class:`RemoteEngine` call for a driver stage timeout.

    ``ENGINE_TIMEOUT_FRACTION`` (0.8) of ``stage_timeout_s`` (at least 1 s): the engine call
    gives up, and aborts its requests in the engine, before the driver's stage timeout fires
    and the driver retries, so a retry never piles onto a request still running.
    """
    return max(1.0, ENGINE_TIMEOUT_FRACTION * float(stage_timeout_s))


class EngineDeployment:
    """One engine replica (a Serve deployment class).

    - **Concurrent generates batch.** Each ``generate`` awaits the engine's ``agenerate``
      holding the *shared* side of a writer-preferring readers/writer lock, so requests to
      one replica run together: vLLM batches them continuously, the transformers fallback
      gathers them into micro-batches. Nothing blocks the replica's event loop.
    - **Weight loads are atomic.** The policy engine's
      :class:`~worldagent_ray.rl.weight_sync.WeightSubscriber` loads under the *exclusive*
      side: new generates wait, the ones in flight finish, the weights load, generation
      resumes. Every completion's ``weights_version`` is the version it ran with.
    - **Never silently stale.** The subscriber starts even when the publisher cannot be
      reached or the first load fails, and keeps retrying. When it has been behind a
      published version (or unable to reach the publisher) for longer than
      ``sync_timeout_s``, ``check_health`` fails, so Serve replaces the replica, and
      ``generate`` refuses with :class:`~worldagent_ray.engines.base.StaleWeightsError`.
    - **Bounded start.** The engine must start within ``startup_timeout_s``
      (:func:`~worldagent_ray.engines.factory.build_engine`).

    Args:
        engine_cfg: an ``EngineConfig`` dump.
        engine_name: the engine's name in ``cfg.engines``.
        publisher / namespace: the weight publisher actor to follow (``None``: frozen weights).
        poll_s: longest wait of one long poll for a new version (a publish wakes it at once).
        sync_timeout_s: bound on each weight-sync step, and the staleness limit.
        sync_method: ``object_store`` or ``collective`` (``learner.sync_method``).
    """

    async def __init__(self, engine_cfg: dict[str, Any], engine_name: str, publisher: str | None = None,
                       namespace: str | None = None, poll_s: float = 5.0, sync_timeout_s: float = 120.0,
                       sync_method: str = "object_store"):
        from ..engines import build_engine

        self.cfg = EngineConfig.model_validate(engine_cfg)
        self.name = engine_name
        self.engine: InferenceEngine = await asyncio.to_thread(build_engine, self.cfg, engine_name)
        self.rw = AsyncRWLock()
        self.subscriber = None
        self._publisher = publisher
        self._namespace = namespace
        self._poll_s = float(poll_s)
        self._sync_timeout_s = float(sync_timeout_s)
        self._sync_method = sync_method
        self._connect_task: asyncio.Task | None = None
        self._connect_error: str | None = None
        self.replica_id = f"{engine_name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._metrics = EngineMetrics(engine_name)
        self._metrics.weights_version(self.engine.weights_version)
        if publisher is not None:
            self._started = asyncio.get_running_loop().time()
            self._connect_task = asyncio.ensure_future(self._connect())
            # a new replica starts on the current policy when the publisher answers promptly;
            # otherwise it starts anyway and the subscriber catches up (or reports it stale)
            await asyncio.wait({self._connect_task}, timeout=min(self._sync_timeout_s, 10.0))

    def _base_weights(self, model_path: str) -> dict:
        """The base weights a LoRA payload is merged into, named as this engine's
        ``load_weights`` expects them. The transformers engine wants its in-memory module names,
        which transformers 5 renames on load for some models (Qwen2.5-VL: ``model.layers.*`` on
        disk is ``model.language_model.layers.*`` in memory, the names the learner's adapters
        carry), so it is the engine's own state dict, taken while it still serves the base
        weights (a subscriber asks once, before it merges its first LoRA payload). Other
        engines get the checkpoint's tensors as saved (vLLM maps checkpoint names itself)."""
        from ..engines.hf import TransformersEngine
        from ..rl.weight_sync import load_base_weights

        if isinstance(self.engine, TransformersEngine):
            if self.engine.weights_version != 0:
                raise WeightSyncError(f"replica {self.replica_id!r}: base weights asked for at weights version "
                                      f"{self.engine.weights_version}; only version 0 serves them")
            return {k: v.detach().clone() for k, v in self.engine._model.state_dict().items()}
        return load_base_weights(model_path)

    async def _connect(self) -> None:
        """Find the publisher (retrying until it exists), start the subscriber, and try one
        registration + load now; on failure the subscriber's own loop keeps retrying."""
        import ray

        from ..models import resolve_model
        from ..rl.weight_sync import WeightSubscriber
        from .weight_publisher import collective_fetcher

        delay = 0.2
        while True:
            try:
                handle = await asyncio.to_thread(ray.get_actor, self._publisher, namespace=self._namespace)
                break
            except Exception as e:  # not created yet, or the GCS is busy: keep trying
                self._connect_error = f"weight publisher {self._publisher!r} not found: {e}"
                log.warning("replica %s: %s (retrying in %.1fs)", self.replica_id, self._connect_error, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)
        self._connect_error = None
        model_path = resolve_model(self.cfg.model)
        fetch = collective_fetcher(self.replica_id) if self._sync_method == "collective" else None
        sub = WeightSubscriber(
            self.engine, handle, self.replica_id, lock=self.rw, timeout_s=self._sync_timeout_s,
            stale_after_s=self._sync_timeout_s, fetch=fetch,
            base_weights=lambda: self._base_weights(model_path),  # only used for LoRA payloads
        )
        self.subscriber = sub
        try:
            await sub.register()
        except Exception as e:
            log.error("replica %s: first weight sync failed, retrying in the background: %s", self.replica_id, e)
        sub.start(self._poll_s)
        self._metrics.weights_version(self.engine.weights_version)

    def stale_reason(self) -> str | None:
        """Why this replica must not serve the policy now, or None (frozen engines: never)."""
        if self._publisher is None:
            return None
        if self.subscriber is None:
            waited = asyncio.get_running_loop().time() - self._started
            if waited > self._sync_timeout_s:
                return (f"replica {self.replica_id!r} has not connected to the weight publisher for "
                        f"{waited:.0f}s: {self._connect_error}")
            return None
        return self.subscriber.stale_reason()

    async def generate(self, prompts: Sequence[Any], params: SamplingParams,
                       json_schema: Mapping[str, Any] | None = None) -> list[list[Completion]]:
        """Generate for ``prompts`` (see the engine protocol); runs concurrently with other calls.

        Raises:
            StaleWeightsError: the replica lags behind the published weights (see the class).
        """
        reason = self.stale_reason()
        if reason is not None:
            raise StaleWeightsError(f"engine {self.name!r} refuses to generate: {reason}")
        async with self.rw.read():
            out = await self.engine.agenerate(list(prompts), params, json_schema)
        self._metrics.weights_version(self.engine.weights_version)
        return out

    async def check_health(self) -> None:
        """Serve's health check: fails while the replica is stale, so Serve replaces it."""
        reason = self.stale_reason()
        if reason is not None:
            raise StaleWeightsError(reason)

    async def info(self) -> dict[str, Any]:
        sub = self.subscriber.status() if self.subscriber is not None else None
        return {"engine": self.name, "model": self.engine.model_name, "backend": type(self.engine).__name__,
                "weights_version": self.engine.weights_version, "replica": self.replica_id,
                "stats": self.engine.stats(), "last_load": getattr(self.engine, "last_load", None),
                "subscriber": sub, "stale": self.stale_reason()}

    def __del__(self):  # release vLLM's process and shared memory when Serve tears the replica down
        try:
            if self._connect_task is not None:
                self._connect_task.cancel()
            if self.subscriber is not None:
                self.subscriber.stop()
            self.engine.shutdown()
        except Exception:
            pass


def engine_app(cfg: Config, engine_name: str, publisher: str | None = None, namespace: str | None = None):
    """A Serve application for one named engine, placed per ``cfg.resources.engines``; with a
    ``publisher`` it follows the learner's weights per ``cfg.learner`` (``sync_method``,
    ``sync_timeout_s``), and Serve checks its health every quarter of ``sync_timeout_s``
    (between 1 and 10 s), so a stale replica is replaced soon after it turns stale."""
    if engine_name not in cfg.engines:
        raise ValueError(f"unknown engine {engine_name!r}; defined: {sorted(cfg.engines)}")
    res = cfg.resources.engines.get(engine_name) or PartResources()
    opts = deployment_options(res)
    if publisher is not None:  # check staleness a few times per sync timeout
        opts["health_check_period_s"] = max(1.0, min(10.0, cfg.learner.sync_timeout_s / 4))
    return serve.deployment(EngineDeployment).options(**opts).bind(
        cfg.engines[engine_name].model_dump(), engine_name, publisher, namespace,
        sync_timeout_s=cfg.learner.sync_timeout_s, sync_method=cfg.learner.sync_method,
    )


class RemoteEngine:
    """The engine protocol over a Serve handle (``generate`` blocks: call it from a worker
    thread; ``agenerate`` is for event loops).

    Args:
        handle: the engine app's deployment handle.
        model_name: the engine's model (for messages).
        timeout_s: bound on one call; when it passes the call is cancelled (its requests are
            aborted in the engine) and :class:`~worldagent_ray.engines.base.EngineTimeoutError`
            is raised. Use :meth:`for_stage` to derive it from the driver's stage timeout.
    """

    def __init__(self, handle: Any, model_name: str, timeout_s: float = 600.0):
        self._handle = handle
        self._model_name = model_name
        self.timeout_s = float(timeout_s)

    @classmethod
    def for_stage(cls, handle: Any, model_name: str, stage_timeout_s: float) -> "RemoteEngine":
        """An adapter whose timeout is :func:`engine_call_timeout_s` of ``stage_timeout_s``."""
        return cls(handle, model_name, engine_call_timeout_s(stage_timeout_s))

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def weights_version(self) -> int:
        return int(self._call("info").result(timeout_s=self.timeout_s)["weights_version"])

    def _call(self, method: str, *args: Any):
        return getattr(self._handle, method).remote(*args)

    def _timed_out(self, response: Any) -> EngineTimeoutError:
        response.cancel()  # aborts the request inside the engine replica
        return EngineTimeoutError(
            f"engine {self._model_name!r} did not answer within {self.timeout_s:g}s; the request was aborted"
        )

    def generate(self, prompts, params: SamplingParams, json_schema=None) -> list[list[Completion]]:
        response = self._call("generate", list(prompts), params, json_schema)
        try:
            return response.result(timeout_s=self.timeout_s)
        except TimeoutError:
            raise self._timed_out(response) from None

    async def agenerate(self, prompts, params: SamplingParams, json_schema=None) -> list[list[Completion]]:
        response = self._call("generate", list(prompts), params, json_schema)
        async def result() -> list[list[Completion]]:
            return await response

        try:
            return await bounded(result(), self.timeout_s)
        except TimeoutError:
            raise self._timed_out(response) from None
        except asyncio.CancelledError:
            response.cancel()
            raise

    def load_weights(self, named_tensors, version: int) -> int:
        raise EngineError("weights reach a served engine through the weight publisher, not RemoteEngine")

    async def aload_weights(self, named_tensors, version: int) -> int:
        return self.load_weights(named_tensors, version)

    def stats(self) -> dict[str, int]:
        return dict(self._call("info").result(timeout_s=self.timeout_s)["stats"])

    def tokenizer(self):
        raise EngineError("RemoteEngine has no local tokenizer")

    def shutdown(self) -> None:
        pass
