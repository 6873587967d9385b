"""World memory core: EpisodeMemory on a real LanceDB table with real MiniLM embeddings."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pyarrow as pa
import pytest

from tests.factories import MEMORY_GOALS, make_memory_episode
from worldagent_ray.memory import Embedder, EpisodeMemory, MemoryFilterError
from worldagent_ray.memory.retry import retry_with_backoff
from worldagent_ray.memory.rows import episode_row
from worldagent_ray.schemas import Episode, GroundTruth, Rollout, StepOutcome, StepStatus, Task

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RUST_LOG", "error")

GOALS = MEMORY_GOALS
make_episode = make_memory_episode


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder("minilm")


@pytest.fixture
def memory(tmp_path, embedder) -> EpisodeMemory:
    return EpisodeMemory(str(tmp_path / "mem"), embedder=embedder)


# --------------------------------------------------------------------------- embedder


def test_embedder_encodes_normalised_float32_and_similar_text_is_closer(embedder):
    v = embedder.encode(["put the apple in the bowl", "place an apple into the bowl", "open the fridge door"])
    assert v.dtype == np.float32 and v.shape == (3, embedder.dim) and embedder.dim == 384
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3
    assert embedder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match="single str"):
        embedder.encode("not a list")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        embedder.encode(["ok", 3])
    with pytest.raises(ValueError, match="num_threads"):
        Embedder(num_threads=0)
    with pytest.raises(ValueError, match="embedder name"):
        Embedder("")


# --------------------------------------------------------------------------- retrieval


def test_retrieval_returns_similar_goals_first(memory):
    eps = [make_episode(k) for k in GOALS]
    assert memory.upsert(eps) == len(GOALS)
    hits = memory.retrieve("place an apple into a bowl", k=3)
    assert hits[0].goal == GOALS["apple"]
    assert hits[0].plan == ["step one of apple", "step two of apple"]
    assert hits[0].caption == "apple done"
    assert "action_following=0.80" in hits[0].feedback and "notes: ok" in hits[0].feedback
    assert hits[0].score > hits[1].score >= hits[2].score
    hits = memory.retrieve("open the refrigerator", k=1)
    assert [h.goal for h in hits] == [GOALS["fridge"]]
    assert memory.retrieve("anything", k=0) == []


def test_retrieve_on_missing_table_is_empty_and_bad_arguments_are_named(memory):
    assert memory.retrieve("put the apple in the bowl", 3) == []
    assert memory.count() == 0 and memory.ids() == set() and memory.get("ep-x") is None
    assert memory.stats_by_phase() == {} and memory.recent(3) == []
    with pytest.raises(MemoryFilterError, match="query_type"):
        memory.retrieve("goal", 3, query_type="sql")
    with pytest.raises(MemoryFilterError, match="k must be"):
        memory.retrieve("goal", -1)
    with pytest.raises(MemoryFilterError, match="goal must be"):
        memory.retrieve("   ", 3)
    with pytest.raises(MemoryFilterError, match="phase"):
        memory.retrieve("goal", 3, phase=7)


def test_filters_success_phase_min_reward(memory):
    eps = [
        make_episode("apple", 0, success=True, reward=0.9, phase=1),
        make_episode("apple", 1, success=False, reward=0.2, phase=1),
        make_episode("plate", 0, success=True, reward=0.6, phase=2, goal="put the plate in the bowl"),
        make_episode("eggs", 0, success=False, reward=0.4, phase=3, goal="put the egg in the bowl"),
    ]
    memory.upsert(eps)
    q = "put the apple in the bowl"
    assert {h.success for h in memory.retrieve(q, 10, success=False)} == {False}
    assert len(memory.retrieve(q, 10, success=False)) == 2
    assert {h.phase for h in memory.retrieve(q, 10, phase=2)} == {2}
    assert all(h.reward >= 0.5 for h in memory.retrieve(q, 10, min_reward=0.5))
    assert len(memory.retrieve(q, 10, min_reward=0.5)) == 2
    assert memory.retrieve(q, 10, phase=3, success=True) == []
    # The goal's own task can be left out (e.g. the siblings of the group being planned).
    hits = memory.retrieve(q, 10, exclude_run_task=("run-a", "task-apple"))
    assert hits and all(h.goal != q for h in hits)
    assert memory.count() == 4 and memory.count(success=True) == 2 and memory.count(phase=1) == 2
    assert memory.count(min_reward=0.5, success=True) == 2 and memory.count(run_id="other") == 0


def test_successful_episodes_come_first(memory):
    memory.upsert(
        [
            make_episode("apple", 0, success=False, reward=0.3),  # the closest goal, but failed
            make_episode("bread", 0, success=True, reward=0.9, goal="put the banana in the basket"),
        ]
    )
    hits = memory.retrieve("put the apple in the bowl", k=2)
    assert [h.success for h in hits] == [True, False]
    assert hits[1].goal == GOALS["apple"] and hits[1].score > hits[0].score


@pytest.mark.parametrize("query_type", ["fts", "hybrid"])
def test_full_text_and_hybrid_retrieval(memory, query_type):
    memory.upsert([make_episode(k) for k in GOALS])
    assert "goal_idx" in memory.index_names()
    hits = memory.retrieve("fridge door", k=2, query_type=query_type)
    assert hits and hits[0].goal == GOALS["fridge"]
    # Rows written after the index build are found too.
    memory.upsert([make_episode("apple", 0, goal="close the freezer door", run_id="run-b")])
    goals = {h.goal for h in memory.retrieve("freezer", k=3, query_type=query_type)}
    assert "close the freezer door" in goals
    # Query text is data: quotes and SQL-looking text neither fail nor match everything.
    assert memory.retrieve("it's a \"door\"; DROP TABLE episodes; --", k=2, query_type=query_type)
    assert memory.count() == len(GOALS) + 1


# --------------------------------------------------------------------------- writes


def test_upsert_is_idempotent_and_the_latest_write_wins(memory):
    first = make_episode("apple", 0, success=False, reward=0.1)
    assert memory.upsert([first]) == 1
    assert memory.upsert([first]) == 1  # an update, not a second row
    assert memory.count() == 1 and memory.table_stats()["rows"] == 1
    updated = first.model_copy(update={"policy_version": 3})
    updated.verdict = make_episode("apple", 0, success=True, reward=0.95).verdict
    # The same id twice in one batch: the later one wins.
    assert memory.upsert([first, updated]) == 1
    assert memory.count() == 1 and memory.table_stats()["rows"] == 1
    got = memory.get(first.id)
    assert got == updated and got.success and got.policy_version == 3
    assert memory.count(success=True) == 1
    hit = memory.retrieve(GOALS["apple"], 1)[0]
    assert hit.success and hit.reward == 0.95
    with pytest.raises(TypeError, match="single Episode"):
        memory.upsert(first)
    with pytest.raises(TypeError, match=r"episodes\[1\]"):
        memory.upsert([first, {"id": "x"}])


def test_get_round_trips_the_episode_exactly(memory):
    ep = make_episode("eggs", 2, notes=("egg shell in the pan", "unicode: \u00e9\u00e8 \U0001f95a"))
    ep.rollout = Rollout(
        task_id=ep.task.id,
        plan_index=2,
        video_uri="file:///tmp/v.mp4",
        frame_uris=["a.png", "b.png"],
        num_frames=17,
        ground_truth=GroundTruth(
            steps=[StepOutcome(index=0, text="crack egg", status=StepStatus.EXECUTED, verb="crack", args=["egg"])],
            final_state={"pan": ["egg", "egg"], "heat": 0.1 + 0.2},
            goal_predicates={"eggs_in_pan": True},
        ),
        world="sandbox",
        seed=7,
        latency_s=0.123456789,
    )
    ep.completion_logprobs = [-0.1, -1e-12, -3.3333333333333335]
    ep.completion_token_ids = [1, 2, 3]
    ep.prompt = "plan for 'eggs'\n\"quoted\""
    ep.policy_version = 5
    ep.retrieved_ids = ["ep-aaa"]
    memory.upsert([ep])
    got = memory.get(ep.id)
    assert got == ep
    assert got.model_dump_json() == ep.model_dump_json()
    assert memory.get("ep-missing") is None
    other = make_episode("apple")
    memory.upsert([other])
    assert memory.get_many([ep.id, "ep-missing", other.id, ep.id]) == {ep.id: ep, other.id: other}
    assert memory.get_many([]) == {}
    with pytest.raises(MemoryFilterError, match=r"episode_ids\[1\]"):
        memory.get_many([ep.id, ""])
    with pytest.raises(MemoryFilterError, match="episode_id"):
        memory.get("")


def test_failed_episode_is_stored_with_its_reason(memory):
    task = Task(id="task-x", goal="stack three cups", phase=2)
    ep = Episode.new("run-a", task, 0, status="failed", failure_reason="plan was not JSON", raw_output="{oops")
    memory.upsert([ep])
    assert memory.get(ep.id) == ep
    hit = memory.retrieve("stack the cups", 1)[0]
    assert not hit.success and hit.plan == [] and "plan was not JSON" in hit.feedback
    assert memory.count(status="failed") == 1


def test_ids_recent_stats_and_mastered_goals(memory):
    t0 = 1_000.0
    eps = [
        make_episode("apple", 0, success=True, reward=1.0, created_at=t0 + 1),
        make_episode("apple", 1, success=True, reward=0.8, created_at=t0 + 2),
        make_episode("apple", 2, success=False, reward=0.3, created_at=t0 + 3),
        make_episode("fridge", 0, success=True, reward=0.9, phase=2, created_at=t0 + 4),
        make_episode("plate", 0, success=False, reward=0.1, phase=2, created_at=t0 + 5, run_id="run-b"),
    ]
    memory.upsert(eps)
    assert memory.ids() == {e.id for e in eps}
    assert memory.ids("run-b") == {eps[4].id}
    assert [e.id for e in memory.recent(2)] == [eps[4].id, eps[3].id]
    assert [e.id for e in memory.recent(10, run_id="run-a")] == [e.id for e in reversed(eps[:4])]
    stats = memory.stats_by_phase()
    assert stats[1]["n"] == 3 and stats[1]["success_rate"] == pytest.approx(2 / 3)
    assert stats[1]["mean_reward"] == pytest.approx(0.7)
    assert stats[2] == {"n": 2, "success_rate": 0.5, "mean_reward": pytest.approx(0.5)}
    assert memory.mastered_goals(0.6, 3) == {GOALS["apple"]}
    assert memory.mastered_goals(0.6, 1) == {GOALS["apple"], GOALS["fridge"]}
    assert memory.mastered_goals(0.7, 3) == set()
    with pytest.raises(MemoryFilterError, match="threshold"):
        memory.mastered_goals(1.5, 1)


def test_periodic_optimize_compacts_and_keeps_results(tmp_path, embedder):
    memory = EpisodeMemory(str(tmp_path / "mem"), embedder=embedder, optimize_every=3)
    for key in ["apple", "fridge"]:
        memory.upsert([make_episode(key)])
    before = memory.retrieve("put an apple into the bowl", 2)
    assert memory.table_stats()["fragments"] == 2
    memory.upsert([make_episode("plate")])  # third commit: asks for maintenance, returns at once
    assert memory.wait_for_maintenance(timeout_s=120)  # the background thread compacts
    assert memory.maintenance_stats()["runs"] == 1 and memory.maintenance_stats()["errors"] == 0
    assert memory.table_stats()["fragments"] < 3
    after = memory.retrieve("put an apple into the bowl", 2)
    assert [h.episode_id for h in after] == [h.episode_id for h in before]
    assert memory.count() == 3


# --------------------------------------------------------------------------- failures and concurrency


def test_commit_conflicts_are_retried_and_other_errors_are_not(memory, monkeypatch):
    memory.upsert([make_episode("apple")])
    table = memory._open(create=False)
    real = table.merge_insert
    calls = {"n": 0}

    def conflicting(on):  # fault injection: the first two commits lose a race
        calls["n"] += 1
        if calls["n"] <= 2:
            raise OSError("Retryable commit conflict for version 3: another writer committed first")
        return real(on)

    monkeypatch.setattr(table, "merge_insert", conflicting)
    assert memory.upsert([make_episode("fridge")]) == 1
    assert calls["n"] == 3 and memory.count() == 2

    def broken(on):
        calls["n"] += 1
        raise OSError("disk quota exceeded")

    monkeypatch.setattr(table, "merge_insert", broken)
    calls["n"] = 0
    with pytest.raises(OSError, match="quota"):
        memory.upsert([make_episode("plate")])
    assert calls["n"] == 1
    # Persistent conflicts give up after max_write_attempts.
    n = {"c": 0}

    def always_conflict():
        n["c"] += 1
        raise RuntimeError("commit conflict")

    with pytest.raises(RuntimeError, match="conflict"):
        retry_with_backoff(always_conflict, attempts=3, base_delay_s=0.001)
    assert n["c"] == 3


def test_duplicate_rows_from_unlocked_writers_are_hidden_then_repaired(memory):
    """Object stores cannot be locked: two writers racing on a new id can each insert it.

    Inject that state (two raw appends of one id), then check every read shows one episode,
    the newest, and that optimize deletes the stale copy."""
    old = make_episode("apple", 0, success=False, reward=0.1)
    new = old.model_copy(update={"verdict": make_episode("apple", 0, success=True, reward=0.9).verdict})
    memory.upsert([make_episode("fridge")])
    table = memory._open(create=False)
    vec = memory.embedder.encode([old.task.goal])[0]
    for ep, t in ((old, 10.0), (new, 20.0)):
        table.add(pa.Table.from_pylist([episode_row(ep, vec, t)], schema=table.schema))
    assert memory.table_stats()["rows"] == 3
    assert memory.count() == 2 and memory.get(old.id) == new
    hits = memory.retrieve(GOALS["apple"], 5)
    assert [h.episode_id for h in hits].count(old.id) == 1 and hits[0].success
    assert memory.stats_by_phase()[1]["n"] == 2
    assert memory.optimize()["duplicates_removed"] == 1
    assert memory.table_stats()["rows"] == 2 and memory.get(old.id) == new


def _writer_process(uri: str, worker: int, lock_writes: bool, barrier, out) -> None:
    """Child of the concurrency test: 25 episodes of its own plus 5 shared with every writer."""
    try:
        embedder = Embedder("minilm", num_threads=1)
        mem = EpisodeMemory(uri, embedder=embedder, optimize_every=4, lock_writes=lock_writes)
        own = [make_episode(f"w{worker}-{i}", 0, goal=f"task {i} of worker {worker}") for i in range(25)]
        shared = [make_episode(f"shared-{i}", 0, goal=f"shared task {i}", reward=worker / 10) for i in range(5)]
        _ = mem.embedder.dim  # load the model before the race starts
        barrier.wait(timeout=120)
        written = 0
        for i in range(0, 25, 5):  # several small commits per writer, so they interleave
            written += mem.upsert(own[i : i + 5] + shared[i // 5 : i // 5 + 1])
        out.put((worker, written, None))
    except Exception as e:  # pragma: no cover - reported to the parent
        out.put((worker, -1, repr(e)))


@pytest.mark.slow
@pytest.mark.parametrize("lock_writes", [True, False], ids=["file-lock", "unlocked-like-object-store"])
def test_concurrent_writer_processes_lose_and_duplicate_nothing(tmp_path, lock_writes):
    """4 processes race (barrier) to write 25 own and 5 shared ids each, in small commits.

    With the file lock no duplicate row ever exists. Without it (as on an object store),
    racing inserts of a shared id can commit twice (seen here: 109 rows for 105 ids); reads
    still show 105 episodes and optimize deletes the stale copies."""
    uri = str(tmp_path / "mem")
    # Separate processes, each with its own LanceDB connection and embedder. A fork server that
    # imported torch once makes starting them cheap (spawn re-imports it per child, ~90 s on a
    # busy 2-core box). LanceDB is imported in each child: its runtime must not be forked.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["sentence_transformers", "worldagent_ray.memory.store"])
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_writer_process, args=(uri, w, lock_writes, barrier, out)) for w in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [r[2] for r in results] == [None] * 4
    if lock_writes:
        assert all(r[1] == 30 for r in results)
    else:
        # A shared id committed twice by racing inserts is then matched twice by a later
        # merge, which counts both copies as updated: each writer wrote all 30, maybe more.
        assert all(r[1] >= 30 for r in results), results
    mem = EpisodeMemory(uri, embedder=Embedder("minilm"))
    expected = {make_episode(f"w{w}-{i}", 0, goal="x").id for w in range(4) for i in range(25)}
    expected |= {make_episode(f"shared-{i}", 0, goal="x").id for i in range(5)}
    assert mem.ids() == expected
    assert mem.count() == 105
    if lock_writes:
        assert mem.table_stats()["rows"] == 105  # no duplicate row of a shared id, ever
    else:
        mem.optimize()
        assert mem.table_stats()["rows"] == 105
    assert all(mem.get(i) is not None for i in expected)
