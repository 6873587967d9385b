"""The rollout buffer actor (:class:`BufferActor`) on a local Ray cluster."""

from __future__ import annotations

import gc
import time

import pytest

from worldagent_ray.config import LearnerConfig
from worldagent_ray.rl.buffer import meta_of
from worldagent_ray.schemas import ScoredGroup

from tests.factories import scored_group


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
    groups = [scored_group(f"g{i}", version=0, rewards=(0.0, 0.2 * (i + 1))) for i in range(3)]
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
    assert ray.get(_put(ray, actor, scored_group("a"))) is True
    assert ray.get(_put(ray, actor, scored_group("a"))) is False
    assert ray.get(_put(ray, actor, scored_group("flat", rewards=(1.0, 1.0)))) is False
    ray.get(actor.get_batch.remote(1, 0, 1.0))
    assert ray.get(_put(ray, actor, scored_group("a"))) is False
    dropped = ray.get(actor.stats.remote())["dropped"]
    assert (dropped["duplicate"], dropped["zero_variance"], dropped["consumed"]) == (1, 1, 1)
    with pytest.raises(TypeError, match="one-element list"):
        ray.get(actor.put.remote(meta_of(scored_group("b")), ray.put(scored_group("b"))))


@pytest.mark.ray
def test_actor_back_pressure_put_blocks_until_get_frees_space(ray_local):
    ray = ray_local
    actor = _actor(ray, max_groups=2)
    # one at a time: an async actor does not promise to run concurrent calls in submission order
    assert ray.get(_put(ray, actor, scored_group("a"))) is True
    assert ray.get(_put(ray, actor, scored_group("b"))) is True
    blocked = _put(ray, actor, scored_group("c"), timeout_s=30.0)
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
    assert ray.get(_put(ray, actor, scored_group("a"))) is True
    t0 = time.monotonic()
    with pytest.raises(BufferFullTimeout, match="stayed full"):
        ray.get(_put(ray, actor, scored_group("b"), timeout_s=0.5))
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
    ray.get(_put(ray, actor, scored_group("x")))
    ray.get(_put(ray, actor, scored_group("y")))
    assert [b["group_id"] for b in ray.get(pending, timeout=10)] == ["x", "y"]
    ray.get(_put(ray, actor, scored_group("z")))
    t0 = time.monotonic()
    partial = ray.get(actor.get_batch.remote(3, 0, 0.5))
    assert [b["group_id"] for b in partial] == ["z"] and time.monotonic() - t0 >= 0.5
    assert ray.get(actor.get_batch.remote(1, 0, 0.2)) == []


@pytest.mark.ray
def test_actor_close_releases_a_waiting_learner_and_reports_drained(ray_local):
    ray = ray_local
    actor = _actor(ray, max_groups=4)
    ray.get(_put(ray, actor, scored_group("last")))
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
        ray.get(_put(ray, drop, scored_group(gid, version=v)))
    batch = ray.get(drop.get_batch.remote(2, 3, 2.0))
    assert [(b["group_id"], b["staleness"]) for b in batch] == [("v2", 1), ("v3", 0)]
    assert ray.get(drop.stats.remote())["dropped"]["stale"] == 1

    # a version bump evicts stale groups at once, which also unblocks a waiting producer
    ray.get(_put(ray, drop, scored_group("w0", version=3)))
    for i in range(3):
        ray.get(_put(ray, drop, scored_group(f"w{i + 1}", version=4)))
    blocked = _put(ray, drop, scored_group("late", version=6), timeout_s=30.0)
    assert ray.wait([blocked], timeout=0.5)[0] == []
    assert ray.get(drop.set_policy_version.remote(5)) == 3  # w0 (2 behind) evicted
    assert ray.get(blocked, timeout=10) is True

    corr = _actor(ray, max_groups=4, max_staleness=1, stale_policy="correct")
    ray.get(_put(ray, corr, scored_group("old", version=0)))
    (item,) = ray.get(corr.get_batch.remote(1, 5, 2.0))
    assert item["needs_correction"] is True and item["staleness"] == 5
    assert ray.get(item["ref"]).rollout_logprobs == [[-0.5, -0.25], [-0.5, -0.25]]


