"""EpisodeMemory at scale: background maintenance off the write path, index retraining, the
catalog's incremental reads, bounded reads, and a table on an S3-compatible server.

Real LanceDB and MiniLM throughout; the only doubles are delay/fault injectors wrapped around
one LanceDB call (named as such where they are used)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import lancedb
import pytest

from tests.factories import MEMORY_GOALS, make_memory_episode
from worldagent_ray.memory import Embedder, EpisodeMemory
from worldagent_ray.memory.indexes import ivf_partitions
from worldagent_ray.memory.rows import episode_schema

WAIT_S = 120.0  # bound of every wait here (they end far sooner unless something hangs)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder("minilm")


def _gate(obj, name: str, when=lambda *a, **kw: True):
    """Delay injection: ``obj.name`` waits for the returned ``gate`` (when ``when`` holds);
    ``entered`` is set once a call is waiting."""
    real = getattr(obj, name)
    entered, gate = threading.Event(), threading.Event()

    def gated(*args, **kwargs):
        if when(*args, **kwargs):
            entered.set()
            assert gate.wait(WAIT_S)
        return real(*args, **kwargs)

    setattr(obj, name, gated)
    return entered, gate


def test_background_maintenance_never_blocks_upserts_and_loses_nothing(tmp_path, embedder):
    memory = EpisodeMemory(str(tmp_path / "mem"), embedder=embedder, optimize_every=2)
    first = make_memory_episode("apple")
    memory.upsert([first])
    entered, gate = _gate(memory._open(create=False), "optimize")  # compaction waits for the test
    memory.upsert([make_memory_episode("fridge")])  # second commit: maintenance requested
    try:
        assert entered.wait(WAIT_S)  # the maintenance thread is stuck inside compaction
        later = [make_memory_episode(k, i) for k in ("plate", "eggs", "lights", "bread") for i in range(2)]
        for ep in later:
            assert memory.upsert([ep]) == 1  # returns although compaction cannot finish
        assert not gate.is_set() and memory.maintenance_stats()["busy"]
        # Reads are served meanwhile, and see every write.
        assert memory.retrieve(MEMORY_GOALS["plate"], 1)[0].goal == MEMORY_GOALS["plate"]
        assert memory.count() == 10 and memory.get(later[-1].id) == later[-1]
    finally:
        gate.set()
    assert memory.wait_for_maintenance(WAIT_S)
    stats = memory.maintenance_stats()
    # The four requests made while the first run was blocked coalesce into one more run.
    assert stats["runs"] == 2 and stats["errors"] == 0
    assert memory.count() == 10 and memory.table_stats()["rows"] == 10
    assert memory.table_stats()["fragments"] <= 2  # compacted
    assert memory.get(first.id) == first and all(memory.get(ep.id) == ep for ep in later)
    memory.close()


def test_catalog_reads_only_changed_rows_and_sees_other_writers(tmp_path, embedder):
    uri = str(tmp_path / "mem")
    a = EpisodeMemory(uri, embedder=embedder)
    eps = [make_memory_episode(k, i, success=i == 0) for k in MEMORY_GOALS for i in range(2)]  # 12
    a.upsert(eps[:6])
    assert a.ids() == {e.id for e in eps[:6]}
    read = a.maintenance_stats()["catalog_rows_read"]
    assert read == 6
    a.upsert(eps[6:8])
    assert a.count() == 8 and a.maintenance_stats()["catalog_rows_read"] == read + 2  # the two new rows only
    assert a.mastered_goals(0.5, 2) == {MEMORY_GOALS[k] for k in list(MEMORY_GOALS)[:4]}
    assert a.maintenance_stats()["catalog_rows_read"] == read + 2  # nothing changed: nothing read
    # Another writer (a second process would be the same: it shares only the table).
    b = EpisodeMemory(uri, embedder=embedder)
    flipped = eps[1].model_copy(update={"verdict": eps[0].verdict})  # now successful
    b.upsert(eps[8:12] + [flipped])
    assert a.ids() == {e.id for e in eps}
    assert a.maintenance_stats()["catalog_rows_read"] == read + 2 + 5
    assert a.count(success=True) == 7 and a.stats_by_phase()[1]["n"] == 12
    assert MEMORY_GOALS["apple"] in a.mastered_goals(1.0, 2)  # both apple samples now succeed
    assert [e.id for e in a.recent(3)] == [e.id for e in b.recent(3)]


def test_a_table_without_row_versions_is_rescanned_and_stays_correct(tmp_path, embedder):
    uri = str(tmp_path / "mem")
    # A table made before stable row ids (as earlier versions of this store made them).
    lancedb.connect(uri).create_table("episodes", schema=episode_schema(embedder.dim))
    memory = EpisodeMemory(uri, embedder=embedder)
    memory.upsert([make_memory_episode("apple"), make_memory_episode("fridge")])
    assert memory.count() == 2
    memory.upsert([make_memory_episode("plate")])
    assert memory.ids() == {make_memory_episode(k).id for k in ("apple", "fridge", "plate")}
    assert memory.maintenance_stats()["catalog_rows_read"] == 2 + 3  # full rescans


def test_reads_retry_transient_errors_and_give_up_within_their_bounds(tmp_path, embedder):
    memory = EpisodeMemory(str(tmp_path / "mem"), embedder=embedder, max_read_attempts=3, retry_base_delay_s=0.001)
    memory.upsert([make_memory_episode("apple")])
    table = memory._open(create=False)
    real = table.search
    calls = {"n": 0}

    def flaky(*args, **kwargs):  # fault injection: the object store resets the first two reads
        calls["n"] += 1
        if calls["n"] <= 2:
            raise OSError("Generic S3 error: connection reset by peer")
        return real(*args, **kwargs)

    table.search = flaky
    assert memory.retrieve(MEMORY_GOALS["apple"], 1)[0].goal == MEMORY_GOALS["apple"]
    assert calls["n"] == 3

    def down(*args, **kwargs):
        calls["n"] += 1
        raise OSError("Generic S3 error: service unavailable (503)")

    table.search, calls["n"] = down, 0
    with pytest.raises(OSError, match="unavailable"):
        memory.get(make_memory_episode("apple").id)
    assert calls["n"] == 3  # max_read_attempts, then the error

    def broken(*args, **kwargs):
        calls["n"] += 1
        raise ValueError("schema mismatch")

    table.search, calls["n"] = broken, 0
    with pytest.raises(ValueError, match="schema mismatch"):
        memory.retrieve(MEMORY_GOALS["apple"], 1)
    assert calls["n"] == 1  # not transient: no retry
    table.search = real
    # A read that cannot finish in its timeout fails with a timeout, after its tries.
    slow = EpisodeMemory(str(tmp_path / "mem"), embedder=embedder, read_timeout_s=1e-9, max_read_attempts=2,
                         retry_base_delay_s=0.0)
    with pytest.raises(Exception, match="(?i)time"):
        slow.retrieve(MEMORY_GOALS["apple"], 1)


@pytest.mark.slow  # encodes ~620 goals and trains the index twice: ~15 s idle, more on a busy box
def test_vector_index_retrains_as_the_table_grows_and_reads_stay_correct_during_a_rebuild(tmp_path, embedder):
    verbs = ["put", "move", "place", "drop", "set", "slide", "carry"]
    objects = ["apple", "cup", "plate", "egg", "spoon", "knife", "bowl", "pan", "towel", "lid"]
    places = ["bowl", "sink", "fridge", "drawer", "shelf", "table", "oven", "basket", "box", "tray"]
    goals = [f"{v} the {o} in the {p}" for v in verbs for o in objects for p in places][:621]
    # Every third episode failed: retrieval ranks successes first, so the tests query successes.
    eps = [make_memory_episode(f"g{i}", goal=g, success=i % 3 != 0, reward=(i % 10) / 10) for i, g in enumerate(goals)]
    uri = str(tmp_path / "mem")
    memory = EpisodeMemory(uri, embedder=embedder, vector_index_min_rows=256, retrain_factor=2.0,
                           optimize_every=10_000)
    memory.upsert(eps[:300])
    assert memory.optimize() == {"rows": 300, "duplicates_removed": 0}
    st = memory.maintenance_stats()
    assert (st["trained_rows"], st["partitions"]) == (300, ivf_partitions(300)) and "vector_idx" in memory.index_names()
    assert memory.retrieve(goals[10], 1)[0].goal == goals[10]
    memory.upsert(eps[300:500])
    memory.optimize()
    assert memory.maintenance_stats()["trained_rows"] == 300  # 500 < 2 x 300: no retrain
    memory.upsert(eps[500:620])
    table = memory._open(create=False)
    assert table.index_stats("vector_idx").num_unindexed_rows == 120  # not in the index yet ...
    assert memory.retrieve(goals[619], 1)[0].goal == goals[619]  # ... and found by exact search

    # Retrain at 620 rows; the index build waits for the test while reads and writes go on.
    entered, gate = _gate(table, "create_index", when=lambda *a, **kw: kw.get("name") == "vector_idx")
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(memory.optimize)
        try:
            assert entered.wait(WAIT_S)
            for g in (goals[4], goals[421], goals[619]):  # old rows, rows since the last build (successes)
                assert memory.retrieve(g, 1)[0].goal == g
            memory.upsert([eps[620]])  # written during the rebuild
            assert memory.retrieve(goals[620], 1)[0].goal == goals[620]
            assert memory.retrieve(goals[5], 3, success=True)[0].success
        finally:
            gate.set()
        assert done.result(timeout=WAIT_S) == {"rows": 621, "duplicates_removed": 0}
    st = memory.maintenance_stats()
    assert (st["trained_rows"], st["partitions"]) == (620, ivf_partitions(620))
    idx = table.index_stats("vector_idx")
    assert idx.num_indexed_rows + idx.num_unindexed_rows == 621
    for g in (goals[4], goals[620]):
        assert memory.retrieve(g, 1)[0].goal == g
    # Filtered searches on the index (prefiltered): a common filter and rare ones.
    assert [h.goal for h in memory.retrieve(goals[4], 1, success=True)] == [goals[4]]
    rare = make_memory_episode("rare", goal="hang the towel on the oven door", run_id="run-b")
    memory.upsert([rare])
    assert [h.episode_id for h in memory.retrieve(goals[4], 3, run_id="run-b")] == [rare.id]
    top = memory.retrieve(goals[19], 3, min_reward=0.9)  # 62 of 622 rows pass
    assert top[0].goal == goals[19] and len(top) == 3 and all(h.reward >= 0.9 for h in top)
    # The training is recorded in the table: a new process knows when the next one is due.
    again = EpisodeMemory(uri, embedder=embedder)
    assert again.count() == 622 and again.retrieve(goals[77], 1)[0].goal == goals[77]
    assert (again.maintenance_stats()["trained_rows"], again.maintenance_stats()["partitions"]) == (620, ivf_partitions(620))


# --------------------------------------------------------------------------- object store


def test_storage_options_come_from_the_environment_only_for_object_stores():
    from worldagent_ray.memory import storage_options_from_env

    env = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_DEFAULT_REGION": "eu-west-1",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9001"}
    assert storage_options_from_env("/tmp/mem", env) is None and storage_options_from_env("file:///m", env) is None
    opts = storage_options_from_env("s3://bucket/mem", env)
    assert opts == {"timeout": "60s", "connect_timeout": "10s", "aws_access_key_id": "id",
                    "aws_secret_access_key": "secret", "aws_region": "eu-west-1",
                    "aws_endpoint": "http://127.0.0.1:9001", "allow_http": "true"}
    assert storage_options_from_env("s3://bucket/mem", {}) == {"timeout": "60s", "connect_timeout": "10s"}
    assert storage_options_from_env("gs://bucket/mem", env) == {"timeout": "60s", "connect_timeout": "10s"}


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3-compatible server (moto) on 127.0.0.1 for this module."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_memory_on_an_s3_compatible_server_with_credentials_from_the_environment(s3_endpoint, embedder, monkeypatch):
    import boto3

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="wa-memory")
    uri = "s3://wa-memory/runs/r1/memory"
    memory = EpisodeMemory(uri, embedder=embedder, optimize_every=2)
    assert not memory.lock_writes  # object stores cannot be locked
    eps = [make_memory_episode(k) for k in ("apple", "fridge", "plate")]
    for ep in eps:
        memory.upsert([ep])
    assert memory.retrieve("place an apple into a bowl", 1)[0].goal == MEMORY_GOALS["apple"]
    assert memory.get(eps[1].id) == eps[1] and memory.count() == 3
    assert memory.optimize() == {"rows": 3, "duplicates_removed": 0}
    assert {"id_idx", "goal_idx"} <= memory.index_names()
    memory.close()
    again = EpisodeMemory(uri, embedder=embedder)
    assert again.ids() == {e.id for e in eps}
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="wa-memory")["Contents"]]
    assert keys and all(k.startswith("runs/r1/memory/episodes.lance/") for k in keys)
