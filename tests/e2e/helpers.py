"""Shared helpers of the end-to-end tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len({r["id"] for r in ledger_episodes(run)}) >= n:
            return
        time.sleep(0.3)
    assert proc.poll() is None, "the run ended before the fault could be injected"
    pytest.fail(f"fewer than {n} episodes after {timeout}s")


ACTORS_SCRIPT = """
import json, os, signal, sys
import ray
from ray.util.state import list_actors
ray.init(address="auto", log_to_driver=False)
action, marker = sys.argv[1], sys.argv[2]
alive = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if marker in (a.class_name or "")]
if action == "list":
    print("ACTORS", json.dumps(sorted(a.actor_id for a in alive)))
    sys.exit(0)
assert alive, f"no live actor whose class contains {marker!r}"
a = alive[0]
if a.name:  # named (Serve replicas, the memory actor): a restartable kill, as a crash would be
    ray.kill(ray.get_actor(a.name, namespace=a.ray_namespace), no_restart=False)
else:  # Ray Train workers are unnamed: kill the worker process (all on this machine)
    os.kill(a.pid, signal.SIGKILL)
print("KILLED", a.class_name, a.actor_id)
"""
"""Run in a fresh process (Ray reads RAY_AUTH_MODE at import) against the cluster of RAY_ADDRESS."""


def alive_actors(marker: str, env: dict[str, str]) -> list[str]:
    """Ids of the live actors whose class name contains ``marker`` (Ray's state API)."""
    p = subprocess.run([PY, "-c", ACTORS_SCRIPT, "list", marker], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("ACTORS ")]
    assert line, p.stdout[-1000:] + p.stderr[-2000:]
    return json.loads(line[0][len("ACTORS "):])


def kill_actor(marker: str, env: dict[str, str]) -> str:
    """Kill one live actor whose class name contains ``marker`` (a fault, as a crash would be)."""
    p = subprocess.run([PY, "-c", ACTORS_SCRIPT, "kill", marker], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert "KILLED" in p.stdout, p.stdout[-1000:] + p.stderr[-3000:]
    return p.stdout.strip()
