"""Engine-side weight sync: a subscriber that keeps an inference engine on the latest policy.

Pure asyncio (this module never imports Ray): the subscriber talks to the
:class:`~worldagent_ray.runtime.weight_publisher.WeightPublisherActor` through an actor handle
whose methods are called as ``handle.method.remote(...)`` and awaited, and awaits the
payload's object ref directly (an ``ObjectRef`` is awaitable, so the event loop never blocks
on a fetch). Another transport (the collective broadcast) plugs in as ``fetch``.

Guarantees, and how they are kept:

- **No mixed weights.** Generation runs under :meth:`WeightSubscriber.reading` (the shared
  side of a writer-preferring :class:`~worldagent_ray.engines.locks.AsyncRWLock`); a load
  holds the exclusive side (pause new generates -> drain the running ones -> load ->
  resume). A generate therefore runs wholly on the old or wholly on the new weights, and the
  ``weights_version`` it stamps on its completions is the version it ran with. If a load
  overruns its timeout, or the update is cancelled, the error is raised at once but the
  exclusive side is kept until the load really finishes, so generation can never run on
  half-loaded weights.
- **No hang.** Every remote call, fetch and load is bounded by ``timeout_s``
  (:func:`~worldagent_ray.engines.aio.bounded`, which unlike ``asyncio.wait_for`` on Python
  3.11 never swallows a cancellation) and fails with
  :class:`~worldagent_ray.engines.base.WeightSyncError`; the background loops also stop on a
  flag, and :meth:`WeightSubscriber.aclose` waits for them at most ``timeout_s``.
- **No silently stale replica.** :meth:`WeightSubscriber.start` runs one background loop that
  registers (retrying with backoff until it succeeds: a failed ``register`` or first load is
  retried, never fatal), then long-polls the publisher (``wait_newer``: woken the moment a
  version is published), loads and acks; a separate heartbeat reports the version served,
  even while a slow load runs, so the learner's ``wait_synced`` names a lagging replica.
  :meth:`WeightSubscriber.stale_reason` says when this replica has known of newer weights, or
  has failed to reach the publisher at all, for longer than ``stale_after_s``: the Serve
  deployment then fails its health check (Serve replaces the replica) and refuses to generate.
- **LoRA.** With LoRA only adapter tensors travel; the subscriber merges them into its own
  copy of the base weights (:func:`merge_lora`) and hands the engine a full state dict.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, TypeVar

import torch
from torch import Tensor

from ..engines.aio import bounded
from ..engines.base import WeightSyncError
from ..engines.locks import AsyncRWLock

logger = logging.getLogger(__name__)

__all__ = [
    "LORA_SCALING_KEY",
    "AsyncRWLock",
    "WeightSubscriber",
    "is_lora_payload",
    "load_base_weights",
    "merge_lora",
    "pack_state_dict",
    "unpack_state_dict",
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


def _base_key(base: Mapping[str, Tensor], key: str) -> str:
    """``key`` (an adapter target, named as the module is in memory) as it is named in ``base``.

    transformers 5 renames some models' modules on load (Qwen2.5-VL: the checkpoint's
    ``model.layers.*`` is ``model.language_model.layers.*`` in memory), so a base read from the
    checkpoint files (what vLLM loads) may lack one path segment of the target: the target
    matches the one base name it equals with exactly one segment removed; no match or more
    than one is an error."""
    if key in base:
        return key
    parts = key.split(".")
    found = {c for c in (".".join(parts[:i] + parts[i + 1:]) for i in range(len(parts) - 1)) if c in base}
    if len(found) != 1:
        raise WeightSyncError(f"LoRA target {key!r} is not a base weight"
                              + (f" (ambiguous: {sorted(found)})" if found else ""))
    return found.pop()


def merge_lora(base: Mapping[str, Tensor], adapters: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Merge LoRA adapters into a copy of the base weights: ``W = W0 + scaling * B @ A``.

    Args:
        base: the base model's full state dict (HF names, e.g. ``model.layers.0.self_attn.q_proj.weight``).
        adapters: a LoRA payload: peft names (``base_model.model.<module>.lora_A.weight`` and
            ``...lora_B.weight``) and :data:`LORA_SCALING_KEY` (``lora_alpha / lora_rank``).

    Returns:
        A new full state dict with ``base``'s names and dtypes (a target named as in memory
        finds its checkpoint name, see :func:`_base_key`); tensors without an adapter are
        shared with ``base``, not copied.

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
        key = _base_key(base, f"{module}.weight")
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


# --------------------------------------------------------------------------- wire format

PACKED_KEY = "__worldagent_tensors__"


def pack_state_dict(named_tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    """A state dict as flat ``uint8`` numpy views plus dtypes and shapes.

    Pickled out of band (pickle protocol 5), numpy buffers are written to the Ray object store
    once and read back in place, with no copy on the receiving side; torch tensors are not
    (Ray pickles them through ``torch.save`` unless a global zero-copy switch is on). CPU
    contiguous tensors are viewed, not copied, here.
    """
    entries = []
    for name, t in named_tensors.items():
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        entries.append((name, str(flat.dtype).removeprefix("torch."), list(t.shape), flat.view(torch.uint8).numpy()))
    return {PACKED_KEY: 1, "entries": entries}


def unpack_state_dict(payload: Mapping[str, Any]) -> dict[str, Tensor]:
    """The tensors of a :func:`pack_state_dict` payload (read-only views into its buffers:
    valid while ``payload`` is referenced, never to be written to), or ``payload`` itself
    when it is a plain mapping of tensors."""
    if PACKED_KEY not in payload:
        return dict(payload)
    out: dict[str, Tensor] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": we only read them
        for name, dtype, shape, buf in payload["entries"]:
            out[name] = torch.from_numpy(buf).view(getattr(torch, dtype)).view(list(shape))
    return out


# --------------------------------------------------------------------------- subscriber


class WeightSubscriber:
    """Keeps one engine replica on the publisher's latest weights.

    Args:
        engine: an :class:`~worldagent_ray.engines.base.InferenceEngine` (``weights_version``,
            ``aload_weights`` or ``load_weights(named_tensors, version) -> int``).
        publisher: a handle of the ``WeightPublisherActor``.
        replica_id (`str`): this replica's unique id (e.g. the Serve replica tag).
        timeout_s (`float`): bound on every step (remote call, fetch, merge, load).
        base_weights (`Callable[[], Mapping[str, Tensor]] | None`): returns the base model's
            full state dict, needed only for LoRA payloads (called once, then cached); e.g.
            ``lambda: load_base_weights(model_path)``.
        heartbeat_s (`float`): how often the background heartbeat reports the version served.
        lock (`AsyncRWLock | asyncio.Lock | None`): the lock the caller holds around every
            generate. An :class:`AsyncRWLock` (shared with the caller, who holds its read side
            via :meth:`reading`) lets generates run together; an ``asyncio.Lock`` serialises
            them (legacy). ``None``: an internal :class:`AsyncRWLock`.
        fetch (`Callable[[dict], Awaitable[Mapping[str, Tensor]]] | None`): gets the payload
            of an announcement (default: await its object ref); the collective transport
            passes its receiver here.
        stale_after_s (`float | None`): after this long behind a published version (or
            without ever reaching the publisher), :meth:`stale_reason` reports the replica
            stale. ``None``: never.
        retry_max_s (`float`): longest backoff between failed attempts of the background loop.

    Use in a Serve replica::

        sub = WeightSubscriber(engine, publisher, replica_id, lock=rw, stale_after_s=120)
        try:
            await sub.register()               # registers and loads the latest version now
        except WeightSyncError:
            pass                               # the background loop retries
        sub.start(poll_s=5.0)                  # background sync loop + heartbeat
        async with sub.reading():              # around every generate
            out = await engine.agenerate(prompts, params)
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
        lock: AsyncRWLock | asyncio.Lock | None = None,
        fetch: Callable[[Mapping[str, Any]], Awaitable[Mapping[str, Tensor]]] | None = None,
        stale_after_s: float | None = None,
        retry_max_s: float = 10.0,
    ):
        if not replica_id:
            raise ValueError("replica_id must be a non-empty string")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if stale_after_s is not None and stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be > 0 or None, got {stale_after_s}")
        self.engine = engine
        self.publisher = publisher
        self.replica_id = str(replica_id)
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = float(heartbeat_s)
        self.stale_after_s = stale_after_s
        self.retry_max_s = float(retry_max_s)
        self._base_weights_fn = base_weights
        self._base: Mapping[str, Tensor] | None = None
        self._fetch_fn = fetch
        self._lock: AsyncRWLock | asyncio.Lock = lock if lock is not None else AsyncRWLock()
        self._update_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self._acked = -1
        self._registered = False
        self._created_at = time.monotonic()
        self._started_at: float | None = None
        self._known_latest = 0
        self._behind_since: float | None = None
        self.last_error: str | None = None
        self._loading = False
        self.loads = 0
        self.last_load_s = 0.0

    # ------------------------------------------------------------------ serving side

    def reading(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold this around every generate: no weight load runs while it is held."""
        if isinstance(self._lock, AsyncRWLock):
            return self._lock.read()
        return self._lock

    @property
    def loading(self) -> bool:
        return self._loading

    async def _pause(self) -> None:
        if isinstance(self._lock, AsyncRWLock):
            await self._lock.acquire_write()
        else:
            await self._lock.acquire()
        self._loading = True

    async def _resume(self) -> None:
        self._loading = False
        if isinstance(self._lock, AsyncRWLock):
            await self._lock.release_write()
        else:
            self._lock.release()

    def stale_reason(self) -> str | None:
        """Why this replica must not be trusted to serve the current policy, or None.

        Stale means: a newer version has been published for more than ``stale_after_s`` (or,
        for a replica started after that publish, since its start) and this replica still
        serves an older one, or the background loop has not reached the publisher for more
        than ``stale_after_s`` since it started.
        """
        if self.stale_after_s is None or self._started_at is None:
            return None
        now = time.monotonic()
        err = f"; last error: {self.last_error}" if self.last_error else ""
        if not self._registered and now - self._started_at > self.stale_after_s:
            return (f"replica {self.replica_id!r} has not reached the weight publisher for "
                    f"{now - self._started_at:.0f}s (sync timeout {self.stale_after_s:g}s){err}")
        current = int(self.engine.weights_version)
        if (self._behind_since is not None and current < self._known_latest
                and now - self._behind_since > self.stale_after_s):
            return (f"replica {self.replica_id!r} serves weights v{current} but v{self._known_latest} was "
                    f"published {now - self._behind_since:.0f}s ago (sync timeout {self.stale_after_s:g}s){err}")
        return None

    # ------------------------------------------------------------------ remote calls

    async def _bounded(self, what: str, aw: Awaitable[T], extra_s: float = 0.0) -> T:
        try:
            return await bounded(aw, self.timeout_s + extra_s)
        except TimeoutError:
            raise WeightSyncError(
                f"replica {self.replica_id!r}: {what} timed out after {self.timeout_s + extra_s:.1f}s"
            ) from None

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
        ann = await self._bounded(
            "publisher.announcement",
            self.publisher.announcement.remote(self.replica_id, int(self.engine.weights_version)),
        )
        return await self._apply(ann)

    def _note(self, ann: Mapping[str, Any]) -> None:
        """Track the newest version known, and since when this replica has been behind it."""
        version = int(ann["version"])
        if version > self._known_latest:
            self._known_latest = version
        if int(self.engine.weights_version) < self._known_latest:
            if self._behind_since is None:  # since the publish, or since this subscriber exists
                ago = ann.get("published_ago_s") or 0.0
                since = time.monotonic() - float(ago)
                self._behind_since = max(since, self._created_at)
        else:
            self._behind_since = None

    async def _apply(self, ann: Mapping[str, Any]) -> bool:
        async with self._update_lock:
            self._note(ann)
            version = int(ann["version"])
            current = int(self.engine.weights_version)
            if version <= current:
                if current > self._acked:
                    await self._ack(current)
                return False
            t0 = time.monotonic()
            payload = await self._bounded(f"fetching weights v{version}", self._fetch(ann))
            tensors = await self._bounded(
                f"preparing weights v{version}", asyncio.to_thread(self._full_state_dict, payload)
            )
            loaded = await self._load_exclusive(tensors, version)
            self.loads += 1
            self.last_load_s = time.monotonic() - t0
            self._note(ann)
            await self._ack(loaded)
            logger.info("replica %s loaded weights v%d in %.2fs", self.replica_id, loaded, self.last_load_s)
            return True

    async def _fetch(self, ann: Mapping[str, Any]) -> Mapping[str, Tensor]:
        if self._fetch_fn is not None:
            return await self._fetch_fn(ann)
        refs = list(ann.get("refs") or [])
        if not refs:
            raise WeightSyncError(
                f"weights v{ann['version']} were announced without an object-store payload and replica "
                f"{self.replica_id!r} has no other transport"
            )
        return await refs[0]

    def _full_state_dict(self, payload: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        if not isinstance(payload, Mapping):
            raise WeightSyncError(f"weight payload must be a mapping of tensors, got {type(payload).__name__}")
        payload = unpack_state_dict(payload)
        if not is_lora_payload(payload):
            return payload
        if self._base is None:
            if self._base_weights_fn is None:
                raise WeightSyncError(
                    f"replica {self.replica_id!r} got a LoRA payload but has no base_weights to merge into"
                )
            self._base = self._base_weights_fn()
        return merge_lora(self._base, payload)

    async def _engine_load(self, tensors: Mapping[str, Tensor], version: int) -> int:
        aload = getattr(self.engine, "aload_weights", None)
        if aload is not None and asyncio.iscoroutinefunction(aload):
            return int(await aload(tensors, version))
        return int(await asyncio.to_thread(self.engine.load_weights, tensors, version))

    async def _load_exclusive(self, tensors: Mapping[str, Tensor], version: int) -> int:
        """pause -> load -> resume. On a timeout or a cancellation the error is raised at
        once, but the exclusive lock is released only when the load has really finished."""
        await self._bounded(f"pausing generation for v{version}", self._pause())
        task = asyncio.ensure_future(self._engine_load(tensors, version))

        def resume_when_done(_t: asyncio.Future) -> None:
            asyncio.ensure_future(self._resume())

        try:
            done, _ = await asyncio.wait({task}, timeout=self.timeout_s)
        except asyncio.CancelledError:
            task.add_done_callback(resume_when_done)
            raise
        if not done:
            task.add_done_callback(resume_when_done)
            raise WeightSyncError(
                f"replica {self.replica_id!r}: loading weights v{version} timed out after "
                f"{self.timeout_s:.1f}s; generation stays paused until the load returns"
            )
        try:
            new_version = task.result()
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
        dtype = getattr(self.engine, "weights_dtype", None)
        await self._bounded(
            "publisher.register",
            self.publisher.register.remote(self.replica_id, int(self.engine.weights_version),
                                           str(dtype).removeprefix("torch.") if dtype is not None else None),
        )
        self._registered = True
        return await self.maybe_update()

    def start(self, poll_s: float = 1.0) -> None:
        """Start the background tasks (call from the replica's event loop): the sync loop
        (registers until it succeeds, then long-polls for new versions, waiting at most
        ``poll_s`` per poll, and loads them) and the heartbeat every ``heartbeat_s``."""
        if poll_s <= 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        if self._tasks:
            return
        self._started_at = time.monotonic()
        self._tasks = [
            asyncio.ensure_future(self._sync_loop(poll_s)),
            asyncio.ensure_future(self._heartbeat_loop()),
        ]

    async def _sync_loop(self, poll_s: float) -> None:
        delay = min(0.2, self.retry_max_s)
        while not self._closing:
            try:
                if not self._registered:
                    await self.register()
                else:
                    ann = await self._bounded(
                        "publisher.wait_newer",
                        self.publisher.wait_newer.remote(self.replica_id, int(self.engine.weights_version), poll_s),
                        extra_s=poll_s,
                    )
                    await self._apply(ann)
                self.last_error = None
                delay = min(0.2, self.retry_max_s)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a background loop has no caller: record loudly, retry
                self.last_error = f"{type(e).__name__}: {e}"
                logger.error("replica %s weight sync failed (retrying in %.1fs): %s",
                             self.replica_id, delay, self.last_error)
                await self._backoff(delay)
                delay = min(delay * 2, self.retry_max_s)

    async def _backoff(self, delay: float) -> None:
        """Wait ``delay`` before retrying, but wake at once if a version newer than the one
        that failed is published (it may fix what failed)."""
        if not self._registered:
            await asyncio.sleep(delay)
            return
        try:
            await self._bounded(
                "publisher.wait_newer",
                self.publisher.wait_newer.remote(self.replica_id, self._known_latest, delay,
                                                 int(self.engine.weights_version)),
                extra_s=delay,
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            await asyncio.sleep(delay)

    async def _heartbeat_loop(self) -> None:
        while not self._closing:
            try:
                await self._bounded(
                    "publisher.heartbeat",
                    self.publisher.heartbeat.remote(self.replica_id, int(self.engine.weights_version)),
                )
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.warning("replica %s heartbeat failed: %s", self.replica_id, e)
            await asyncio.sleep(self.heartbeat_s)

    def stop(self) -> None:
        """Cancel the background tasks and unregister (fire-and-forget; safe from sync code
        such as ``__del__``)."""
        self._closing = True
        for t in self._tasks:
            t.cancel()
        self._tasks = []
        with contextlib.suppress(Exception):
            self.publisher.unregister.remote(self.replica_id)

    async def aclose(self) -> None:
        """Like :meth:`stop`, but waits (bounded) for the tasks to end and for the unregister
        to land. The loops also stop on their own flag, so a cancellation lost inside a
        library call cannot keep them alive."""
        self._closing = True
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        if tasks:
            _, alive = await asyncio.wait(tasks, timeout=self.timeout_s)
            for t in alive:
                logger.error("replica %s: background task %s did not stop within %.0fs",
                             self.replica_id, t.get_name(), self.timeout_s)
        with contextlib.suppress(Exception):
            await self._bounded("publisher.unregister", self.publisher.unregister.remote(self.replica_id))

    def status(self) -> dict[str, Any]:
        return {
            "replica_id": self.replica_id,
            "weights_version": int(self.engine.weights_version),
            "acked": self._acked,
            "known_latest": self._known_latest,
            "registered": self._registered,
            "loading": self.loading,
            "loads": self.loads,
            "last_load_s": self.last_load_s,
            "last_error": self.last_error,
            "stale": self.stale_reason(),
        }
