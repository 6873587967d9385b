"""The driver (``EvolveDriver``) against in-process services, no Ray: ordering, back-pressure,
resume, and every failure boundary (issues 8 and 9). Each test runs in about a second."""

from __future__ import annotations

import asyncio
import errno
import json

import pytest

from worldagent_ray.orchestration.evolve import EvolveDriver
from worldagent_ray.orchestration.run_folder import RunFolder
from worldagent_ray.schemas import episode_id

from tests.unit.orchestration.fakes import FakeLearner, InProcessServices, fast_config, ledger_ids

pytestmark = pytest.mark.timeout(60)


def make_run(tmp_path, cfg, name="r"):
    return RunFolder.create(cfg.model_copy(update={"run": cfg.run.model_copy(update={"root": str(tmp_path)})}), name)


def drive(cfg, run, services, *, crash_after: int | None = None, **kw):
    """Run the loop; with ``crash_after``, cancel it once that many episodes are committed (the
    process dying mid-run: in-flight groups are abandoned)."""

    async def main():
        driver = EvolveDriver(cfg, run, services, **kw)
        task = asyncio.current_task()
        if crash_after is not None:
            def progress(snap):
                if snap["committed"] >= crash_after:
                    task.cancel()
            driver.progress = progress
        return await driver.run_loop()

    return asyncio.run(main())


def planned_ids(run, cfg):
    G = cfg.agents.action.group_size
    return {episode_id(run.run_id, t.id, i) for rnd in run.rounds() for t in rnd.tasks for i in range(G)}


def test_every_planned_episode_is_committed_once_in_memory_and_ledger(tmp_path):
    cfg = fast_config()
    run, svc = make_run(tmp_path, cfg), None
    svc = InProcessServices(cfg)
    summary = drive(cfg, run, svc)
    n = cfg.run.iterations * cfg.agents.curriculum.tasks_per_proposal * cfg.agents.action.group_size
    assert summary["episodes"] == n and summary["rows"] == n and summary["error"] is None
    assert set(svc.memory) == ledger_ids(run) == planned_ids(run, cfg)
    assert [r.round for r in run.rounds()] == list(range(cfg.run.iterations))
    rows = run.episode_rows()
    assert all(r.attempt == 1 for r in rows) and {r.round for r in rows} == set(range(cfg.run.iterations))
    # round is a field, never parsed from the task id
    assert all(svc.memory[r.id].round == r.round for r in rows)
    ok = [r for r in rows if r.status == "ok"]
    assert ok and 0 < sum(r.success for r in ok) < len(ok)  # the scripted policy is neither perfect nor hopeless


def test_back_pressure_bounds_each_stage_by_its_workers(tmp_path):
    cfg = fast_config("run.iterations=4", "agents.curriculum.tasks_per_proposal=3",
                      "run.pipeline={action: {workers: 1, queue: 1}, world: {workers: 2, queue: 1}, "
                      "critic: {workers: 1, queue: 1}}")

    class PairedWorld(InProcessServices):
        """The first render waits (bounded) until a second one is in flight, so the test sees the
        world stage reach its 2 workers whatever the machine's speed (no wall-clock margin)."""

        inside = max_inside = 0

        async def render(self, *a):
            self.inside += 1
            self.max_inside = max(self.max_inside, self.inside)
            try:
                for _ in range(2500):  # at most ~5 s, only until the first pair has met
                    if self.max_inside >= 2:
                        break
                    await asyncio.sleep(0.002)
                return await super().render(*a)
            finally:
                self.inside -= 1

    svc = PairedWorld(cfg)
    drive(cfg, make_run(tmp_path, cfg), svc)
    assert svc.peak["act"] == 1 and svc.peak["score"] == 1  # one worker each: never more
    assert svc.max_inside == 2 and svc.peak["render"] <= 2  # the world reaches its 2 workers, never more
    assert svc.calls["render"] == 4 * 3


