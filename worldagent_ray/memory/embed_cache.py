"""Goal embeddings by text: a bounded LRU cache in front of an :class:`Embedder`, with the
misses of concurrent callers encoded together in one batch (pure core, no Ray).

The driver retrieves with a task's goal and then writes that task's G episodes with the same
goal, and curricula repeat goals: most encodes are repeats. A MiniLM query encode costs about
20-25 ms on one CPU thread; a cache hit costs microseconds.

Batching: the first caller with a miss becomes the *leader* and encodes every text queued at
that moment in one ``Embedder.encode`` call; callers that miss while it runs queue their texts
and wait, and the leader encodes all of those in its next call, until the queue is empty. A
text already queued or being encoded is not encoded twice.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Sequence

import numpy as np

from ..checks import check_int, list_of


class EmbeddingCache:
    """Bounded LRU of text -> unit vector, filled by batched encodes.

    Args:
        embedder: Anything with ``encode(list[str]) -> np.ndarray`` and ``dim`` (an
            :class:`~worldagent_ray.memory.embedder.Embedder`).
        capacity (`int`, *optional*, defaults to `4096`): Texts kept (about 1.5 KiB each for
            384-dim vectors); the least recently used is dropped first. ``0`` keeps nothing but
            still batches concurrent encodes.
        timeout_s (`float`, *optional*, defaults to `120.0`): Most time a caller waits for an
            encode run by another caller before raising ``TimeoutError``.
    """

    def __init__(self, embedder: Any, capacity: int = 4096, timeout_s: float = 120.0):
        check_int("capacity", capacity, 0)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.embedder = embedder
        self.capacity = capacity
        self.timeout_s = float(timeout_s)
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self._inflight: dict[str, Future] = {}  # queued or being encoded
        self._queue: list[str] = []
        self._leading = False
        self._lock = threading.Lock()
        self._stats = {"hits": 0, "misses": 0, "batches": 0, "encoded": 0}

    @property
    def dim(self) -> int:
        """Dimension of the vectors."""
        return int(self.embedder.dim)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors of ``texts`` (float32, ``(len(texts), dim)``), from the cache where possible.

        Raises:
            TypeError: for a bare string or a non-string item.
            TimeoutError: when another caller's encode of a text does not finish in ``timeout_s``.
        """
        texts = list_of(texts, str, call="encode", arg="texts", plural="strings", one="a str")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        found: dict[str, np.ndarray] = {}
        waiting: dict[str, Future] = {}
        with self._lock:
            for t in dict.fromkeys(texts):
                vec = self._lru.get(t)
                if vec is not None:
                    self._lru.move_to_end(t)
                    self._stats["hits"] += 1
                    found[t] = vec
                    continue
                fut = self._inflight.get(t)
                if fut is None:
                    fut = Future()
                    self._inflight[t] = fut
                    self._queue.append(t)
                    self._stats["misses"] += 1
                else:
                    self._stats["hits"] += 1  # another caller is already encoding it
                waiting[t] = fut
            lead = bool(self._queue) and not self._leading
            if lead:
                self._leading = True
        if lead:
            self._drain()
        for t, fut in waiting.items():
            try:
                found[t] = fut.result(timeout=self.timeout_s)
            except FutureTimeout:
                raise TimeoutError(f"embedding {t[:80]!r} took longer than {self.timeout_s:.0f}s") from None
        return np.stack([found[t] for t in texts]).astype(np.float32, copy=False)

    def _drain(self) -> None:
        """Leader: encode queued texts, batch by batch, until the queue is empty."""
        try:
            while True:
                with self._lock:
                    batch, self._queue = self._queue, []
                    if not batch:
                        self._leading = False
                        return
                try:
                    vecs = np.ascontiguousarray(self.embedder.encode(batch), dtype=np.float32)
                    if vecs.shape[0] != len(batch):
                        raise RuntimeError(f"embedder returned {vecs.shape[0]} vectors for {len(batch)} texts")
                except BaseException as e:
                    with self._lock:
                        for t in batch:
                            self._inflight.pop(t).set_exception(e)
                    continue
                with self._lock:
                    self._stats["batches"] += 1
                    self._stats["encoded"] += len(batch)
                    for t, v in zip(batch, vecs):
                        v.setflags(write=False)  # shared by every caller: nobody may change it
                        if self.capacity:
                            self._lru[t] = v
                            if len(self._lru) > self.capacity:
                                self._lru.popitem(last=False)
                        self._inflight.pop(t).set_result(v)
        except BaseException:
            with self._lock:
                self._leading = False
            raise

    def stats(self) -> dict[str, int]:
        """``hits``, ``misses``, ``batches`` and ``encoded`` (texts sent to the embedder) so far,
        ``size`` (texts cached), ``capacity`` and ``pending`` (texts queued or being encoded)."""
        with self._lock:
            return {**self._stats, "size": len(self._lru), "capacity": self.capacity, "pending": len(self._inflight)}

    def clear(self) -> None:
        """Drop every cached vector (queued encodes still complete)."""
        with self._lock:
            self._lru.clear()

    def __repr__(self) -> str:
        return f"EmbeddingCache({self.embedder!r}, capacity={self.capacity})"
