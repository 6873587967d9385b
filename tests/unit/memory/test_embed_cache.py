"""EmbeddingCache: hits and the LRU bound, correctness against the real MiniLM, batched misses."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from worldagent_ray.memory import Embedder, EmbeddingCache

WAIT_S = 60.0  # bound of every wait in this module (they end far sooner unless something hangs)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder("minilm", num_threads=1)


class GatedEmbedder:
    """Delay injection: the first ``encode`` waits for ``gate``; every call's texts are recorded."""

    def __init__(self, inner, fail: BaseException | None = None):
        self.inner, self.fail = inner, fail
        self.calls: list[list[str]] = []
        self.entered, self.gate = threading.Event(), threading.Event()

    @property
    def dim(self) -> int:
        return self.inner.dim

    def encode(self, texts):
        self.calls.append(list(texts))
        if len(self.calls) == 1:
            self.entered.set()
            assert self.gate.wait(WAIT_S)
        if self.fail is not None:
            raise self.fail
        return self.inner.encode(texts)


def _wait_for(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def test_cached_vectors_equal_the_embedder_and_repeats_are_hits(embedder):
    cache = EmbeddingCache(embedder, capacity=16)
    texts = ["open the fridge", "put the apple in the bowl", "open the fridge"]
    got = cache.encode(texts)
    want = embedder.encode(texts)
    assert got.shape == (3, 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert cache.stats() == {"hits": 0, "misses": 2, "batches": 1, "encoded": 2, "size": 2, "capacity": 16,
                             "pending": 0}
    again = cache.encode(["put the apple in the bowl"])
    np.testing.assert_array_equal(again[0], got[1])
    assert cache.stats()["hits"] == 1 and cache.stats()["encoded"] == 2  # no second encode
    again[0, 0] = 99.0  # callers get copies: the cached vector is unchanged
    assert cache.encode(["put the apple in the bowl"])[0, 0] == got[1, 0]
    assert cache.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match="single str"):
        cache.encode("open the fridge")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        cache.encode(["ok", 3])


def test_lru_bound_drops_the_least_recently_used(embedder):
    cache = EmbeddingCache(embedder, capacity=2)
    cache.encode(["a cup", "a bowl"])
    cache.encode(["a cup"])  # touch: "a bowl" is now the least recently used
    cache.encode(["a pan"])
    assert cache.stats()["size"] == 2
    encoded = cache.stats()["encoded"]
    cache.encode(["a cup", "a pan"])  # both kept
    assert cache.stats()["encoded"] == encoded
    cache.encode(["a bowl"])  # dropped: encoded again
    assert cache.stats()["encoded"] == encoded + 1
    assert EmbeddingCache(embedder, capacity=0).encode(["a cup"]).shape == (1, 384)
    with pytest.raises(ValueError, match="capacity"):
        EmbeddingCache(embedder, capacity=-1)


def test_concurrent_misses_are_encoded_in_one_batch(embedder):
    gated = GatedEmbedder(embedder)
    cache = EmbeddingCache(gated, capacity=64)
    results: dict[str, np.ndarray] = {}

    def call(name, texts):
        results[name] = cache.encode(texts)

    leader = threading.Thread(target=call, args=("a", ["wash the cup"]))
    leader.start()
    assert gated.entered.wait(WAIT_S)  # the leader is inside the embedder, holding it
    followers = [
        threading.Thread(target=call, args=("b", ["dry the cup"])),
        threading.Thread(target=call, args=("c", ["fill the kettle", "wash the cup"])),
        threading.Thread(target=call, args=("d", ["dry the cup", "boil water"])),
    ]
    for t in followers:
        t.start()
    # "wash the cup" is in flight; the three other texts queue behind it, each once.
    _wait_for(lambda: cache.stats()["pending"] == 4, "the followers to queue")
    gated.gate.set()
    for t in [leader, *followers]:
        t.join(WAIT_S)
        assert not t.is_alive()
    assert gated.calls[0] == ["wash the cup"]
    assert len(gated.calls) == 2 and sorted(gated.calls[1]) == ["boil water", "dry the cup", "fill the kettle"]
    want = embedder.encode(["wash the cup", "dry the cup", "fill the kettle", "boil water"])
    np.testing.assert_allclose(results["c"], want[[2, 0]], atol=1e-6)
    np.testing.assert_allclose(results["d"], want[[1, 3]], atol=1e-6)
    assert cache.stats()["batches"] == 2 and cache.stats()["pending"] == 0


def test_an_encode_error_reaches_every_waiter_and_the_cache_recovers(embedder):
    gated = GatedEmbedder(embedder, fail=RuntimeError("encoder crashed"))
    cache = EmbeddingCache(gated, capacity=8)
    errors: list[BaseException] = []

    def call(texts):
        try:
            cache.encode(texts)
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    leader = threading.Thread(target=call, args=(["slice bread"],))
    leader.start()
    assert gated.entered.wait(WAIT_S)
    follower = threading.Thread(target=call, args=(["slice bread"],))  # waits on the same text
    follower.start()
    _wait_for(lambda: cache.stats()["hits"] == 1, "the follower to wait on the in-flight text")
    gated.gate.set()
    for t in (leader, follower):
        t.join(WAIT_S)
    assert [str(e) for e in errors] == ["encoder crashed", "encoder crashed"]
    gated.fail = None
    assert cache.encode(["slice bread"]).shape == (1, 384)  # not cached as failed; encoded anew
    assert cache.stats()["pending"] == 0


def test_a_waiter_gives_up_after_its_timeout(embedder):
    gated = GatedEmbedder(embedder)
    cache = EmbeddingCache(gated, capacity=8, timeout_s=0.05)
    leader = threading.Thread(target=cache.encode, args=(["peel the onion"],))
    leader.start()
    assert gated.entered.wait(WAIT_S)
    try:
        # The leader cannot finish until the gate opens, so this wait must time out.
        with pytest.raises(TimeoutError, match="peel the onion"):
            cache.encode(["peel the onion"])
    finally:
        gated.gate.set()
        leader.join(WAIT_S)
    assert cache.encode(["peel the onion"]).shape == (1, 384)
