"""Weight sync: the WeightPublisher actor, the engine-side WeightSubscriber (pause -> load ->
resume, timeouts, LoRA merge, liveness, long polls, retries after a failed first load,
staleness reports), the sender interface the learner calls (object store and collective, with
the object-store fallback for a replica outside the broadcast group), and the collective
broadcast path on gloo.

Real Ray (local), a real TransformersEngine on tiny-random-llama. The only test doubles are
engine wrappers that inject a delay or a non-atomic load into ``load_weights``, and payloads
missing a tensor (refused by the engine).

``test_wait_synced_times_out_naming_the_lagging_replica`` once hung for 300 s in the full
suite: ``asyncio.wait_for`` on Python 3.11 swallows a cancellation that lands as its inner
call completes, so the subscriber's cancelled heartbeat loop kept running and ``aclose()``
awaited it forever (see ``worldagent_ray/engines/aio.py``).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest
import ray
import torch

from worldagent_ray.config import EngineConfig, LearnerConfig
from worldagent_ray.engines.base import WeightSyncError
from worldagent_ray.models import resolve_model
from worldagent_ray.rl.weight_sync import AsyncRWLock, WeightSubscriber, load_base_weights, merge_lora
from worldagent_ray.runtime.weight_publisher import NcclBroadcastSync, WeightPublisherActor, create_publisher_actor
from worldagent_ray.schemas import SamplingParams

from tests.factories import running_engine

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

PROMPT = "Plan: put the cup in the sink"
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, seed=0)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 OpenMP threads spin against each other on a shared 2-core box
    ray.init(num_cpus=2, include_dashboard=False, namespace="test-weight-sync", log_to_driver=False)
    yield
    ray.shutdown()
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_path() -> str:
    return resolve_model("tiny-random-llama")


@pytest.fixture(scope="module")
def engine():
    with running_engine(model="tiny-random-llama", backend="transformers", dtype="float32") as eng:
        yield eng


@pytest.fixture
def publisher():
    handle = create_publisher_actor(f"pub-{uuid.uuid4().hex[:8]}")
    ray.get(handle.latest.remote(), timeout=60)  # started: later calls are bounded by short timeouts
    return handle


def perturbed(engine, seed: int, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """A full state dict for ``engine``'s model: its current weights plus seeded noise."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: v.detach().clone() + scale * torch.randn(v.shape, generator=g)
        for k, v in engine._model.state_dict().items()
    }


class SlowLoadEngine:
    """Test double (fault injection): delays every ``load_weights`` by ``delay_s``."""

    def __init__(self, inner, delay_s: float):
        self.inner, self.delay_s = inner, delay_s
        self.finished = threading.Event()

    @property
    def weights_version(self) -> int:
        return self.inner.weights_version

    def generate(self, *a, **kw):
        return self.inner.generate(*a, **kw)

    def load_weights(self, tensors, version):
        time.sleep(self.delay_s)
        try:
            return self.inner.load_weights(tensors, version)
        finally:
            self.finished.set()


