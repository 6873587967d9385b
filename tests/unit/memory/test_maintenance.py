"""The background maintainer's contract and the vector-index policy (no LanceDB needed)."""

from __future__ import annotations

import threading

import pytest

from worldagent_ray.memory.indexes import IndexBuildPolicy, ivf_partitions, nprobes, pq_sub_vectors, rebuild_due
from worldagent_ray.memory.maintenance import BackgroundMaintainer

WAIT_S = 60.0


def test_partitions_follow_the_row_count_and_probes_keep_their_share():
    assert [ivf_partitions(n) for n in (1, 300, 1_000, 20_000, 100_000, 10**9)] == [1, 1, 3, 78, 316, 4096]
    parts = [ivf_partitions(n) for n in range(256, 200_000, 997)]
    assert parts == sorted(parts)  # more rows, never fewer partitions
    assert pq_sub_vectors(384) == 48 and pq_sub_vectors(100) == 10 and pq_sub_vectors(7) == 1
    assert nprobes(16) == 16 and nprobes(316) == 20 and nprobes(1024) == 64
    with pytest.raises(ValueError, match="n_rows"):
        ivf_partitions(0)


def test_the_index_is_built_at_min_rows_then_on_growth_or_too_many_segments():
    def due(n, trained, segments=1):
        return rebuild_due(n, trained, segments, min_rows=256, factor=2.0, max_segments=6)

    assert due(255, None) is None and due(256, None) == "first"
    assert due(511, 256) is None and due(512, 256) == "grown"
    assert due(100_000, 65_536) is None and due(131_072, 65_536) == "grown"
    assert due(100_000, 65_536, segments=6) is None and due(100_000, 65_536, segments=7) == "segments"
    assert due(200, 100, segments=50) is None  # under min_rows nothing is built


def test_rebuilds_for_segments_take_at_most_their_share_of_the_time():
    policy = IndexBuildPolicy(min_rows=256, factor=2.0, max_segments=6, duty=0.25)
    assert policy.due(1_000, None, 0, now=0.0) == "first"
    policy.record(20.0, now=20.0)  # a 20 s build ending at t=20
    assert policy.due(1_100, 1_000, 9, now=79.0) is None  # 59 s < 3 x 20 s since: not yet
    assert policy.due(1_100, 1_000, 9, now=80.0) == "segments"
    assert policy.due(2_000, 1_000, 2, now=21.0) == "grown"  # growth is never deferred
    assert policy.builds == 1


class Gated:
    """Delay injection: each run waits for ``gate`` (re-armed by the test) and counts itself."""

    def __init__(self):
        self.runs = 0
        self.started = threading.Semaphore(0)
        self.gate = threading.Event()
        self.fail_next: BaseException | None = None

    def __call__(self):
        self.runs += 1
        self.started.release()
        assert self.gate.wait(WAIT_S)
        if self.fail_next is not None:
            err, self.fail_next = self.fail_next, None
            raise err
        return {"run": self.runs}


def test_requests_return_at_once_and_coalesce_while_a_run_is_busy():
    job = Gated()
    m = BackgroundMaintainer(job, name="t-maint")
    m.request()
    assert job.started.acquire(timeout=WAIT_S)  # first run in progress, blocked on the gate
    for _ in range(5):
        m.request()  # never blocks, whatever the job is doing
    assert m.busy and m.stats()["busy"]
    assert not m.wait_idle(timeout_s=0.01)  # bounded: it answers, it does not hang
    job.gate.set()
    assert m.wait_idle(timeout_s=WAIT_S)
    assert job.runs == 2  # the five requests during the first run make one more run
    assert m.stats()["runs"] == 2 and m.stats()["errors"] == 0
    assert m.close(WAIT_S)


def test_run_now_returns_the_result_raises_job_errors_and_times_out():
    job = Gated()
    job.gate.set()
    m = BackgroundMaintainer(job, name="t-maint")
    assert m.run_now(WAIT_S) == {"run": 1}
    job.fail_next = OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        m.run_now(WAIT_S)
    assert m.stats()["errors"] == 1 and "disk full" in m.stats()["last_error"]
    assert m.run_now(WAIT_S) == {"run": 3}  # the thread survived the error
    job.gate.clear()
    with pytest.raises(TimeoutError, match="still running"):
        m.run_now(timeout_s=0.01)  # the run is blocked on the gate: it cannot finish in time
    job.gate.set()
    assert m.close(WAIT_S)
    with pytest.raises(RuntimeError, match="closed"):
        m.request()
