"""The memory actor on a real local Ray cluster, over a real LanceDB table and MiniLM."""

from __future__ import annotations

import os
import sys
import time

import pytest

ray = pytest.importorskip("ray")

from worldagent_ray.config import Config  # noqa: E402
from worldagent_ray.runtime.memory_actor import create_memory_actor, memory_actor_name  # noqa: E402
from worldagent_ray.schemas import Episode, Plan, Scores, Task, Verdict  # noqa: E402

pytestmark = pytest.mark.ray

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RUST_LOG", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def make_episode(task_key: str, goal: str, sample: int = 0, *, success: bool = True, reward: float = 0.8) -> Episode:
    return Episode.new(
        "run-actor",
        Task(id=f"task-{task_key}", goal=goal, phase=1),
        sample,
        plan=Plan.from_actions([f"do {goal}"]),
        verdict=Verdict(
            state_caption=goal,
            success=success,
            scores=Scores(
                action_following=reward,
                temporal_consistency=reward,
                object_interaction=reward,
                goal_achievement=1.0 if success else 0.0,
                physics=1.0,
            ),
            reward=reward,
        ),
        created_at=time.time(),
    )


@pytest.fixture(scope="module")
def local_ray():
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RUST_LOG")}
    # Workers cannot import this test module: ship its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, namespace="test-memory", runtime_env={"env_vars": env})
    yield
    ray.shutdown()


@ray.remote(num_cpus=0.25)
def _write_through_actor(name: str, worker: int) -> int:
    memory = ray.get_actor(name, namespace="test-memory")
    eps = [make_episode(f"w{worker}-{i}", f"task {i} for worker {worker}") for i in range(25)]
    eps += [make_episode(f"shared-{i}", f"shared task {i}", reward=worker / 10) for i in range(3)]
    written = 0
    for i in range(0, len(eps), 7):  # several calls per writer, so they interleave at the actor
        written += ray.get(memory.upsert.remote(eps[i : i + 7]))
    return written


@pytest.mark.slow
def test_memory_actor_serves_concurrent_writers_and_readers(local_ray, tmp_path):
    cfg = Config()
    cfg.memory.optimize_every = 8  # several background maintenance runs during the writes
    run_dir = str(tmp_path / "run")
    actor = create_memory_actor(cfg, run_dir, name="t1")
    # Named and reusable: a second lookup gets the same actor.
    assert create_memory_actor(cfg, run_dir, name="t1") == actor
    assert ray.get_actor(memory_actor_name("t1"), namespace="test-memory") == actor
    assert ray.get(actor.info.remote())["uri"] == os.path.join(run_dir, "memory")

    seed = [
        make_episode("apple", "put the apple in the bowl"),
        make_episode("apple", "put the apple in the bowl", 1, success=False, reward=0.2),
        make_episode("fridge", "open the fridge door"),
    ]
    assert ray.get(actor.upsert.remote(seed)) == 3

    writers = [_write_through_actor.remote(memory_actor_name("t1"), w) for w in range(4)]
    # Reads are served while the writers run (and while background maintenance compacts).
    reads = [actor.retrieve.remote("place an apple into a bowl", 2) for _ in range(4)]
    for hits in ray.get(reads):
        assert hits[0].goal == "put the apple in the bowl" and hits[0].success
    assert ray.get(writers) == [28] * 4
    # The four reads of one goal embed it once: cached, or batched with the concurrent ones.
    cache = ray.get(actor.info.remote())["embed_cache"]
    assert cache["hits"] >= 3 and cache["encoded"] <= cache["misses"]

    assert ray.get(actor.count.remote()) == 3 + 4 * 25 + 3
    assert ray.get(actor.table_stats.remote())["rows"] == 3 + 4 * 25 + 3
    assert len(ray.get(actor.ids.remote("run-actor"))) == 106
    assert ray.get(actor.get.remote(seed[2].id)) == seed[2]
    assert ray.get(actor.get_many.remote([seed[0].id, seed[2].id])) == {seed[0].id: seed[0], seed[2].id: seed[2]}
    assert ray.get(actor.count.remote(success=False)) == 1
    hits = ray.get(actor.retrieve.remote("open the fridge", 1, query_type="hybrid"))
    assert hits[0].goal == "open the fridge door"
    stats = ray.get(actor.stats_by_phase.remote())
    assert stats[1]["n"] == 106
    assert "put the apple in the bowl" not in ray.get(actor.mastered_goals.remote(0.6, 2))
    assert "put the apple in the bowl" in ray.get(actor.mastered_goals.remote(0.5, 2))
    assert ray.get(actor.optimize.remote(timeout_s=300))["rows"] == 106
    st = ray.get(actor.maintenance_stats.remote())
    assert st["runs"] >= 1 and st["errors"] == 0 and not st["busy"]
    assert len(ray.get(actor.recent.remote(5))) == 5
    with pytest.raises(ray.exceptions.RayTaskError, match="phase"):
        ray.get(actor.retrieve.remote("goal", 3, phase=9))
    ray.get(actor.close.remote())
    ray.kill(actor)


def test_memory_actor_requires_memory_enabled(tmp_path):
    cfg = Config()
    cfg.memory.enabled = False
    with pytest.raises(ValueError, match="memory.enabled"):
        create_memory_actor(cfg, str(tmp_path), name="off")
    with pytest.raises(ValueError, match="name"):
        memory_actor_name("")
