"""Engine-side weight sync: a subscriber that keeps an inference engine on the latest policy.

Pure asyncio (this module never imports Ray): the subscriber talks to the
:class:`~worldagent_ray.runtime.weight_publisher.WeightPublisher` through an actor handle whose methods
are called as ``handle.method.remote(...)`` and awaited, and awaits the payload's object ref
directly (an ``ObjectRef`` is awaitable, so the event loop never blocks on a fetch).

Guarantees, and how they are kept:

- **No mixed weights.** Generation runs under :meth:`WeightSubscriber.reading` (a shared
  lock); a load holds the exclusive side (pause -> load -> resume). A generate therefore runs
  wholly on the old or wholly on the new weights, and the ``weights_version`` it stamps on its
  completions is the version it ran with. The lock prefers writers, so a pending load is not
  starved by a stream of requests. If a load overruns its timeout the error is raised at once,
  but the exclusive lock is kept until the load's thread really finishes (a thread cannot be
  cancelled), so generation can never run on half-loaded weights.
- **No hang.** Every remote call, fetch and load is bounded by ``timeout_s``
  (``asyncio.wait_for``) and fails with :class:`~worldagent_ray.engines.base.WeightSyncError`.
- **No stale replica.** New replicas register and load the latest version on :meth:`start`; a
  background loop polls so idle replicas catch up; a separate heartbeat keeps the publisher's
  liveness view right even while a load is slow, so the learner's ``wait_synced`` names a
  lagging replica instead of silently skipping it.
- **LoRA.** With LoRA only adapter tensors travel; the subscriber merges them into its own
  copy of the base weights (:func:`merge_lora`) and hands the engine a full state dict.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, TypeVar

from torch import Tensor

from ..engines.base import WeightSyncError

logger = logging.getLogger(__name__)

__all__ = [
    "LORA_SCALING_KEY",
    "AsyncRWLock",
    "WeightSubscriber",
    "is_lora_payload",
    "load_base_weights",
    "merge_lora",
]

LORA_SCALING_KEY = "__lora_scaling__"
"""Reserved key of a LoRA weight payload (see ``LearnerCore.export_weights``): a 0-d tensor
holding ``lora_alpha / lora_rank``."""
_PEFT_PREFIX = "base_model.model."
T = TypeVar("T")


# --------------------------------------------------------------------------- LoRA payloads


def is_lora_payload(named_tensors: Mapping[str, Tensor]) -> bool:
    """True if ``named_tensors`` is an adapter-only payload from ``LearnerCore.export_weights``."""
    return LORA_SCALING_KEY in named_tensors


def merge_lora(base: Mapping[str, Tensor], adapters: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Merge LoRA adapters into a copy of the base weights: ``W = W0 + scaling * B @ A``.

    Args:
        base: the base model's full state dict (HF names, e.g. ``model.layers.0.self_attn.q_proj.weight``).
        adapters: a LoRA payload: peft names (``base_model.model.<module>.lora_A.weight`` and
            ``...lora_B.weight``) and :data:`LORA_SCALING_KEY` (``lora_alpha / lora_rank``).

    Returns:
        A new full state dict (the base's dtypes); tensors without an adapter are shared with
        ``base``, not copied.

    Raises:
        WeightSyncError: the payload lacks the scaling, an ``A`` lacks its ``B`` (or the reverse),
            or a target module is not in ``base``.
    """
    if LORA_SCALING_KEY not in adapters:
        raise WeightSyncError(f"LoRA payload has no {LORA_SCALING_KEY!r} entry")
    scaling = float(adapters[LORA_SCALING_KEY])
    pairs: dict[str, dict[str, Tensor]] = {}
    for name, t in adapters.items():
        if name == LORA_SCALING_KEY:
            continue
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in name:
                module = name.split(marker)[0]
                if module.startswith(_PEFT_PREFIX):
                    module = module[len(_PEFT_PREFIX) :]
                pairs.setdefault(module, {})[part] = t
                break
        else:
            raise WeightSyncError(f"LoRA payload entry {name!r} is neither lora_A nor lora_B")
    merged = dict(base)
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise WeightSyncError(f"LoRA payload for {module!r} has only {sorted(ab)}")
        key = f"{module}.weight"
        if key not in base:
            raise WeightSyncError(f"LoRA target {key!r} is not a base weight")
        w0 = base[key]
        delta = (ab["lora_B"].float() @ ab["lora_A"].float()) * scaling
        if delta.shape != w0.shape:
            raise WeightSyncError(f"LoRA delta for {key!r} has shape {tuple(delta.shape)}, base {tuple(w0.shape)}")
        merged[key] = (w0.float() + delta).to(w0.dtype)
    return merged


