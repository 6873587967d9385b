"""End to end: the loop on a local Ray, launched both ways, resumed, and with a replica killed.

These start Ray, Serve and every deployment, so each takes about a minute; they are marked
slow and run in CI. The policy is ``tiny-random-llama`` on transformers (fast; its plans are
mostly not valid JSON, which exercises the failure paths); the SmolLM2/vLLM run is in
``test_evolve_smollm2_vllm``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
FAST = [
    "--set", "engines.policy.model=tiny-random-llama", "--set", "engines.policy.backend=transformers",
    "--set", "engines.policy.max_json_retries=0", "--set", "agents.curriculum.use_llm=false",
    "--set", "agents.critic.scorers=[verifiable]", "--set", "agents.action.group_size=2",
    "--set", "agents.action.max_tokens=48", "--set", "agents.curriculum.tasks_per_proposal=2",
    "--set", "run.iterations=2", "--set", "run.max_retries=2",
]
EXPECTED = 2 * 2 * 2  # iterations x tasks x G

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RUST_LOG="error", RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1", PATH=f"{Path(PY).parent}:{env.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def _evolve(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    p = subprocess.run([PY, "jobs/evolve.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"evolve failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def _episodes(run_dir: Path) -> list[dict]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r for r in rows if r["kind"] == "episode"]


def _memory_ids(run_dir: Path) -> list[str]:
    import lancedb

    t = lancedb.connect(str(run_dir / "memory")).open_table("episodes")
    return t.to_arrow().column("id").to_pylist()


def _check_complete(run_dir: Path, expected: int) -> list[dict]:
    eps = _episodes(run_dir)
    ids = [r["id"] for r in eps]
    assert len(ids) == len(set(ids)), "an episode was written twice to the ledger"
    mem = _memory_ids(run_dir)
    assert len(mem) == len(set(mem)), "memory holds a duplicate episode"
    assert set(mem) == set(ids) and len(ids) == expected, (len(ids), len(mem), expected)
    tasks = [json.loads(l) for l in (run_dir / "tasks.jsonl").read_text().splitlines()]
    assert len(tasks) * 2 == expected
    return eps


def test_plain_python_runs_loop_and_writes_report(tmp_path):
    p = _evolve(["--run-name", "plain", "--set", f"run.root={tmp_path}", *FAST], _env())
    run = tmp_path / "plain"
    eps = _check_complete(run, EXPECTED)
    assert all(r["status"] in ("ok", "failed") for r in eps)
    assert all(r["status"] == "failed" or r["scores"] is not None for r in eps)
    report = (run / "report.html").read_text()
    assert "Reward and success over time" in report and "<svg" in report
    assert report.count('class="group"') == EXPECTED // 2
    assert "episodes/s" in p.stdout and str(run / "report.html") in p.stdout
    assert (run / "config.yaml").exists() and json.loads((run / "curriculum.json").read_text())["proposed"] == 4


def test_stop_then_resume_has_every_episode_once(tmp_path):
    env = _env()
    _evolve(["--run-name", "r", "--set", f"run.root={tmp_path}", "--stop-after-episodes", "3", *FAST], env)
    run = tmp_path / "r"
    first = {r["id"] for r in _episodes(run)}
    assert 2 <= len(first) < EXPECTED, "the first part must stop early"
    _evolve(["--resume", str(run)], env)
    eps = _check_complete(run, EXPECTED)
    assert first <= {r["id"] for r in eps}, "resume must keep what the first part wrote"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A `ray start --head` cluster in its own process group, torn down without `ray stop`
    (which would kill every Ray on the machine)."""
    gcs, dash = _free_port(), _free_port()
    tmp = tmp_path_factory.mktemp("rayhead")
    env = _env()
    proc = subprocess.Popen(
        [str(Path(PY).parent / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--temp-dir={tmp}"],
        cwd=ROOT, env=env, stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    import urllib.request

    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except Exception:
            time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail(f"ray head did not start: {(tmp / 'head.log').read_text()[-2000:]}")
    yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": url}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_ray_job_submit(ray_head, tmp_path):
    env = _env()
    ray_bin = str(Path(PY).parent / "ray")
    p = subprocess.run(
        [ray_bin, "job", "submit", "--address", ray_head["dashboard"], "--working-dir", ".", "--",
         "python", "jobs/evolve.py", "--run-name", "job", "--set", f"run.root={tmp_path}", *FAST],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
    assert "succeeded" in (p.stdout + p.stderr).lower()
    _check_complete(tmp_path / "job", EXPECTED)


def test_killing_a_world_replica_loses_no_episode(ray_head, tmp_path):
    import ray

    env = _env(RAY_ADDRESS=ray_head["gcs"])
    args = ["--run-name", "fault", "--set", f"run.root={tmp_path}", *FAST, "--set", "run.iterations=3"]
    proc = subprocess.Popen([PY, "jobs/evolve.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    run = tmp_path / "fault"
    ray.init(address=ray_head["gcs"], namespace="worldagent-test")
    try:
        from ray.util.state import list_actors

        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").exists() and len(_episodes(run)) >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "run ended before the fault could be injected"
        replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")])
                    if "WorldService" in (a.class_name or "")]
        assert replicas, "no world replica found"
        killed = ray.get_actor(replicas[0].name, namespace="serve")
        ray.kill(killed, no_restart=False)  # Serve's controller brings a new replica up
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        ray.shutdown()
    eps = _check_complete(run, 3 * 2 * 2)
    failed = [r for r in eps if r["status"] == "failed"]
    assert all(r["failure"] for r in failed), "a failed episode must say why"