@pytest.mark.ray
def test_actor_state_dict_round_trip(ray_local):
    ray = ray_local
    a = _actor(ray, max_groups=4)
    for gid in ("a", "b"):
        ray.get(_put(ray, a, scored_group(gid, version=2)))
    ray.get(a.get_batch.remote(2, 2, 2.0))
    assert ray.get(a.state_dict.remote())["acked_ids"] == []  # handed out, not durably trained yet
    assert ray.get(a.ack.remote(["a", "b"], {"step": 1, "path": "/ckpt/1"})) == 2
    state = ray.get(a.state_dict.remote())
    assert state["acked_ids"] == ["a", "b"] and state["policy_version"] == 2
    b = _actor(ray, max_groups=4)
    ray.get(b.load_state_dict.remote(state))
    assert ray.get(_put(ray, b, scored_group("a", version=2))) is False
    assert ray.get(_put(ray, b, scored_group("c", version=2))) is True
    st = ray.get(b.stats.remote())
    assert st["dropped"]["consumed"] == 1 and st["taken"] == 2 and st["policy_version"] == 2


@pytest.mark.ray
def test_create_buffer_actor_from_config(ray_local):
    from worldagent_ray.runtime.buffer_actor import buffer_actor_name, create_buffer_actor

    ray = ray_local
    cfg = LearnerConfig(buffer_max_groups=3, max_staleness=0, stale_policy="drop")
    h = create_buffer_actor(cfg, name="cfgtest")
    again = ray.get_actor(buffer_actor_name("cfgtest"))
    ray.get(_put(ray, h, scored_group("q", version=0)))
    st = ray.get(again.stats.remote())
    assert st["max_groups"] == 3 and st["size"] == 1 and st["name"] == "cfgtest"
    ray.kill(h)


# --------------------------------------------------------------------------- at-least-once


@pytest.mark.ray
def test_actor_keeps_refs_in_flight_until_acked_and_requeues_on_restore(ray_local):
    ray = ray_local
    actor = _actor(ray, max_groups=8, max_staleness=10)
    groups = [scored_group(f"g{i}") for i in range(5)]
    for g in groups:
        ray.get(_put(ray, actor, g))
    first = ray.get(actor.get_batch.remote(2, 0, 2.0))
    ray.get(actor.ack.remote([b["group_id"] for b in first], {"step": 1, "path": "/ckpt/step1"}))
    second = ray.get(actor.get_batch.remote(2, 0, 2.0))  # g2, g3: taken, never acknowledged
    del second
    gc.collect()
    st = ray.get(actor.stats.remote())
    assert (st["in_flight"], st["acked"], st["size"], st["durable_step"]) == (2, 2, 1, 1)
    assert ray.get(actor.durable_checkpoint.remote()) == {"step": 1, "path": "/ckpt/step1"}
    # a learner restarts from the step-1 checkpoint: g0, g1 are in it, g2, g3 come back first
    assert ray.get(actor.restore.remote(["g0", "g1"], {"step": 1, "path": "/ckpt/step1"})) == ["g2", "g3"]
    again = ray.get(actor.get_batch.remote(3, 0, 2.0))
    assert [b["group_id"] for b in again] == ["g2", "g3", "g4"]
    assert ray.get([b["ref"] for b in again]) == groups[2:]  # the buffer kept the refs alive
    ray.get(actor.ack.remote(["g2", "g3", "g4"], {"step": 2, "path": "/ckpt/step2"}))
    st = ray.get(actor.stats.remote())
    assert st["in_flight"] == 0 and st["acked"] == st["consumed_ids"] == st["accepted"] == 5
    assert st["taken"] == 7 and st["requeued"] == 2 and st["durable_step"] == 2