def load_base_weights(model_path: str) -> dict[str, Tensor]:
    """Read every ``*.safetensors`` file of a local HF folder into one CPU state dict."""
    from safetensors.torch import load_file

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise WeightSyncError(f"no *.safetensors files in {model_path!r}; cannot merge LoRA adapters")
    out: dict[str, Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


# --------------------------------------------------------------------------- lock


class AsyncRWLock:
    """A writer-preferring readers/writer lock for one event loop.

    Many readers (generate calls) hold it together; a writer (a weight load) holds it alone.
    Once a writer waits, new readers queue behind it.
    """

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @property
    def readers(self) -> int:
        return self._readers

    @property
    def writing(self) -> bool:
        return self._writer

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and self._writers_waiting == 0)
            self._readers += 1
        try:
            yield
        finally:
            async with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    async def acquire_write(self) -> None:
        async with self._cond:
            self._writers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            finally:
                self._writers_waiting -= 1
            self._writer = True

    async def release_write(self) -> None:
        async with self._cond:
            self._writer = False
            self._cond.notify_all()


# --------------------------------------------------------------------------- subscriber


class WeightSubscriber:
    """Keeps one engine replica on the publisher's latest weights.

    Args:
        engine: an :class:`~worldagent_ray.engines.base.InferenceEngine` (``weights_version``,
            ``load_weights(named_tensors, version) -> int``).
        publisher: a handle of the ``WeightPublisherActor``.
        replica_id (`str`): this replica's unique id (e.g. the Serve replica tag).
        timeout_s (`float`): bound on every step (remote call, fetch, merge, load).
        base_weights (`Callable[[], Mapping[str, Tensor]] | None`): returns the base model's
            full state dict, needed only for LoRA payloads (called once, then cached); e.g.
            ``lambda: load_base_weights(model_path)``.
        heartbeat_s (`float`): how often the background heartbeat tells the publisher this
            replica is alive.
        lock (`asyncio.Lock | None`): an exclusive lock that the caller already holds around
            every generate; loads then take this lock instead of the internal readers/writer
            lock (simpler, but serialises generates). Without it, use :meth:`reading`.

    Use in a Serve replica::

        sub = WeightSubscriber(engine, publisher, replica_id)
        await sub.register()                   # registers and loads the latest version
        sub.start(poll_s=1.0)                  # background poll + heartbeat tasks
        async with sub.reading():              # around every generate
            out = await asyncio.to_thread(engine.generate, prompts, params)
        await sub.aclose()                     # on shutdown (or sub.stop() from sync code)
    """

    def __init__(
        self,
        engine: Any,
        publisher: Any,
        replica_id: str,
        *,
        timeout_s: float = 120.0,
        base_weights: Callable[[], Mapping[str, Tensor]] | None = None,
        heartbeat_s: float = 2.0,
        lock: asyncio.Lock | None = None,
    ):
        if not replica_id:
            raise ValueError("replica_id must be a non-empty string")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.engine = engine
        self.publisher = publisher
        self.replica_id = str(replica_id)
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = float(heartbeat_s)
        self._base_weights_fn = base_weights
        self._base: Mapping[str, Tensor] | None = None
        self._rw = AsyncRWLock()
        self._external_lock = lock
        self._update_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._acked = -1
        self.last_error: str | None = None
        self._loading = False
        self.loads = 0
        self.last_load_s = 0.0

    # ------------------------------------------------------------------ serving side

    def reading(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold this around every generate: no weight load runs while it is held."""
        if self._external_lock is not None:
            return self._external_lock
        return self._rw.read()

    @property
    def loading(self) -> bool:
        return self._loading

    async def _pause(self) -> None:
        if self._external_lock is not None:
            await self._external_lock.acquire()
        else:
            await self._rw.acquire_write()
        self._loading = True

    async def _resume(self) -> None:
        self._loading = False
        if self._external_lock is not None:
            self._external_lock.release()
        else:
            await self._rw.release_write()

    # ------------------------------------------------------------------ remote calls

    async def _bounded(self, what: str, aw: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(aw, self.timeout_s)
        except asyncio.TimeoutError:
            raise WeightSyncError(
                f"replica {self.replica_id!r}: {what} timed out after {self.timeout_s:.1f}s"
            ) from None

    async def _latest(self) -> tuple[int, list[Any]]:
        version, refs = await self._bounded("publisher.latest", self.publisher.latest.remote(self.replica_id))
        return int(version), list(refs)

    async def _ack(self, version: int) -> None:
        await self._bounded("publisher.ack", self.publisher.ack.remote(self.replica_id, version))
        self._acked = version

    # ------------------------------------------------------------------ update

    async def maybe_update(self) -> bool:
        """Load the publisher's latest weights if they are newer than the engine's.

        Returns:
            True if new weights were loaded.

        Raises:
            WeightSyncError: a step timed out, the payload was bad, or the engine refused it
                (the engine keeps serving its previous version).
        """
        async with self._update_lock:
            version, refs = await self._latest()
            current = int(self.engine.weights_version)
            if version <= current:
                if current > self._acked:
                    await self._ack(current)
                return False
            if not refs:
                raise WeightSyncError(f"publisher announced version {version} without a payload")
            t0 = time.monotonic()
            payload = await self._bounded(f"fetching weights v{version}", refs[0])
            tensors = await self._bounded(
                f"preparing weights v{version}", asyncio.to_thread(self._full_state_dict, payload)
            )
            loaded = await self._load_exclusive(tensors, version)
            self.loads += 1
            self.last_load_s = time.monotonic() - t0
            await self._ack(loaded)
            logger.info("replica %s loaded weights v%d in %.2fs", self.replica_id, loaded, self.last_load_s)
            return True

    def _full_state_dict(self, payload: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        if not isinstance(payload, Mapping):
            raise WeightSyncError(f"weight payload must be a mapping of tensors, got {type(payload).__name__}")
        if not is_lora_payload(payload):
            return payload
        if self._base is None:
            if self._base_weights_fn is None:
                raise WeightSyncError(
                    f"replica {self.replica_id!r} got a LoRA payload but has no base_weights to merge into"
                )
            self._base = self._base_weights_fn()
        return merge_lora(self._base, payload)

    async def _load_exclusive(self, tensors: Mapping[str, Tensor], version: int) -> int:
        """pause -> load -> resume. On timeout the error is raised, but the exclusive lock is
        released only when the load's thread has finished."""
        await self._bounded(f"pausing generation for v{version}", self._pause())
        fut = asyncio.ensure_future(asyncio.to_thread(self.engine.load_weights, tensors, version))
        done, _ = await asyncio.wait({fut}, timeout=self.timeout_s)
        if not done:
            fut.add_done_callback(lambda _f: asyncio.ensure_future(self._resume()))
            raise WeightSyncError(
                f"replica {self.replica_id!r}: loading weights v{version} timed out after "
                f"{self.timeout_s:.1f}s; generation stays paused until the load returns"
            )
        try:
            new_version = fut.result()
        except WeightSyncError:
            raise
        except Exception as e:
            raise WeightSyncError(f"replica {self.replica_id!r}: engine refused weights v{version}: {e}") from e
        finally:
            await self._resume()
        return int(new_version)

    # ------------------------------------------------------------------ lifecycle

    async def register(self) -> bool:
        """Register with the publisher and load its latest version now (a new replica starts
        on the current policy). Returns True if weights were loaded."""
        await self._bounded(
            "publisher.register",
            self.publisher.register.remote(self.replica_id, int(self.engine.weights_version)),
        )
        return await self.maybe_update()

    def start(self, poll_s: float = 1.0) -> None:
        """Start the background tasks (call from the replica's event loop, after
        :meth:`register`): a poll every ``poll_s`` seconds so idle replicas catch up, and a
        heartbeat every ``heartbeat_s`` seconds."""
        if poll_s <= 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        if self._tasks:
            return
        self._tasks = [
            asyncio.ensure_future(self._poll_loop(poll_s)),
            asyncio.ensure_future(self._heartbeat_loop()),
        ]

    async def _poll_loop(self, poll_s: float) -> None:
        while True:
            await asyncio.sleep(poll_s)
            try:
                await self.maybe_update()
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a background loop has no caller: record loudly, retry
                self.last_error = f"{type(e).__name__}: {e}"
                logger.error("replica %s weight sync failed: %s", self.replica_id, self.last_error)

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self._bounded("publisher.heartbeat", self.publisher.heartbeat.remote(self.replica_id))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.warning("replica %s heartbeat failed: %s", self.replica_id, e)
            await asyncio.sleep(self.heartbeat_s)

    def stop(self) -> None:
        """Cancel the background tasks and unregister (fire-and-forget; safe from sync code
        such as ``__del__``)."""
        for t in self._tasks:
            t.cancel()
        self._tasks = []
        with contextlib.suppress(Exception):
            self.publisher.unregister.remote(self.replica_id)

    async def aclose(self) -> None:
        """Like :meth:`stop`, but waits for the tasks to end and for the unregister to land."""
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with contextlib.suppress(Exception):
            await self._bounded("publisher.unregister", self.publisher.unregister.remote(self.replica_id))

    def status(self) -> dict[str, Any]:
        return {
            "replica_id": self.replica_id,
            "weights_version": int(self.engine.weights_version),
            "acked": self._acked,
            "loading": self.loading,
            "loads": self.loads,
            "last_load_s": self.last_load_s,
            "last_error": self.last_error,
        }
