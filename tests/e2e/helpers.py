"""Shared helpers of the end-to-end tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
FAST_OVERRIDES = [
    "engines.policy.model=tiny-random-llama", "engines.policy.backend=transformers",
    "engines.policy.max_json_retries=0", "agents.curriculum.use_llm=false",
    "agents.critic.scorers=[verifiable]", "agents.action.group_size=2",
    "agents.action.max_tokens=48", "agents.curriculum.tasks_per_proposal=2",
    "run.iterations=2", "run.max_retries=2",
]
"""A fast loop: tiny-random-llama on transformers (its plans are mostly not valid JSON, which
exercises the failure paths), no LLM curriculum or judge, 2 rounds x 2 tasks x G=2."""
FAST = [x for o in FAST_OVERRIDES for x in ("--set", o)] + ["--no-dashboard"]


def job_env_vars(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RUST_LOG="error", RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1", PATH=f"{Path(PY).parent}:{env.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def run_evolve_job(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    p = subprocess.run([PY, "jobs/evolve.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"evolve failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def ledger_episodes(run_dir: Path) -> list[dict]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r for r in rows if r["kind"] == "episode"]


def memory_ids(run_dir: Path) -> list[str]:
    import lancedb

    t = lancedb.connect(str(run_dir / "memory")).open_table("episodes")
    return t.to_arrow().column("id").to_pylist()


def check_complete(run_dir: Path, expected: int) -> list[dict]:
    eps = ledger_episodes(run_dir)
    ids = [r["id"] for r in eps]
    assert len(ids) == len(set(ids)), "an episode was written twice to the ledger"
    mem = memory_ids(run_dir)
    assert len(mem) == len(set(mem)), "memory holds a duplicate episode"
    assert set(mem) == set(ids) and len(ids) == expected, (len(ids), len(mem), expected)
    rounds = [json.loads(l) for l in (run_dir / "tasks.jsonl").read_text().splitlines()]
    G = len({r["sample"] for r in eps})
    assert sum(len(r["tasks"]) for r in rounds) * G == expected
    return eps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_episodes(run: Path, n: int, proc: subprocess.Popen, timeout: float = 400) -> None:
    """Wait until the ledger of ``run`` holds ``n`` distinct episodes while ``proc`` (the run's
    driver) is still running; fail the test if it ends first or the time runs out."""
    import time

    import pytest

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len({r["id"] for r in ledger_episodes(run)}) >= n:
            return
        time.sleep(0.3)
    assert proc.poll() is None, "the run ended before the fault could be injected"
    pytest.fail(f"fewer than {n} episodes after {timeout}s")
