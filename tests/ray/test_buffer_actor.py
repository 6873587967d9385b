"""The rollout buffer actor (:class:`BufferActor`) on a local Ray cluster."""

from __future__ import annotations

import gc
import time

import pytest

from worldagent_ray.config import LearnerConfig
from worldagent_ray.rl.buffer import BufferEntry, meta_of
from worldagent_ray.schemas import ScoredGroup


def _group(gid: str, version: int = 0, rewards=(0.0, 1.0), task: str = "t") -> ScoredGroup:
    n = len(rewards)
    return ScoredGroup(
        group_id=gid,
        task_id=task,
        policy_version=version,
        prompt_token_ids=[1, 2, 3],
        completion_token_ids=[[10 + i, 20 + i] for i in range(n)],
        rollout_logprobs=[[-0.5, -0.25] for _ in range(n)],
        rewards=list(rewards),
        episode_ids=[f"{gid}-ep{i}" for i in range(n)],
    )


def _entry(gid: str, version: int = 0, rewards=(0.0, 1.0)) -> BufferEntry:
    return BufferEntry.from_group(_group(gid, version, rewards), ref=f"payload-{gid}")


# --------------------------------------------------------------------------- Ray actor


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _actor(ray, **kw):
    from worldagent_ray.runtime.buffer_actor import BufferActor

    args = dict(max_groups=2, max_staleness=1, stale_policy="drop", drop_zero_variance=True, put_timeout_s=5.0)
    args.update(kw)
    return ray.remote(BufferActor).options(num_cpus=0).remote(**args)


def _put(ray, actor, group: ScoredGroup, **kw):
    return actor.put.remote(meta_of(group), [ray.put(group)], **kw)


@pytest.mark.ray
def test_actor_holds_refs_and_consumer_fetches_data(ray_local):
    ray = ray_local
    actor = _actor(ray, max_groups=4)
    groups = [_group(f"g{i}", version=0, rewards=(0.0, 0.2 * (i + 1))) for i in range(3)]
    for g in groups:
        ref = ray.put(g)
        assert ray.get(actor.put.remote(meta_of(g), [ref])) is True
        del ref  # the buffer's borrowed ref keeps the object alive
    gc.collect()
    batch = ray.get(actor.get_batch.remote(3, 0, 5.0))
    assert [b["group_id"] for b in batch] == ["g0", "g1", "g2"]
    assert all(isinstance(b["ref"], ray.ObjectRef) for b in batch)
    fetched = ray.get([b["ref"] for b in batch])
    assert fetched == groups
    assert batch[1]["reward_mean"] == pytest.approx(0.2) and batch[1]["staleness"] == 0


@pytest.mark.ray
def test_actor_rejects_duplicates_consumed_and_zero_variance(ray_local):
    ray = ray_local
    actor = _actor(ray, max_groups=4)
    assert ray.get(_put(ray, actor, _group("a"))) is True
    assert ray.get(_put(ray, actor, _group("a"))) is False
    assert ray.get(_put(ray, actor, _group("flat", rewards=(1.0, 1.0)))) is False
    ray.get(actor.get_batch.remote(1, 0, 1.0))
    assert ray.get(_put(ray, actor, _group("a"))) is False
    dropped = ray.get(actor.stats.remote())["dropped"]
    assert (dropped["duplicate"], dropped["zero_variance"], dropped["consumed"]) == (1, 1, 1)
    with pytest.raises(TypeError, match="one-element list"):
        ray.get(actor.put.remote(meta_of(_group("b")), ray.put(_group("b"))))


@pytest.mark.ray
def test_actor_back_pressure_put_blocks_until_get_frees_space(ray_local):
    ray = ray_local
    actor = _actor(ray, max_groups=2)
    # one at a time: an async actor does not promise to run concurrent calls in submission order
    assert ray.get(_put(ray, actor, _group("a"))) is True
    assert ray.get(_put(ray, actor, _group("b"))) is True
    blocked = _put(ray, actor, _group("c"), timeout_s=30.0)
    ready, _ = ray.wait([blocked], timeout=1.0)
    assert ready == []  # waiting for space
    assert ray.get(actor.size.remote()) == 2
    batch = ray.get(actor.get_batch.remote(1, 0, 5.0))
    assert [b["group_id"] for b in batch] == ["a"]
    assert ray.get(blocked, timeout=10) is True
    assert [b["group_id"] for b in ray.get(actor.get_batch.remote(2, 0, 5.0))] == ["b", "c"]


@pytest.mark.ray
def test_actor_put_times_out_when_full(ray_local):
    from worldagent_ray.runtime.buffer_actor import BufferFullTimeout

    ray = ray_local
    actor = _actor(ray, max_groups=1)
    assert ray.get(_put(ray, actor, _group("a"))) is True
    t0 = time.monotonic()
    with pytest.raises(BufferFullTimeout, match="stayed full"):
        ray.get(_put(ray, actor, _group("b"), timeout_s=0.5))
    assert time.monotonic() - t0 >= 0.5
    st = ray.get(actor.stats.remote())
    assert st["dropped"]["full"] == 1 and st["size"] == 1