@pytest.mark.ray
def test_fresh_buffer_restored_from_a_checkpoint_refuses_trained_groups(ray_local):
    ray = ray_local
    actor = _actor(ray, max_groups=4)
    assert ray.get(actor.restore.remote(["old-1"], None)) == []
    assert ray.get(actor.durable_checkpoint.remote()) is None
    assert ray.get(_put(ray, actor, scored_group("old-1"))) is False
    assert ray.get(actor.stats.remote())["dropped"]["consumed"] == 1


def _scored_inputs(task_id: str = "t1", reference_image: str | None = None):
    from worldagent_ray.schemas import Completion, Plan, PlanSample, Scores, Task, Verdict

    task = Task(id=task_id, goal="wash the cup", phase=1, reference_image=reference_image)
    samples = [PlanSample(plan=Plan.from_actions(["pick up the cup"]),
                          completion=Completion(text="{}", token_ids=[5 + i, 6], logprobs=[-0.1, -0.2],
                                                prompt_token_ids=[1, 2, 3]))
               for i in range(2)]
    scores = Scores(action_following=0.5, temporal_consistency=0.5, object_interaction=0.5,
                    goal_achievement=0.5, physics=0.5)
    verdicts = [Verdict(state_caption="c", success=bool(i), scores=scores, reward=float(i)) for i in range(2)]
    return task, samples, verdicts, 0, [f"{task_id}-e{i}" for i in range(2)]


@pytest.mark.ray
def test_feeder_stops_at_once_when_the_learner_dies_while_the_buffer_is_full(ray_local):
    """A dead learner is noticed between the short polls of a wait on a full buffer: the feed
    returns False long before feed_timeout_s, the reason is recorded once, later feeds do not
    wait at all, and the buffer counts no 'full' refusal for it."""
    import asyncio

    from worldagent_ray.runtime.learning import GroupFeeder

    ray = ray_local
    actor = _actor(ray, max_groups=1)
    ray.get(_put(ray, actor, scored_group("occupies-the-only-slot")))
    calls, stops = [], []

    def health():  # the fault: the learner is reported dead from the third check on
        calls.append(1)
        return None if len(calls) < 3 else "learner failed: RuntimeError: injected"

    feeder = GroupFeeder(actor, "run", health=health, feed_timeout_s=120.0, poll_s=0.2, on_stop=stops.append)

    async def go():
        first = await asyncio.wait_for(feeder.feed(*_scored_inputs("t1")), 60)
        second = await asyncio.wait_for(feeder.feed(*_scored_inputs("t2")), 60)
        return first, second

    assert asyncio.run(go()) == (False, False)
    assert stops == ["learner failed: RuntimeError: injected"] and feeder.stopped == stops[0]
    assert (feeder.fed, feeder.not_fed, len(calls)) == (0, 2, 3)
    st = ray.get(actor.stats.remote())
    assert st["dropped"]["full"] == 0 and st["size"] == 1


@pytest.mark.ray
def test_feeder_back_pressure_then_timeout_counts_one_full_refusal(ray_local):
    import asyncio

    from worldagent_ray.runtime.learning import GroupFeeder

    ray = ray_local
    actor = _actor(ray, max_groups=1)
    feeder = GroupFeeder(actor, "run", feed_timeout_s=0.6, poll_s=0.2)

    async def go():
        ok = await feeder.feed(*_scored_inputs("a", reference_image="/refs/a.png"))
        waiting = asyncio.ensure_future(feeder.feed(*_scored_inputs("b")))
        await asyncio.sleep(0)  # b now waits for space...
        taken = await actor.get_batch.remote(1, 0, 5.0)  # ...which the learner frees
        ok_b = await asyncio.wait_for(waiting, 60)
        timed_out = await asyncio.wait_for(feeder.feed(*_scored_inputs("c")), 60)  # nobody takes now
        return ok, taken, ok_b, timed_out

    ok, taken, ok_b, timed_out = asyncio.run(go())
    assert ok and ok_b and not timed_out
    assert ray.get(taken[0]["ref"]).reference_image == "/refs/a.png"  # travels with the group
    assert (feeder.fed, feeder.refused, feeder.stopped) == (2, 1, None)
    assert ray.get(actor.stats.remote())["dropped"]["full"] == 1