def test_proposals_stay_within_the_lookahead(tmp_path):
    cfg = fast_config("run.iterations=5", "run.lookahead_rounds=1")
    svc = InProcessServices(cfg)
    run = make_run(tmp_path, cfg)
    seen = []

    class Watching(InProcessServices):
        async def propose(self, state, recent, mastered, n, round_index):
            committed_rounds = {r.round for r in run.episode_rows()}
            seen.append((round_index, committed_rounds))
            return await super().propose(state, recent, mastered, n, round_index)

    svc = Watching(cfg)
    drive(cfg, run, svc)
    for rnd, done in seen[1:]:
        assert rnd - 1 in done  # with a lookahead of 1, round r is proposed after round r-1 committed


def test_resume_after_a_crash_loses_and_repeats_nothing(tmp_path):
    cfg = fast_config("run.iterations=4")
    svc = InProcessServices(cfg)
    run = make_run(tmp_path, cfg)

    crashing = InProcessServices(cfg)
    with pytest.raises(asyncio.CancelledError):
        drive(cfg, run, crashing, crash_after=12)
    partial = set(crashing.memory)
    assert 0 < len(partial) < 4 * 2 * 4
    svc.memory = dict(crashing.memory)  # memory survives the driver
    summary = drive(cfg, RunFolder.open(run.local), svc)
    assert set(svc.memory) == ledger_ids(run) == planned_ids(run, cfg)
    assert summary["episodes"] == 32 and summary["rows"] == 32  # no duplicates in the ledger
    assert len(run.events("resume")) == 1


def test_group_that_fails_for_good_is_recorded_and_the_run_goes_on(tmp_path):
    cfg = fast_config("run.max_retries=1")

    class BrokenWorld(InProcessServices):
        async def render(self, task, *a):
            if task.id.startswith("r0001.0."):
                raise RuntimeError("replica died")
            return await super().render(task, *a)

    svc = BrokenWorld(cfg)
    run = make_run(tmp_path, cfg)
    summary = drive(cfg, run, svc)
    failed = [r for r in run.episode_rows() if r.status == "failed"]
    assert len(failed) == cfg.agents.action.group_size
    assert all("world failed after 2 attempt(s)" in r.failure and "replica died" in r.failure for r in failed)
    assert summary["failed"] == len(failed) and summary["episodes"] == 24


def test_transient_failures_are_retried_with_backoff(tmp_path):
    cfg = fast_config("run.max_retries=3")

    class Flaky(InProcessServices):
        fails = 0

        async def render(self, *a):
            if self.fails < 2:
                self.fails += 1
                raise ConnectionError("replica restarting")
            return await super().render(*a)

    svc = Flaky(cfg)
    run = make_run(tmp_path, cfg)
    summary = drive(cfg, run, svc)
    assert summary["failed"] == 0 and svc.fails == 2


def test_failed_episodes_are_retried_on_resume_up_to_max_attempts(tmp_path):
    cfg = fast_config("run.max_retries=0", "run.max_attempts=2", "run.iterations=2")

    class BrokenWorld(InProcessServices):
        broken = True

        async def render(self, task, *a):
            if self.broken and task.id.startswith("r0000.1."):
                raise RuntimeError("out of GPU memory")
            return await super().render(task, *a)

    svc = BrokenWorld(cfg)
    run = make_run(tmp_path, cfg)
    assert drive(cfg, run, svc)["failed"] == 4
    svc.broken = False
    summary = drive(cfg, RunFolder.open(run.local), svc)
    assert summary["failed"] == 0
    retried = [r for r in run.episode_rows() if r.task_id.startswith("r0000.1.")]
    assert sorted((r.attempt, r.status) for r in retried) == [(1, "failed")] * 4 + [(2, "ok")] * 4
    assert all(svc.memory[r.id].attempt == 2 and svc.memory[r.id].status == "ok" for r in retried)
    # a third resume has nothing left to do
    calls = svc.calls["act"]
    drive(cfg, RunFolder.open(run.local), svc)
    assert svc.calls["act"] == calls


def test_max_attempts_one_means_failed_episodes_stay_failed(tmp_path):
    cfg = fast_config("run.max_retries=0", "run.max_attempts=1", "run.iterations=1")

    class BrokenWorld(InProcessServices):
        async def render(self, *a):
            raise RuntimeError("broken")

    svc = BrokenWorld(cfg)
    run = make_run(tmp_path, cfg)
    drive(cfg, run, svc)
    svc2 = InProcessServices(cfg)
    svc2.memory = svc.memory
    drive(cfg, RunFolder.open(run.local), svc2)
    assert svc2.calls["act"] == 0 and all(e.status == "failed" for e in svc2.memory.values())