@pytest.mark.ray
def test_actor_get_batch_waits_then_times_out_with_what_it_has(ray_local):
    ray = ray_local
    actor = _actor(ray, max_groups=4)
    pending = actor.get_batch.remote(2, 0, 20.0)
    ready, _ = ray.wait([pending], timeout=0.5)
    assert ready == []
    ray.get(_put(ray, actor, _group("x")))
    ray.get(_put(ray, actor, _group("y")))
    assert [b["group_id"] for b in ray.get(pending, timeout=10)] == ["x", "y"]
    ray.get(_put(ray, actor, _group("z")))
    t0 = time.monotonic()
    partial = ray.get(actor.get_batch.remote(3, 0, 0.5))
    assert [b["group_id"] for b in partial] == ["z"] and time.monotonic() - t0 >= 0.5
    assert ray.get(actor.get_batch.remote(1, 0, 0.2)) == []


@pytest.mark.ray
def test_actor_close_releases_a_waiting_learner_and_reports_drained(ray_local):
    ray = ray_local
    actor = _actor(ray, max_groups=4)
    ray.get(_put(ray, actor, _group("last")))
    pending = actor.get_batch.remote(3, 0, None)  # waits forever for 3 groups...
    ready, _ = ray.wait([pending], timeout=0.5)
    assert ready == [] and ray.get(actor.drained.remote()) is False
    ray.get(actor.close.remote())  # ...until the producer says no more will come
    assert [b["group_id"] for b in ray.get(pending, timeout=10)] == ["last"]
    assert ray.get(actor.drained.remote()) is True
    assert ray.get(actor.get_batch.remote(2, 0, None), timeout=10) == []


@pytest.mark.ray
def test_actor_staleness_drop_and_correct(ray_local):
    ray = ray_local
    drop = _actor(ray, max_groups=4, max_staleness=1, stale_policy="drop")
    for gid, v in [("v0", 0), ("v2", 2), ("v3", 3)]:
        ray.get(_put(ray, drop, _group(gid, version=v)))
    batch = ray.get(drop.get_batch.remote(2, 3, 2.0))
    assert [(b["group_id"], b["staleness"]) for b in batch] == [("v2", 1), ("v3", 0)]
    assert ray.get(drop.stats.remote())["dropped"]["stale"] == 1

    # a version bump evicts stale groups at once, which also unblocks a waiting producer
    ray.get(_put(ray, drop, _group("w0", version=3)))
    for i in range(3):
        ray.get(_put(ray, drop, _group(f"w{i + 1}", version=4)))
    blocked = _put(ray, drop, _group("late", version=6), timeout_s=30.0)
    assert ray.wait([blocked], timeout=0.5)[0] == []
    assert ray.get(drop.set_policy_version.remote(5)) == 3  # w0 (2 behind) evicted
    assert ray.get(blocked, timeout=10) is True

    corr = _actor(ray, max_groups=4, max_staleness=1, stale_policy="correct")
    ray.get(_put(ray, corr, _group("old", version=0)))
    (item,) = ray.get(corr.get_batch.remote(1, 5, 2.0))
    assert item["needs_correction"] is True and item["staleness"] == 5
    assert ray.get(item["ref"]).rollout_logprobs == [[-0.5, -0.25], [-0.5, -0.25]]


@pytest.mark.ray
def test_actor_state_dict_round_trip(ray_local):
    ray = ray_local
    a = _actor(ray, max_groups=4)
    for gid in ("a", "b"):
        ray.get(_put(ray, a, _group(gid, version=2)))
    ray.get(a.get_batch.remote(2, 2, 2.0))
    state = ray.get(a.state_dict.remote())
    assert state["consumed_ids"] == ["a", "b"] and state["policy_version"] == 2
    b = _actor(ray, max_groups=4)
    ray.get(b.load_state_dict.remote(state))
    assert ray.get(_put(ray, b, _group("a", version=2))) is False
    assert ray.get(_put(ray, b, _group("c", version=2))) is True
    st = ray.get(b.stats.remote())
    assert st["dropped"]["consumed"] == 1 and st["taken"] == 2 and st["policy_version"] == 2


@pytest.mark.ray
def test_create_buffer_actor_from_config(ray_local):
    from worldagent_ray.runtime.buffer_actor import buffer_actor_name, create_buffer_actor

    ray = ray_local
    cfg = LearnerConfig(buffer_max_groups=3, max_staleness=0, stale_policy="drop")
    h = create_buffer_actor(cfg, name="cfgtest")
    again = ray.get_actor(buffer_actor_name("cfgtest"))
    ray.get(_put(ray, h, _group("q", version=0)))
    st = ray.get(again.stats.remote())
    assert st["max_groups"] == 3 and st["size"] == 1 and st["name"] == "cfgtest"
    ray.kill(h)
