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

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
FAST = [
    "--set", "engines.policy.model=tiny-random-llama", "--set", "engines.policy.backend=transformers",
    "--set", "engines.policy.max_json_retries=0", "--set", "agents.curriculum.use_llm=false",
    "--set", "agents.critic.scorers=[verifiable]", "--set", "agents.action.group_size=2",
    "--set", "agents.action.max_tokens=48", "--set", "agents.curriculum.tasks_per_proposal=2",
    "--set", "run.iterations=2", "--set", "run.max_retries=2", "--no-dashboard",
]
EXPECTED = 2 * 2 * 2  # iterations x tasks x G

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RUST_LOG="error", RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1", PATH=f"{Path(PY).parent}:{env.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
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
    rounds = [json.loads(l) for l in (run_dir / "tasks.jsonl").read_text().splitlines()]
    G = len({r["sample"] for r in eps})
    assert sum(len(r["tasks"]) for r in rounds) * G == expected
    return eps


def test_plain_python_runs_loop_and_writes_report(tmp_path):
    args = [a for a in FAST if a != "--no-dashboard"]
    p = _evolve(["--run-name", "plain", "--set", f"run.root={tmp_path}", *args], _env())
    run = tmp_path / "plain"
    eps = _check_complete(run, EXPECTED)
    assert all(r["status"] in ("ok", "failed") for r in eps)
    assert all(r["status"] == "failed" or r["scores"] is not None for r in eps)
    report = (run / "report.html").read_text()
    assert "Reward and success over time" in report and "<svg" in report
    assert report.count('class="group"') == EXPECTED // 2
    assert "episodes/s" in p.stdout and str(run / "report.html") in p.stdout
    assert "dashboard: http://127.0.0.1:" in p.stdout and "serve applications: engine-policy, world" in p.stdout
    assert (run / "config.yaml").exists() and json.loads((run / "curriculum.json").read_text())["proposed"] == 4


def test_ctrl_c_then_resume_has_every_episode_once(tmp_path):
    env = _env()
    run = tmp_path / "r"
    args = ["--run-name", "r", "--set", f"run.root={tmp_path}", *FAST, "--set", "run.iterations=4"]
    proc = subprocess.Popen([PY, "jobs/evolve.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").exists() and len(_episodes(run)) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert f"--resume {run}" in out
    first = {r["id"] for r in _episodes(run)}
    assert 2 <= len(first) < 2 * EXPECTED, "the first part must stop early"
    _evolve(["--resume", str(run)], env)
    eps = _check_complete(run, 2 * EXPECTED)
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
    env = _env(RAY_AUTH_MODE="token")  # the head and every client share ~/.ray/auth_token
    proc = subprocess.Popen(
        [str(Path(PY).parent / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--temp-dir={tmp}",
         # every port free, so that another Ray on the machine never collides with this one
         *(f"--{flag}={_free_port()}" for flag in (
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port"))],
        cwd=ROOT, env=env, stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    for _ in range(120):
        try:
            opener.open(f"{url}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # it answers (401 when token auth is on): the head is up
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
    env = _env(RAY_AUTH_MODE="token")
    ray_bin = str(Path(PY).parent / "ray")
    for _ in range(12):  # the dashboard answers a little before its job agent registers
        p = subprocess.run(
            [ray_bin, "job", "submit", "--address", ray_head["dashboard"], "--working-dir", ".", "--",
             "python", "jobs/evolve.py", "--run-name", "job", "--set", f"run.root={tmp_path}", *FAST],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )
        if "No available agent" not in p.stdout + p.stderr:
            break
        time.sleep(5)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
    assert "succeeded" in (p.stdout + p.stderr).lower()
    _check_complete(tmp_path / "job", EXPECTED)


KILL_WORLD_REPLICA = """
import ray
from ray.util.state import list_actors
ray.init(address="auto", namespace="worldagent-test", log_to_driver=False)
alive = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "WorldDeployment" in (a.class_name or "")]
assert alive, "no world replica found"
ray.kill(ray.get_actor(alive[0].name, namespace="serve"), no_restart=False)
print("KILLED", alive[0].name)
"""


def test_killing_a_world_replica_loses_no_episode(ray_head, tmp_path):
    # Ray reads RAY_AUTH_MODE at import, so the fault is injected from a fresh process.
    env = _env(RAY_ADDRESS=ray_head["gcs"], RAY_AUTH_MODE="token")
    args = ["--run-name", "fault", "--set", f"run.root={tmp_path}", *FAST, "--set", "run.iterations=3"]
    proc = subprocess.Popen([PY, "jobs/evolve.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    run = tmp_path / "fault"
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").exists() and len(_episodes(run)) >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "run ended before the fault could be injected"
        kill = subprocess.run([PY, "-c", KILL_WORLD_REPLICA], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        assert "KILLED" in kill.stdout, kill.stdout[-2000:] + kill.stderr[-3000:]
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    eps = _check_complete(run, 3 * 2 * 2)
    failed = [r for r in eps if r["status"] == "failed"]
    assert all(r["failure"] for r in failed), "a failed episode must say why"


@pytest.mark.vllm
def test_evolve_smollm2_vllm(tmp_path):
    """The embedded default: SmolLM2 on vLLM-CPU writes vocabulary-constrained JSON plans."""
    p = _evolve(["--run-name", "smol", "--set", f"run.root={tmp_path}", "--set", "engines.policy.backend=vllm",
                 "--set", "run.iterations=2", "--set", "agents.action.group_size=2",
                 "--set", "agents.curriculum.tasks_per_proposal=2", "--json"], _env(), timeout=900)
    eps = _check_complete(tmp_path / "smol", EXPECTED)
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
    p = _evolve(args, _env(), timeout=900)
    summary = json.loads(p.stdout.split("SUMMARY ", 1)[1].splitlines()[0])
    learner = summary["learner"]
    assert "error" not in learner, learner
    assert learner["fed_groups"] >= 1 and learner.get("policy_version", 0) >= 1, learner
    eps = _episodes(tmp_path / "learn")
    assert max(r["policy_version"] for r in eps) >= 1, "no episode was generated with updated weights"
    ckpts = list((tmp_path / "learn" / "learner").rglob("checkpoint_*"))
    assert ckpts, "the learner must checkpoint through Ray Train"