def test_ledger_write_failure_after_memory_write_ends_the_run_without_rewriting_episodes(tmp_path):
    """Issue 9.1: ENOSPC from the ledger after the memory upsert used to mark the group failed,
    overwrite its OK episodes in memory and hang the drain."""
    cfg = fast_config()
    svc = InProcessServices(cfg)
    run = make_run(tmp_path, cfg)
    real = run.record_episodes
    calls = {"n": 0}

    def full_disk(rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(rows)

    run.record_episodes = full_disk
    summary = drive(cfg, run, svc)
    assert "No space left on device" in summary["error"]
    assert all(e.status == "ok" for e in svc.memory.values())  # nothing rewritten as failed
    assert len(svc.memory) > len(ledger_ids(run))  # the group of the failed write is in memory only
    # resume: the missing ledger rows come back from memory, then the run completes
    summary = drive(cfg, RunFolder.open(run.local), svc)
    assert summary["error"] is None and ledger_ids(run) == set(svc.memory) == planned_ids(run, cfg)
    assert run.events("ledger_reconciled")


def test_memory_call_that_hangs_times_out_and_is_retried(tmp_path):
    cfg = fast_config("run.memory_timeout_s=0.2", "run.iterations=1")

    class Hanging(InProcessServices):
        hung = 0

        async def remember(self, episodes):
            if self.hung < 1:
                self.hung += 1
                await asyncio.sleep(30)
            return await super().remember(episodes)

    svc = Hanging(cfg)
    run = make_run(tmp_path, cfg)
    summary = drive(cfg, run, svc)
    assert summary["failed"] == 0 and svc.hung == 1 and set(svc.memory) == ledger_ids(run)


def test_memory_that_refuses_writes_leaves_groups_for_resume(tmp_path):
    cfg = fast_config("run.iterations=1", "run.max_retries=0")

    class ReadOnly(InProcessServices):
        async def remember(self, episodes):
            raise PermissionError("bucket is read-only")

    svc = ReadOnly(cfg)
    run = make_run(tmp_path, cfg)
    summary = drive(cfg, run, svc)
    assert summary["uncommitted"] == 8 and summary["episodes"] == 0
    assert len(run.events("memory_write_failed")) == 2
    fixed = InProcessServices(cfg)
    summary = drive(cfg, RunFolder.open(run.local), fixed)
    assert summary["episodes"] == 8 and set(fixed.memory) == planned_ids(run, cfg)


def test_curriculum_failure_skips_the_round_and_resume_proposes_it(tmp_path):
    cfg = fast_config("run.max_retries=0")

    class NoRound1(InProcessServices):
        async def propose(self, state, recent, mastered, n, round_index):
            if round_index == 1:
                raise ValueError("curriculum replica crashed")
            return await super().propose(state, recent, mastered, n, round_index)

    svc = NoRound1(cfg)
    run = make_run(tmp_path, cfg)
    summary = drive(cfg, run, svc)
    assert summary["skipped_rounds"] == [1] and [r.round for r in run.rounds()] == [0, 2]
    fixed = InProcessServices(cfg)
    fixed.memory = svc.memory
    drive(cfg, RunFolder.open(run.local), fixed)
    assert [r.round for r in run.rounds()] == [0, 1, 2] and ledger_ids(run) == planned_ids(run, cfg)


def test_a_torn_round_record_is_proposed_again(tmp_path):
    cfg = fast_config("run.iterations=2")
    svc = InProcessServices(cfg)
    run = make_run(tmp_path, cfg)
    drive(cfg, run, svc)
    # simulate a crash while round 1 was being recorded: its line is torn, none of it dispatched
    lines = run.tasks_path.read_bytes().splitlines(keepends=True)
    run.tasks_path.write_bytes(lines[0] + lines[1][: len(lines[1]) // 2])
    for eid in [e for e in svc.memory if svc.memory[e].round == 1]:
        del svc.memory[eid]
    reopened = RunFolder.open(run.local)
    assert [r.round for r in reopened.rounds()] == [0]
    assert (run.local / "tasks.jsonl.torn").exists()
    drive(cfg, reopened, svc)
    assert [r.round for r in reopened.rounds()] == [0, 1] and len(svc.memory) == 16


def test_unexpected_errors_in_side_effects_never_end_the_run(tmp_path):
    cfg = fast_config("run.iterations=2")

    class BadMetrics:
        def stage(self, *a):
            raise ZeroDivisionError("metrics bug")

        def retry(self, *a):
            raise ZeroDivisionError("metrics bug")

        def episodes(self, *a):
            raise ZeroDivisionError("metrics bug")

    def bad_progress(snapshot):
        raise KeyError("progress bug")

    svc = InProcessServices(cfg)
    summary = drive(cfg, make_run(tmp_path, cfg), svc, metrics=BadMetrics(), progress=bad_progress)
    assert summary["episodes"] == 16 and summary["error"] is None


def test_watchdog_ends_a_run_whose_calls_ignore_their_timeouts(tmp_path):
    cfg = fast_config("run.stage_timeout_s=0.2", "run.watchdog_timeouts=2", "run.iterations=1")

    class Stuck(InProcessServices):
        async def render(self, *a):
            try:  # a misbehaving client that swallows the timeout's cancellation once
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                pass
            await asyncio.sleep(60)  # ... and then hangs until cancelled again

    svc = Stuck(cfg)
    run = make_run(tmp_path, cfg)
    summary = drive(cfg, run, svc)
    assert "no stage finished a call" in summary["error"]
    assert run.events("run_stopped")


def test_a_dead_learner_stops_feeding_and_ends_the_run_cleanly(tmp_path):
    cfg = fast_config("run.iterations=4", "run.lookahead_rounds=1")
    learner = FakeLearner(dies_after=2)
    svc = InProcessServices(cfg, skill=0.5)
    run = make_run(tmp_path, cfg)
    summary = drive(cfg, run, svc, learner=learner)
    assert "learner stopped" in summary["error"] and "injected" in summary["error"]
    assert len(learner.groups) == 2 and summary["fed_groups"] == 2
    assert summary["episodes"] < 32  # no more rounds were proposed
    assert set(svc.memory) == ledger_ids(run)  # what was committed is consistent


def test_learner_gets_one_scored_group_per_task(tmp_path):
    cfg = fast_config("run.iterations=2")
    learner = FakeLearner()
    svc = InProcessServices(cfg, skill=0.5)
    drive(cfg, make_run(tmp_path, cfg), svc, learner=learner)
    assert len(learner.groups) == 4 and len({g.group_id for g in learner.groups}) == 4
    for g in learner.groups:
        assert g.num_samples == 4 and set(g.episode_ids) <= set(svc.memory)
        assert g.rewards == [svc.memory[e].reward for e in g.episode_ids]


def test_memory_disabled_runs_and_resumes_from_the_ledger(tmp_path):
    cfg = fast_config("memory.enabled=false", "run.iterations=3")

    class NoMemory(InProcessServices):
        async def remember(self, episodes):
            raise AssertionError("memory is disabled")

        async def recall(self, goal, k):
            raise AssertionError("memory is disabled")

        async def stored_ids(self, run_id):
            raise AssertionError("memory is disabled")

        async def mastered_goals(self, threshold, min_n):
            raise AssertionError("memory is disabled")

    run = make_run(tmp_path, cfg)

    with pytest.raises(asyncio.CancelledError):
        drive(cfg, run, NoMemory(cfg), crash_after=8)
    summary = drive(cfg, RunFolder.open(run.local), NoMemory(cfg))
    assert summary["episodes"] == 24 and summary["rows"] == 24 and ledger_ids(run) == planned_ids(run, cfg)


def test_summary_counts_a_retried_episode_once(tmp_path):
    cfg = fast_config("run.iterations=1")
    run = make_run(tmp_path, cfg)
    drive(cfg, run, InProcessServices(cfg))
    rows = run.episode_rows()
    retry = rows[0].model_copy(update={"attempt": 2, "status": "ok"})
    run.record_episodes([retry])
    from worldagent_ray.orchestration.evolve import summarize

    assert summarize(run.episode_rows(), 1.0)["episodes"] == 8
    assert json.loads(run.metrics_path.read_text().splitlines()[-1])["attempt"] == 2
