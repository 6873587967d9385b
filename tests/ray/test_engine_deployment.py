"""The engine as a Serve deployment: concurrent generates share a replica while weight loads
stay atomic; a replica that cannot load published weights refuses to generate, fails its
health check and is replaced; a replica started before its publisher exists catches up.

Real Ray Serve, a real WeightPublisherActor and a real TransformersEngine on tiny-random-llama.
Bad weights (a state dict missing tensors) are the injected fault.
"""

from __future__ import annotations

import time
import uuid

import pytest
import ray
import torch
from ray import serve

from worldagent_ray.config import load_config
from worldagent_ray.engines.base import EngineTimeoutError, StaleWeightsError, WeightSyncError
from worldagent_ray.models import resolve_model
from worldagent_ray.rl.weight_sync import load_base_weights
from worldagent_ray.runtime.engine_deployment import RemoteEngine, engine_app, engine_call_timeout_s
from worldagent_ray.runtime.weight_publisher import create_publisher_actor
from worldagent_ray.schemas import SamplingParams

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

NS = "test-engine-deployment"
PROMPT = "Plan: put the cup in the sink"
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module", autouse=True)
def serve_instance():
    ray.init(num_cpus=2, include_dashboard=False, namespace=NS, log_to_driver=False)
    serve.start(http_options={"location": "NoServer"})
    yield
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    return load_base_weights(resolve_model("tiny-random-llama"))


def _cfg(sync_timeout_s: float):
    return load_config("local-cpu", overrides=[
        "engines.policy.model=tiny-random-llama", "engines.policy.backend=transformers",
        "engines.policy.dtype=float32", "resources.engines.policy.num_cpus=0.5",
        f"learner.sync_timeout_s={sync_timeout_s}",
    ], environ={})


def _deploy(cfg, app: str, publisher: str):
    return serve.run(engine_app(cfg, "policy", publisher, NS), name=app, route_prefix=None)