class HalfwayLoadEngine(SlowLoadEngine):
    """Test double (fault injection): a non-atomic load. It writes the first half of the new
    tensors straight into the model, pauses, then completes through the real atomic load. Any
    generate that runs during the pause sees a mix of old and new weights."""

    def __init__(self, inner, delay_s: float):
        super().__init__(inner, delay_s)
        self.halfway = threading.Event()

    def load_weights(self, tensors, version):
        target = self.inner._model.state_dict()
        with torch.no_grad():
            for name in sorted(tensors)[: len(tensors) // 2]:
                target[name].copy_(tensors[name])
        self.halfway.set()
        return super().load_weights(tensors, version)


async def call(ref, timeout_s: float = 60.0):
    """Await an actor call from the test's event loop, bounded (a test must fail, not hang)."""
    return await asyncio.wait_for(asyncio.to_thread(ray.get, ref, timeout=timeout_s), timeout_s + 5)


async def _generate(engine, sub: WeightSubscriber | None = None):
    if sub is None:
        [[c]] = await asyncio.to_thread(engine.generate, [PROMPT], GREEDY)
        return c
    async with sub.reading():
        [[c]] = await asyncio.to_thread(engine.generate, [PROMPT], GREEDY)
        return c


# --------------------------------------------------------------------------- publisher


def test_publisher_versions_only_increase(publisher):
    assert ray.get(publisher.latest.remote()) == (0, [])
    ref = ray.put({"w": torch.ones(2)})
    assert ray.get(publisher.publish.remote(1, [ref])) == 1
    for bad in (1, 0):
        with pytest.raises(ValueError, match=f"got {bad}, latest published is 1"):
            ray.get(publisher.publish.remote(bad, [ref]))
    assert ray.get(publisher.publish.remote(5, [ray.put({"w": torch.zeros(2)})])) == 5
    version, [latest] = ray.get(publisher.latest.remote())
    assert version == 5 and torch.equal(ray.get(latest)["w"], torch.zeros(2))
    with pytest.raises(ValueError, match="one-element list"):
        ray.get(publisher.publish.remote(6, []))


def test_wait_synced_ignores_unregistered_and_dead_replicas():
    pub = ray.remote(WeightPublisherActor).options(num_cpus=0, name=f"pub-live-{uuid.uuid4().hex[:6]}").remote(liveness_timeout_s=0.5)
    ray.get(pub.register.remote("gone", 0))
    ray.get(pub.register.remote("silent", 0))
    ray.get(pub.publish.remote(1, [ray.put({"w": torch.ones(1)})]))
    ray.get(pub.unregister.remote("gone"))
    t0 = time.monotonic()
    assert ray.get(pub.wait_synced.remote(1, 5.0)) == {}  # "silent" stopped heartbeating -> presumed gone
    assert time.monotonic() - t0 < 3.0
    status = ray.get(pub.status.remote())
    assert "gone" not in status["replicas"] and status["replicas"]["silent"]["live"] is False


# --------------------------------------------------------------------------- subscriber


def test_new_replica_loads_latest_and_polling_catches_up(engine, publisher):
    async def scenario():
        v1 = engine.weights_version + 1
        w1 = perturbed(engine, seed=1, scale=0.05)
        ray.get(publisher.publish.remote(v1, [ray.put(w1)]))
        sub = WeightSubscriber(engine, publisher, "replica-a", timeout_s=30)
        assert await sub.register() is True  # a new replica starts on the latest version
        assert engine.weights_version == v1
        assert torch.equal(engine._model.state_dict()["model.norm.weight"], w1["model.norm.weight"])
        assert await sub.maybe_update() is False  # nothing newer
        sub.start(poll_s=0.1)
        try:
            v2 = v1 + 1
            ray.get(publisher.publish.remote(v2, [ray.put(perturbed(engine, seed=2, scale=0.05))]))
            acked = await call(publisher.wait_synced.remote(v2, 20.0))  # no explicit call: the poll loop loads it
            assert acked == {"replica-a": v2} and engine.weights_version == v2
            c = await _generate(engine, sub)
            assert c.weights_version == v2
        finally:
            await sub.aclose()
        assert "replica-a" not in ray.get(publisher.status.remote())["replicas"]

    asyncio.run(scenario())


def test_wait_synced_times_out_naming_the_lagging_replica(engine, publisher):
    async def scenario():
        slow = SlowLoadEngine(engine, delay_s=3.0)
        sub = WeightSubscriber(slow, publisher, "replica-slow", timeout_s=30, heartbeat_s=0.2)
        await sub.register()
        sub.start(poll_s=0.1)
        try:
            v = engine.weights_version + 1
            ray.get(publisher.publish.remote(v, [ray.put(perturbed(engine, seed=3, scale=0.05))]))
            with pytest.raises(WeightSyncError, match=rf"weights v{v} not loaded within 0.5s by 1 replica\(s\): replica-slow"):
                await call(publisher.wait_synced.remote(v, 0.5))
            assert await call(publisher.wait_synced.remote(v, 20.0)) == {"replica-slow": v}  # it does catch up
        finally:
            await sub.aclose()

    asyncio.run(scenario())


def test_subscriber_load_timeout_raises_and_keeps_generation_paused(engine, publisher):
    async def scenario():
        slow = SlowLoadEngine(engine, delay_s=4.0)
        sub = WeightSubscriber(slow, publisher, "replica-timeout", timeout_s=1.0)
        await sub.register()
        v_old = engine.weights_version
        v = v_old + 1
        ray.get(publisher.publish.remote(v, [ray.put(perturbed(engine, seed=4, scale=0.05))]))
        with pytest.raises(WeightSyncError, match=rf"loading weights v{v} timed out after 1.0s"):
            await sub.maybe_update()
        assert sub.loading and not slow.finished.is_set()
        c = await _generate(engine, sub)  # waits for the load that is still running
        assert slow.finished.is_set() and c.weights_version == v and not sub.loading
        status = await call(publisher.status.remote())
        assert status["replicas"]["replica-timeout"]["acked"] == v_old  # never acked the timed-out load
        assert await sub.maybe_update() is False  # the engine has it now: just acks
        assert (await call(publisher.status.remote()))["replicas"]["replica-timeout"]["acked"] == v
        await sub.aclose()

    asyncio.run(scenario())


def test_generate_concurrent_with_load_sees_old_or_new_never_a_mix(engine, publisher):
    async def scenario():
        v_old = engine.weights_version
        old_tokens = (await _generate(engine)).token_ids
        v_new = v_old + 1
        new_weights = perturbed(engine, seed=5)
        ray.get(publisher.publish.remote(v_new, [ray.put(new_weights)]))
        halfway = HalfwayLoadEngine(engine, delay_s=1.0)
        sub = WeightSubscriber(halfway, publisher, "replica-mix", timeout_s=30)

        before = [asyncio.ensure_future(_generate(engine, sub)) for _ in range(2)]
        await asyncio.sleep(0)  # these readers hold the lock first
        load = asyncio.ensure_future(sub.maybe_update())
        assert await asyncio.to_thread(halfway.halfway.wait, 20)
        during = [asyncio.ensure_future(_generate(engine, sub)) for _ in range(3)]
        unguarded = await _generate(engine)  # control: bypasses the lock, runs on the half-loaded model
        assert await load is True
        guarded = await asyncio.gather(*before, *during)
        new_tokens = (await _generate(engine)).token_ids
        assert new_tokens != old_tokens

        for c in guarded:
            expected = {v_old: old_tokens, v_new: new_tokens}[c.weights_version]
            assert c.token_ids == expected, (c.weights_version, c.token_ids)
        assert [c.weights_version for c in guarded] == [v_old, v_old, v_new, v_new, v_new]
        # the control shows the lock is what prevents the mix: unguarded, the stamp says
        # "old" but the tokens come from neither the old nor the new weights
        assert unguarded.weights_version == v_old
        assert unguarded.token_ids not in (old_tokens, new_tokens)
        await sub.aclose()

    asyncio.run(scenario())


def test_external_lock_mode_serialises_generate_and_load(engine, publisher):
    """The Serve replica may pass its own asyncio.Lock held around generate."""

    async def scenario():
        lock = asyncio.Lock()
        slow = SlowLoadEngine(engine, delay_s=0.5)
        sub = WeightSubscriber(slow, publisher, "replica-lock", timeout_s=30, lock=lock)
        await sub.register()
        v = engine.weights_version + 1
        ray.get(publisher.publish.remote(v, [ray.put(perturbed(engine, seed=6, scale=0.05))]))
        load = asyncio.ensure_future(sub.maybe_update())
        while not sub.loading:
            await asyncio.sleep(0.01)
        assert lock.locked()
        c = await _generate(engine, sub)  # sub.reading() is the external lock
        assert await load is True and c.weights_version == v and not lock.locked()
        await sub.aclose()

    asyncio.run(scenario())


def test_lora_payload_is_merged_by_the_subscriber(engine, publisher, model_path):
    from worldagent_ray.rl.learner import LearnerCore
    from worldagent_ray.schemas import ScoredGroup

    core = LearnerCore(LearnerConfig(lr=5e-2, lora=True, lora_rank=4, lora_alpha=8), model_path)
    for s in range(2):
        g = torch.Generator().manual_seed(s)
        comps = [torch.randint(100, 5000, (5,), generator=g).tolist() for _ in range(4)]
        core.step([ScoredGroup(group_id=f"g{s}", task_id="t", policy_version=s, prompt_token_ids=[11, 12, 13],
                               completion_token_ids=comps, rollout_logprobs=[[-10.0] * 5] * 4,
                               rewards=[0.0, 0.3, 0.6, 1.0], episode_ids=list("abcd"))])
    payload = core.export_weights()
    base = load_base_weights(model_path)
    expected = merge_lora(base, payload)

    async def scenario():
        v = engine.weights_version + 1
        ray.get(publisher.publish.remote(v, [ray.put(payload)]))
        no_base = WeightSubscriber(engine, publisher, "replica-nobase", timeout_s=30)
        with pytest.raises(WeightSyncError, match="LoRA payload but has no base_weights"):
            await no_base.register()
        assert engine.weights_version == v - 1  # refused: keeps serving its previous version
        sub = WeightSubscriber(engine, publisher, "replica-lora", timeout_s=30, base_weights=lambda: base)
        assert await sub.register() is True
        assert engine.weights_version == v
        state = engine._model.state_dict()
        for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"):
            assert torch.equal(state[k], expected[k]) and not torch.equal(state[k], base[k])
        await sub.aclose()
        await no_base.aclose()

    asyncio.run(scenario())


# --------------------------------------------------------------------------- lock


def test_rw_lock_prefers_a_waiting_writer():
    async def scenario():
        lock, order = AsyncRWLock(), []

        async def reader(name, hold):
            async with lock.read():
                order.append(f"{name}+")
                await asyncio.sleep(hold)
                order.append(f"{name}-")

        async def writer():
            await lock.acquire_write()
            order.append("W")
            await lock.release_write()

        r1 = asyncio.ensure_future(reader("r1", 0.1))
        await asyncio.sleep(0.01)
        w = asyncio.ensure_future(writer())
        await asyncio.sleep(0.01)
        r2 = asyncio.ensure_future(reader("r2", 0.0))  # arrives after the writer: must wait for it
        await asyncio.gather(r1, w, r2)
        return order

    assert asyncio.run(scenario()) == ["r1+", "r1-", "W", "r2+", "r2-"]


# --------------------------------------------------------------------------- collective


@ray.remote(num_cpus=0)
class _CollectiveRank:
    def __init__(self, group: str, world: int, rank: int):
        self.sync = NcclBroadcastSync(group, world, rank, backend="gloo")

    def setup(self) -> bool:
        self.sync.setup()
        return True

    def send(self, model_path: str):
        tensors = load_base_weights(model_path)
        manifest = self.sync.send(tensors)
        return manifest, {k: float(v.double().sum()) for k, v in tensors.items()}

    def receive(self, manifest):
        got = self.sync.receive(manifest)
        return {k: (tuple(v.shape), str(v.dtype), float(v.double().sum())) for k, v in got.items()}

    def close(self):
        self.sync.destroy()


def test_collective_broadcast_path_on_gloo(model_path):
    """NcclBroadcastSync moves a state dict tensor by tensor; on CPU it runs with gloo."""
    group = f"wsync-{uuid.uuid4().hex[:6]}"
    sender, r1, r2 = (_CollectiveRank.remote(group, 3, i) for i in range(3))
    assert ray.get([a.setup.remote() for a in (sender, r1, r2)], timeout=120) == [True] * 3
    # the receivers need the manifest first; it is deterministic (sorted names)
    from worldagent_ray.runtime.weight_publisher import tensor_manifest

    manifest = tensor_manifest(load_base_weights(model_path))
    recv = [r.receive.remote(manifest) for r in (r1, r2)]
    sent_manifest, sums = ray.get(sender.send.remote(model_path), timeout=120)
    assert sent_manifest == manifest
    for got in ray.get(recv, timeout=120):
        assert set(got) == set(sums)
        for spec in manifest:
            shape, dtype, total = got[spec.name]
            assert shape == spec.shape and dtype == f"torch.{spec.dtype}" and total == sums[spec.name]
    ray.get([a.close.remote() for a in (sender, r1, r2)])


@ray.remote(num_cpus=0)
class _DdpRank:
    """A process that already has a torch.distributed default group, as the learner's rank 0
    has inside a Ray Train DDP worker group (world size 2 there, 1 here)."""

    def __init__(self):
        import torch.distributed as dist

        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    def broadcast(self, group: str, world: int, rank: int, seed: int):
        sync = NcclBroadcastSync(group, world, rank, backend="gloo", timeout_ms=60_000)
        try:
            sync.setup()
            if rank == 0:
                g = torch.Generator().manual_seed(seed)
                sent = {"a.weight": torch.randn(3, 4, generator=g), "b.bias": torch.arange(5, dtype=torch.int64)}
                sync.send(sent)
                return {k: float(v.double().sum()) for k, v in sent.items()}
            from worldagent_ray.runtime.weight_publisher import tensor_manifest

            manifest = tensor_manifest({"a.weight": torch.empty(3, 4), "b.bias": torch.empty(5, dtype=torch.int64)})
            return {k: float(v.double().sum()) for k, v in sync.receive(manifest).items()}
        finally:
            sync.destroy()


def test_collective_gloo_works_beside_a_default_process_group():
    """Regression (cluster-sim e2e): the learner's rank 0 lives in a DDP worker group, so the
    broadcast group must not be carved out of the default process group (Ray 2.60's gloo
    collective does that and fails: "the new group's world size should be less or equal to
    the world size set by init_process_group"). Every process here has a default group of
    its own, and two versions in a row (two fresh groups) both arrive."""
    ranks = [_DdpRank.remote() for _ in range(3)]
    for version in (1, 2):
        group = f"wsync-ddp-{uuid.uuid4().hex[:6]}-v{version}"
        got = ray.get([a.broadcast.remote(group, 3, i, version) for i, a in enumerate(ranks)], timeout=120)
        assert got[1] == got[2] == got[0], got
    g = torch.Generator().manual_seed(2)
    assert got[0]["a.weight"] == float(torch.randn(3, 4, generator=g).double().sum())
    for a in ranks:
        ray.kill(a)


def test_collective_sync_rejects_bad_roles():
    with pytest.raises(ValueError, match="world_size must be >= 2"):
        NcclBroadcastSync("g", 1, 0, backend="gloo")
    with pytest.raises(ValueError, match="backend must be"):
        NcclBroadcastSync("g", 2, 0, backend="mpi")
    s = NcclBroadcastSync("g", 2, 1, backend="gloo")
    with pytest.raises(WeightSyncError, match="not set up"):
        s.receive([])


# --------------------------------------------------------------------------- staleness and retries


def test_failed_first_load_keeps_retrying_and_reports_staleness(engine, publisher, model_path):
    """A replica whose first load fails still starts: its loop retries with backoff, the
    publisher sees the version it really serves (heartbeats), the replica reports itself stale
    after ``stale_after_s``, and it recovers when good weights are published."""

    async def scenario():
        v_old = engine.weights_version
        broken = {k: v for k, v in list(load_base_weights(model_path).items())[1:]}  # refused by the engine
        ray.get(publisher.publish.remote(v_old + 1, [ray.put(broken)]))
        sub = WeightSubscriber(engine, publisher, "replica-retry", timeout_s=30, heartbeat_s=0.2,
                               stale_after_s=1.0, retry_max_s=0.5)
        with pytest.raises(WeightSyncError, match="missing"):
            await sub.register()
        sub.start(poll_s=0.5)
        try:
            assert sub.stale_reason() is None  # not yet past the limit
            reason = None
            for _ in range(300):  # bounded poll of a condition, not a timing margin
                reason = sub.stale_reason()
                if reason:
                    break
                await asyncio.sleep(0.05)
            assert reason and f"serves weights v{v_old} but v{v_old + 1} was published" in reason
            assert "missing" in reason and sub.status()["last_error"]
            status = await call(publisher.status.remote())
            assert status["replicas"]["replica-retry"]["acked"] == v_old
            assert status["replicas"]["replica-retry"]["behind"] == 1
            good = perturbed(engine, seed=9, scale=0.05)
            ray.get(publisher.publish.remote(v_old + 2, [ray.put(good)]))
            acked = await call(publisher.wait_synced.remote(v_old + 2, 30.0))
            assert acked == {"replica-retry": v_old + 2} and sub.stale_reason() is None
        finally:
            await sub.aclose()

    asyncio.run(scenario())


def test_long_poll_wakes_on_publish(publisher):
    """``wait_newer`` returns as soon as a newer version is published (it does not sleep out
    its timeout), and doubles as the replica's heartbeat."""

    async def scenario():
        ray.get(publisher.register.remote("replica-lp", 0))
        waiting = asyncio.ensure_future(call(publisher.wait_newer.remote("replica-lp", 0, 60.0)))
        await asyncio.sleep(0)
        ray.get(publisher.publish.remote(1, [ray.put({"w": torch.ones(1)})]))
        ann = await asyncio.wait_for(waiting, 30)  # far below the 60 s poll window
        assert ann["version"] == 1 and len(ann["refs"]) == 1 and ann["collective"] is None
        ann = await call(publisher.wait_newer.remote("replica-lp", 1, 0.2))  # nothing newer: times out
        assert ann["version"] == 1

    asyncio.run(scenario())


# --------------------------------------------------------------------------- the sender interface


@ray.remote(num_cpus=0)
class _Replica:
    """An engine replica outside Serve: a TransformersEngine plus its subscriber."""

    def __init__(self, replica_id: str, publisher_name: str, collective: bool):
        from worldagent_ray.engines.hf import TransformersEngine
        from worldagent_ray.runtime.weight_publisher import collective_fetcher

        self.engine = TransformersEngine(EngineConfig(model="tiny-random-llama", backend="transformers",
                                                      dtype="float32"))
        pub = ray.get_actor(publisher_name)
        self.sub = WeightSubscriber(self.engine, pub, replica_id, timeout_s=60,
                                    fetch=collective_fetcher(replica_id) if collective else None)

    async def start(self) -> bool:
        await self.sub.register()
        self.sub.start(poll_s=1.0)
        return True

    async def state(self) -> tuple[int, float]:
        w = self.engine._model.state_dict()["model.norm.weight"]
        return self.engine.weights_version, float(w.double().sum())

    async def close(self) -> None:
        await self.sub.aclose()


@ray.remote(num_cpus=0)
class _Learner:
    """The learner's rank 0: only the sender interface."""

    def __init__(self, publisher_name: str, method: str):
        from worldagent_ray.runtime.weight_publisher import make_weight_sender

        self.sender = make_weight_sender(LearnerConfig(sync_method=method, backend="gloo", sync_timeout_s=60),
                                         ray.get_actor(publisher_name))

    def push(self, version: int, model_path: str, bump: float) -> tuple[dict, float]:
        tensors = load_base_weights(model_path)
        tensors["model.norm.weight"] = tensors["model.norm.weight"] + bump
        info = self.sender.publish(version, tensors)
        synced = self.sender.wait_synced(version, 60)
        return {"info": info, "synced": synced}, float(tensors["model.norm.weight"].double().sum())


@pytest.mark.parametrize("method", ["collective", "object_store"])
def test_sender_interface_reaches_every_replica(method, model_path):
    """``make_weight_sender(cfg.learner, publisher)`` for both ``sync_method``\\ s: after
    ``publish`` + ``wait_synced`` every replica serves the version with exactly the sent
    weights. With ``collective`` the tensors are broadcast (gloo) to the replicas that were
    live at publish time; a replica started later loads the object-store fallback copy."""
    name = f"pub-{method}-{uuid.uuid4().hex[:6]}"
    publisher = create_publisher_actor(name)  # keep the handle: the actor lives while it is referenced
    ray.get(publisher.latest.remote(), timeout=60)
    collective = method == "collective"
    replicas = [_Replica.remote(f"{method}-r{i}", name, collective) for i in range(2)]
    learner = _Learner.remote(name, method)
    try:
        assert ray.get([r.start.remote() for r in replicas], timeout=120) == [True, True]
        result, expected = ray.get(learner.push.remote(1, model_path, 0.25), timeout=180)
        assert result["synced"] == {f"{method}-r0": 1, f"{method}-r1": 1}
        if collective:
            assert result["info"]["broadcast_s"] > 0
        for version, total in ray.get([r.state.remote() for r in replicas], timeout=60):
            assert version == 1 and total == pytest.approx(expected, abs=1e-6)
        late = _Replica.remote(f"{method}-late", name, collective)  # not in v1's group
        replicas.append(late)
        assert ray.get(late.start.remote(), timeout=120)
        version, total = ray.get(late.state.remote(), timeout=60)
        assert version == 1 and total == pytest.approx(expected, abs=1e-6)
    finally:
        ray.get([r.close.remote() for r in replicas], timeout=60)
