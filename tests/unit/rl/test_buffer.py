"""The pure rollout buffer (:class:`GroupBuffer`): FIFO, refusals, staleness, resume state."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worldagent_ray.rl.buffer import AddResult, BufferEntry, GroupBuffer, meta_of
from worldagent_ray.schemas import ScoredGroup

from tests.factories import buffer_entry, scored_group


# --------------------------------------------------------------------------- pure core


def test_fifo_and_payload_kept():
    buf = GroupBuffer(max_groups=8, max_staleness=2)
    for i in range(5):
        assert buf.add(buffer_entry(f"g{i}")) is AddResult.ACCEPTED
    got = buf.take(3, current_version=0)
    assert [e.group_id for e in got] == ["g0", "g1", "g2"]
    assert [e.ref for e in got] == ["payload-g0", "payload-g1", "payload-g2"]
    assert [e.group_id for e in buf.take(10, 0)] == ["g3", "g4"]
    assert buf.take(1, 0) == []


def test_duplicates_and_consumed_ids_rejected_and_counted():
    buf = GroupBuffer(max_groups=8, max_staleness=2)
    assert buf.add(buffer_entry("a")).accepted
    assert buf.add(buffer_entry("a")) is AddResult.DUPLICATE
    buf.take(1, 0)
    assert buf.add(buffer_entry("a")) is AddResult.CONSUMED
    assert len(buf) == 0
    assert buf.stats()["dropped"] == {"duplicate": 1, "consumed": 1, "zero_variance": 0, "full": 0, "stale": 0}


def test_zero_variance_dropped_when_enabled():
    buf = GroupBuffer(max_groups=8, max_staleness=2, drop_zero_variance=True)
    assert buf.add(buffer_entry("flat", rewards=(0.5, 0.5, 0.5))) is AddResult.ZERO_VARIANCE
    assert buf.add(buffer_entry("ok", rewards=(0.5, 0.6))).accepted
    assert buf.stats()["dropped"]["zero_variance"] == 1 and len(buf) == 1
    keep = GroupBuffer(max_groups=8, max_staleness=2, drop_zero_variance=False)
    assert keep.add(buffer_entry("flat", rewards=(0.5, 0.5))).accepted


def test_full_refused_and_counted():
    buf = GroupBuffer(max_groups=2, max_staleness=2)
    assert buf.add(buffer_entry("a")).accepted and buf.add(buffer_entry("b")).accepted
    assert buf.check(buffer_entry("c")) is AddResult.FULL and buf.stats()["dropped"]["full"] == 0  # check is pure
    assert buf.add(buffer_entry("c")) is AddResult.FULL
    assert buf.stats()["dropped"]["full"] == 1 and "c" not in buf


def test_staleness_drop_policy():
    buf = GroupBuffer(max_groups=8, max_staleness=1, stale_policy="drop")
    for gid, v in [("v0", 0), ("v1", 1), ("v2", 2), ("v3", 3)]:
        buf.add(buffer_entry(gid, version=v))
    got = buf.take(2, current_version=3)  # v0 (3 behind) and v1 (2 behind) are stale
    assert [(e.group_id, e.staleness, e.needs_correction) for e in got] == [("v2", 1, False), ("v3", 0, False)]
    s = buf.stats(current_version=3)
    assert s["dropped"]["stale"] == 2 and s["taken_staleness"] == {0: 1, 1: 1}
    assert "v0" not in buf.consumed_ids  # a regenerated v0 group would be welcome
    assert buf.add(buffer_entry("v0", version=3)).accepted


def test_staleness_correct_policy_flags_instead_of_dropping():
    buf = GroupBuffer(max_groups=8, max_staleness=1, stale_policy="correct")
    buf.add(buffer_entry("old", version=0))
    buf.add(buffer_entry("new", version=4))
    got = buf.take(2, current_version=4)
    assert [(e.group_id, e.staleness, e.needs_correction) for e in got] == [("old", 4, True), ("new", 0, False)]
    assert buf.stats()["corrected"] == 1 and buf.stats()["dropped"]["stale"] == 0


def test_evict_stale_frees_space_only_under_drop():
    drop = GroupBuffer(max_groups=2, max_staleness=0, stale_policy="drop")
    drop.add(buffer_entry("a", 0))
    drop.add(buffer_entry("b", 1))
    assert [e.group_id for e in drop.evict_stale(1)] == ["a"] and not drop.full
    corr = GroupBuffer(max_groups=2, max_staleness=0, stale_policy="correct")
    corr.add(buffer_entry("a", 0))
    assert corr.evict_stale(5) == [] and len(corr) == 1
    assert corr.queued_staleness(5) == {5: 1}


def test_acked_ids_survive_state_dict_round_trip_in_flight_ones_do_not():
    buf = GroupBuffer(max_groups=8, max_staleness=1, stale_policy="drop")
    for i in range(4):
        buf.add(buffer_entry(f"g{i}", version=i))
    buf.add(buffer_entry("g0"))  # duplicate
    buf.take(4, current_version=3)  # g0, g1 stale -> dropped; g2, g3 in flight
    assert buf.ack(["g2"]) == (1, [])
    state = json.loads(json.dumps(buf.state_dict()))  # JSON-safe
    assert state["acked_ids"] == ["g2"]  # g3 was never durably trained: a resumed run regenerates it
    buf.ack(["g3"])
    state = json.loads(json.dumps(buf.state_dict()))
    fresh = GroupBuffer(max_groups=8, max_staleness=1, stale_policy="drop")
    fresh.load_state_dict(state)
    assert fresh.consumed_ids == fresh.acked_ids == {"g2", "g3"}
    assert fresh.add(buffer_entry("g2", version=3)) is AddResult.CONSUMED
    assert fresh.add(buffer_entry("g0", version=3)).accepted
    st = fresh.stats()
    assert st["taken"] == 2 and st["dropped"]["stale"] == 2 and st["dropped"]["duplicate"] == 1
    assert st["dropped"]["consumed"] == 1 and st["taken_staleness"] == {0: 1, 1: 1}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_groups": 0, "max_staleness": 1}, "max_groups"),
        ({"max_groups": 2, "max_staleness": -1}, "max_staleness"),
        ({"max_groups": 2, "max_staleness": 1, "stale_policy": "keep"}, "stale_policy"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupBuffer(**kwargs)


def test_bad_entries_and_state():
    with pytest.raises(ValueError, match="policy_version"):
        BufferEntry("g", -1, 0.5, 0.1, 2)
    with pytest.raises(ValueError, match="reward_std"):
        BufferEntry("g", 0, 0.5, float("nan"), 2)
    with pytest.raises(ValueError, match=r"missing required keys \['reward_std'\]"):
        BufferEntry.from_meta({"group_id": "g", "policy_version": 0, "reward_mean": 0.0, "num_samples": 2})
    buf = GroupBuffer(max_groups=2, max_staleness=1)
    with pytest.raises(ValueError, match="version"):
        buf.load_state_dict({"consumed_ids": []})
    with pytest.raises(ValueError, match="consumed_ids"):
        buf.load_state_dict({"version": 1, "consumed_ids": [1, 2]})
    with pytest.raises(ValueError, match="acked_ids"):
        buf.load_state_dict({"version": 2})
    buf.load_state_dict({"version": 1, "consumed_ids": ["old"]})  # a version-1 state: handed out = done
    assert buf.acked_ids == {"old"}
    with pytest.raises(ValueError, match="n must be"):
        buf.take(-1, 0)


def test_scored_group_validation():
    with pytest.raises(ValueError, match="rewards has 1 entries, expected 2"):
        ScoredGroup(group_id="g", task_id="t", policy_version=0, prompt_token_ids=[1],
                    completion_token_ids=[[1], [2]], rollout_logprobs=[[-1.0], [-1.0]], rewards=[1.0],
                    episode_ids=["a", "b"])
    with pytest.raises(ValueError, match="per-sample prompts"):
        ScoredGroup(group_id="g", task_id="t", policy_version=0, prompt_token_ids=[[1], [2], [3]],
                    completion_token_ids=[[1], [2]], rollout_logprobs=[[-1.0], [-1.0]], rewards=[1.0, 0.0],
                    episode_ids=["a", "b"])
    g = scored_group("g", rewards=(0.0, 1.0))
    assert meta_of(g) == {"group_id": "g", "task_id": "t", "policy_version": 0, "reward_mean": 0.5,
                          "reward_std": 0.5, "num_samples": 2}


# --------------------------------------------------------------------------- at-least-once


def test_taken_groups_stay_in_flight_until_acked():
    buf = GroupBuffer(max_groups=8, max_staleness=5)
    for i in range(4):
        buf.add(buffer_entry(f"g{i}"))
    got = buf.take(2, 0)
    assert buf.in_flight == ["g0", "g1"] and buf.consumed_ids == {"g0", "g1"} and not buf.acked_ids
    assert buf.add(buffer_entry("g0")) is AddResult.CONSUMED  # in flight counts as handed to the learner
    assert buf.ack(["g1", "nope"]) == (1, ["nope"])
    assert buf.ack(["g1"]) == (0, [])  # idempotent
    assert buf.in_flight == ["g0"] and buf.acked_ids == {"g1"}
    assert got[0].ref == "payload-g0"
    st = buf.stats()
    assert (st["in_flight"], st["acked"], st["consumed_ids"], st["taken"]) == (1, 1, 2, 2)


def test_requeue_puts_in_flight_groups_first_in_hand_out_order():
    buf = GroupBuffer(max_groups=3, max_staleness=5)
    for i in range(3):
        buf.add(buffer_entry(f"g{i}"))
    buf.take(2, 0)
    buf.add(buffer_entry("g3"))
    buf.add(buffer_entry("g4"))
    assert buf.full and len(buf) == 3
    assert buf.requeue() == ["g0", "g1"]
    assert len(buf) == 5 and not buf.in_flight  # over capacity for a while, nothing dropped
    again = buf.take(5, 0)
    assert [e.group_id for e in again] == ["g0", "g1", "g2", "g3", "g4"]
    assert again[0].ref == "payload-g0"
    st = buf.stats()
    assert st["requeued"] == 2 and st["taken"] == 7 and st["dropped"]["full"] == 0


@settings(derandomize=True, max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "take", "ack", "requeue", "bump"]), st.integers(0, 7)),
                max_size=60),
       st.sampled_from(["drop", "correct"]))
def test_no_group_is_lost_whatever_the_order_of_operations(ops, policy):
    """accepted == queued + in flight + acknowledged + dropped as stale after acceptance, and
    every accepted id is in exactly one of those places."""
    buf = GroupBuffer(max_groups=4, max_staleness=1, stale_policy=policy)
    version, n, accepted, stale_dropped = 0, 0, set(), set()
    for op, k in ops:
        if op == "add":
            e = buffer_entry(f"g{n % 12}", version=version)
            n += 1
            if buf.add(e).accepted:
                accepted.add(e.group_id)
        elif op == "take":
            before = set(buf._queue)
            got = {e.group_id for e in buf.take(k, version)}
            stale_dropped |= before - got - set(buf._queue)
        elif op == "ack":
            buf.ack(buf.in_flight[: k % 3])
        elif op == "requeue":
            buf.requeue()
        else:
            version += k % 3
            stale_dropped |= {e.group_id for e in buf.evict_stale(version)}
    queued, flight, acked = set(buf._queue), set(buf.in_flight), buf.acked_ids
    assert not (queued & flight) and not (queued & acked) and not (flight & acked)
    assert accepted == queued | flight | acked | stale_dropped
    assert buf.stats()["consumed_ids"] == len(flight) + len(acked)