def _until(pred, timeout_s: float, what: str):
    """Poll ``pred`` until it returns a truthy value (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout_s}s: {what}")


def _one(handle):
    return handle.generate.remote([PROMPT], GREEDY).result(timeout_s=120)[0][0]


def test_engine_call_timeout_is_shorter_than_the_stage_timeout():
    assert engine_call_timeout_s(600) == 480 and engine_call_timeout_s(0.5) == 1.0
    assert RemoteEngine.for_stage(None, "m", 100).timeout_s == 80


def test_remote_engine_timeout_aborts_the_request_in_the_replica():
    """A call that times out is cancelled: its rows, queued behind a long batch, never run."""
    handle = serve.run(engine_app(_cfg(60), "policy"), name="engine-abort", route_prefix=None)
    stats = lambda: handle.info.remote().result(timeout_s=60)["stats"]  # noqa: E731
    before = stats()
    long = handle.generate.remote([PROMPT], SamplingParams(temperature=0.0, max_tokens=1500))
    _until(lambda: stats()["running_rows"] >= 1, 60, "the long request is running")
    remote = RemoteEngine(handle, "tiny-random-llama", timeout_s=1.0)
    with pytest.raises(EngineTimeoutError, match=r"did not answer within 1s; the request was aborted"):
        remote.generate([PROMPT], GREEDY)
    _until(lambda: stats()["pending"] == 0, 60, "the abandoned request left the queue")
    [[c]] = long.result(timeout_s=300)
    assert len(c.token_ids) == 1500  # no early EOS: it ran to the end
    after = stats()
    assert after["requests"] - before["requests"] == 1  # only the long request ever ran
    serve.delete("engine-abort")


def test_concurrent_generates_and_atomic_loads_through_one_replica(base):
    """Requests stream while versions are published; every completion ran wholly on the
    weights it is stamped with. The odd versions zero the final norm (their greedy output is
    token 0 at every step), the even ones restore the base weights."""
    pub_name = f"pub-{uuid.uuid4().hex[:6]}"
    publisher = create_publisher_actor(pub_name, namespace=NS)
    handle = _deploy(_cfg(60), "engine-atomic", pub_name)
    reference = _one(handle)
    assert reference.weights_version == 0 and 0 not in reference.token_ids  # precondition of the check
    silenced = dict(base, **{"model.norm.weight": torch.zeros_like(base["model.norm.weight"])})
    responses = [handle.generate.remote([PROMPT], GREEDY) for _ in range(4)]
    for version in (1, 2, 3):
        ray.get(publisher.publish.remote(version, [ray.put(silenced if version % 2 else base)]), timeout=60)
        responses += [handle.generate.remote([PROMPT], GREEDY) for _ in range(4)]
        assert ray.get(publisher.wait_synced.remote(version, 60), timeout=90)
        responses += [handle.generate.remote([PROMPT], GREEDY) for _ in range(2)]
    comps = [r.result(timeout_s=120)[0][0] for r in responses]
    seen = {c.weights_version for c in comps}
    assert {1, 2, 3} <= seen  # requests sent after each sync ran on that version
    for c in comps:
        if c.weights_version % 2:
            assert c.token_ids == [0] * GREEDY.max_tokens, (c.weights_version, c.token_ids)
        else:
            assert c.token_ids == reference.token_ids, (c.weights_version, c.token_ids)
    info = handle.info.remote().result(timeout_s=60)
    assert info["weights_version"] == 3 and info["stale"] is None
    assert info["stats"]["requests"] >= len(comps)
    serve.delete("engine-atomic")


def test_stale_replica_refuses_fails_health_and_is_replaced_then_recovers(base):
    pub_name = f"pub-{uuid.uuid4().hex[:6]}"
    publisher = create_publisher_actor(pub_name, namespace=NS)
    handle = _deploy(_cfg(3.0), "engine-stale", pub_name)
    first = handle.info.remote().result(timeout_s=60)["replica"]
    broken = {k: v for k, v in list(base.items())[1:]}  # missing a tensor: every load is refused
    ray.get(publisher.publish.remote(1, [ray.put(broken)]), timeout=60)
    with pytest.raises(WeightSyncError, match=r"not loaded within 1.0s by 1 replica\(s\): policy-"):
        ray.get(publisher.wait_synced.remote(1, 1.0), timeout=60)

    def refused():
        try:
            _one(handle)
            return None
        except StaleWeightsError as e:
            return str(e)
        except Exception as e:  # a replica being replaced: try again
            return None if "Stale" not in type(e).__name__ + str(e) else str(e)

    message = _until(refused, 90, "the stale replica refuses to generate")
    assert "serves weights v0 but v1 was published" in message and "sync timeout 3s" in message
    assert "missing" in message  # the load's own error is part of the report
    # Serve's health check fails and the replica is replaced by a fresh one
    _until(lambda: _replica_id(handle) not in (None, first), 120, "Serve replaced the stale replica")
    # good weights: the (new) replica loads them and serves again
    ray.get(publisher.publish.remote(2, [ray.put(base)]), timeout=60)
    _until(lambda: _try_version(handle) == 2, 120, "the replica serves v2")
    serve.delete("engine-stale")


def _replica_id(handle):
    try:
        return handle.info.remote().result(timeout_s=30)["replica"]
    except Exception:
        return None


def _try_version(handle):
    try:
        return _one(handle).weights_version
    except Exception:
        return None


def test_replica_started_before_its_publisher_catches_up(base):
    pub_name = f"late-{uuid.uuid4().hex[:6]}"
    handle = _deploy(_cfg(20), "engine-late", pub_name)  # the publisher does not exist yet
    assert _one(handle).weights_version == 0
    publisher = create_publisher_actor(pub_name, namespace=NS)
    ray.get(publisher.publish.remote(1, [ray.put(base)]), timeout=60)
    _until(lambda: ray.get(publisher.live_replicas.remote(), timeout=30), 60, "the replica registers")
    assert set(ray.get(publisher.wait_synced.remote(1, 60), timeout=90).values()) == {1}
    assert _one(handle).weights_version == 1
    serve.delete("engine-late")
