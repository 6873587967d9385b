"""Chaos (issue 9): one run with --learn in which a world replica, the memory actor, a learner
worker and the driver itself are killed, each at a moment drawn from a seeded RNG (a number of
committed episodes); the run is resumed, interrupted with Ctrl-C (SIGINT: exit 130, and the
command that resumes it), and resumed again to the end. Afterwards every planned episode is in
memory exactly once with its final status, every ledger row matches memory, the learner's
consumed groups equal its acknowledged ones, and the report and summary cover the whole run."""

from __future__ import annotations

import json
import random
import signal
import subprocess

import pytest

from tests.e2e.helpers import (
    FAST,
    PY,
    ROOT,
    job_env_vars,
    kill_actor,
    ledger_episodes,
    memory_ids,
    run_evolve_job,
    wait_for_episodes,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# 12 rounds: far more than the kills need, so that the driver is killed mid-run even on a fast
# machine (the three actor kills take seconds each, during which the loop goes on).
ROUNDS = 12
ARGS = [*FAST, "--set", f"run.iterations={ROUNDS}", "--set", "agents.action.group_size=2",
        "--set", "learner.groups_per_step=1", "--set", "learner.checkpoint_every=1",
        "--set", "learner.drop_zero_variance=false", "--set", "learner.max_staleness=100",
        "--set", "learner.max_failures=3", "--set", "run.max_retries=4", "--set", "run.retry_backoff_s=1"]
PLANNED = ROUNDS * 2 * 2


def test_kill_everything_resume_interrupt_with_ctrl_c_and_resume_again(ray_head, tmp_path):
    env = job_env_vars(RAY_ADDRESS=ray_head["gcs"], RAY_AUTH_MODE="token")
    rng = random.Random(9)
    # kill moments, in committed episodes: replica, memory actor, learner worker, then the driver
    moments = sorted(rng.sample(range(2, 12), 4))
    run = tmp_path / "chaos"
    proc = subprocess.Popen([PY, "jobs/evolve.py", "--run-name", "chaos", "--learn", "--set", f"run.root={tmp_path}",
                             *ARGS], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = []
    try:
        for moment, marker in zip(moments[:3], ("WorldDeployment", "MemoryActor", "RayTrainWorker")):
            wait_for_episodes(run, moment, proc)
            killed.append(kill_actor(marker, env))
        wait_for_episodes(run, moments[3], proc)
        proc.send_signal(signal.SIGKILL)  # the driver dies with no chance to clean up
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = {r["id"] for r in ledger_episodes(run)}
    assert len(first) < PLANNED, "the driver must die before the run ends"

    # resumed, then Ctrl-C: what finished is kept, the command line says how to go on
    proc = subprocess.Popen([PY, "jobs/evolve.py", "--resume", str(run)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_episodes(run, len(first) + 2, proc)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        out, _ = proc.communicate(timeout=600)  # the learner drains what it holds first
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert f"--resume {run}" in out
    second = {r["id"] for r in ledger_episodes(run)}
    assert first < second and len(second) < PLANNED, "the resumed run must be interrupted early"

    p = run_evolve_job(["--resume", str(run), "--json"], env, timeout=900)
    summary = json.loads(p.stdout.split("SUMMARY ", 1)[1].splitlines()[0])

    mem = memory_ids(run)
    assert len(mem) == len(set(mem)) == PLANNED, (len(mem), len(set(mem)))  # every episode once
    rows = ledger_episodes(run)
    last = {}
    for r in rows:
        last[r["id"]] = r
    assert set(last) == set(mem)  # every ledger id is in memory and the reverse
    assert second <= set(last), "a resume must keep what earlier parts wrote"
    import lancedb

    table = lancedb.connect(str(run / "memory")).open_table("episodes").to_arrow()
    status = dict(zip(table.column("id").to_pylist(), table.column("status").to_pylist()))
    assert {i: r["status"] for i, r in last.items()} == status  # the ledger's final status is memory's
    assert all(r["status"] == "ok" or r["failure"] for r in last.values())
    assert all(r["status"] == "failed" or r["scores"] is not None for r in last.values())
    buf = summary["learner"]["buffer"]
    assert "error" not in summary["learner"], summary["learner"]
    assert buf["in_flight"] == 0 and buf["consumed_ids"] == buf["acked"], buf
    assert len(killed) == 3, killed

    # the report and the summary of the whole run
    report = (run / "report.html").read_text()
    assert "Reward and success over time" in report and "<svg" in report
    assert report.count('class="group"') == PLANNED // 2
    assert "episodes/s" in p.stdout and str(run / "report.html") in p.stdout
    assert "dashboard: http://127.0.0.1:" in p.stdout and "serve applications: engine-policy, world" in p.stdout
    assert (run / "config.yaml").exists() and json.loads((run / "curriculum.json").read_text())["proposed"] >= PLANNED // 2
