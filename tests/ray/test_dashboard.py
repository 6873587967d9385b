"""The Ray dashboard as the user's window, end to end.

A local Ray WITH its dashboard (bound to 127.0.0.1) runs a short real loop submitted with
``ray job submit`` (``tests/ray/dashboard_job.py``: real engine, world, critic, curriculum,
memory, learner on Ray Train, buffer and weight publisher). While the job holds, the test reads
back through the dashboard's own HTTP API (the Serve applications, the job) and through each
node's metrics agent (its Prometheus endpoint, found from ``ray.nodes()``'s
``MetricsExportPort``), and asserts that every series a panel of the shipped Grafana
dashboard reads has a sample, with values that agree with what the run committed. Then it
releases the job and checks its orderly shutdown: apps deleted, job SUCCEEDED, no Ray error
noise after the summary. Every wait is bounded; the metric export is periodic (1 s here),
so it is polled with a deadline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from worldagent_ray.runtime.grafana import DASHBOARD_FILE, panel_series
from worldagent_ray.schemas import SCORE_DIMENSIONS

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
APPS = {"engine-policy", "world", "critic", "curriculum", "action"}
EXPECTED_EPISODES, EXPECTED_FAILED = 8, 2  # 2 rounds x 2 tasks x 2 samples; the first task's group fails


@pytest.fixture(scope="module")
def cluster():
    """A `ray start` cluster for the module (a head with the dashboard on 127.0.0.1 and one node
    of 4 CPUs, every port chosen free, so other Rays on the machine cannot collide with it),
    metrics exported every second; this process joins it. (A local ``ray.init()`` would take
    the fixed dashboard-agent port, and its job supervisor resolves RAY_ADDRESS="auto" to ANY
    gcs_server on the machine: a job once joined another test's Ray.)"""
    import ray

    from tests.factories import start_sim_cluster, stop_sim_cluster

    sim = start_sim_cluster({"worker": {"resources": {"CPU": 4}, "labels": {"role": "worker"}}},
                            system_config={"metrics_report_interval_ms": 1000})
    try:
        ray.init(address=sim.gcs, log_to_driver=False, namespace="test-dashboard")
        yield {"dashboard": sim.dashboard}
    finally:
        ray.shutdown()
        stop_sim_cluster(sim)


def _get(url: str, timeout_s: float = 10.0):
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    req = urllib.request.Request(url, headers=get_auth_headers_if_auth_enabled({}))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    with opener.open(req, timeout=timeout_s) as r:
        body = r.read().decode()
    return json.loads(body) if r.headers.get_content_type() == "application/json" else body


def _scrape() -> dict[str, list[tuple[dict, float]]]:
    """Every sample of every node's metrics agent, by sample name."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[tuple[dict, float]]] = defaultdict(list)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert nodes and all(n.get("MetricsExportPort") for n in nodes), nodes
    for n in nodes:
        text = _get(f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics")
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name.startswith("ray_worldagent_"):
                    samples[s.name].append((s.labels, s.value))
    return samples


def _total(samples, name: str, **labels: str) -> float:
    return sum(v for ls, v in samples.get(name, []) if all(ls.get(k) == x for k, x in labels.items()))


def _job_logs(base: str, sid: str) -> str:
    return _get(f"{base}/api/jobs/{sid}/logs").get("logs", "")


def test_dashboard_json_installs_beside_rays_own(cluster):
    from worldagent_ray.runtime.grafana import build_dashboard, install_for_this_session

    path = install_for_this_session()
    assert path is not None and path.name == DASHBOARD_FILE
    assert (path.parent / "default_grafana_dashboard.json").exists(), sorted(p.name for p in path.parent.iterdir())
    assert json.loads(path.read_text()) == build_dashboard()


def test_dashboard_shows_serve_apps_job_and_every_panel_metric(cluster, tmp_path):
    base = cluster["dashboard"]
    wanted = panel_series(json.loads((ROOT / "deployments" / "grafana" / DASHBOARD_FILE).read_text()))
    release = tmp_path / "release"
    sid = f"wa-dashboard-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    runtime_env = {"working_dir": str(ROOT), "excludes": ["test-artifacts", "runs", ".git", "*.png"]}
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", base, "--no-wait",
           "--submission-id", sid, "--runtime-env-json", json.dumps(runtime_env), "--",
           sys.executable, "-m", "tests.ray.dashboard_job", "--root", str(tmp_path / "runs"), "--release", str(release),
           "--hold-timeout-s", "600"]
    deadline = time.monotonic() + 120
    while True:  # the dashboard answers a little before the node's job agent has registered
        submit = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        if "No available agent" not in submit.stdout + submit.stderr or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]

    seen: set[str] = set()
    apps_running: set[str] = set()
    loop: dict | None = None
    samples: dict = {}

    def disagreements() -> list[str]:
        """What the metrics export does not (yet) show of the finished loop. The export is
        periodic, so the last increments may arrive a second after LOOP_DONE."""
        if loop is None:
            return ["the loop has not finished"]
        out = [f"not exported: {m}" for m in sorted(wanted - seen)]
        out += [f"app not seen RUNNING: {a}" for a in sorted(APPS - apps_running)]
        run, ok = loop["run_id"], EXPECTED_EPISODES - EXPECTED_FAILED
        ledger = [json.loads(l) for l in (Path(loop["run"]) / "metrics.jsonl").read_text().splitlines() if l.strip()]
        successes = sum(1 for r in ledger if r["kind"] == "episode" and r["success"])
        checks = [  # (what, exported value, expected); the run id tags the driver's series
            ("episodes", _total(samples, "ray_worldagent_episodes_total", run=run), EXPECTED_EPISODES),
            ("failed episodes", _total(samples, "ray_worldagent_episodes_total", run=run, status="failed"),
             EXPECTED_FAILED),
            ("successes (0 is exported as 0)", _total(samples, "ray_worldagent_success_total", run=run), successes),
            *((f"{d} scores", _total(samples, "ray_worldagent_critic_score_count", run=run, dimension=d), ok)
              for d in SCORE_DIMENSIONS),
            ("world retries (2 + 1 injected faults)",
             _total(samples, "ray_worldagent_retries_total", run=run, stage="world"), 3),
            ("rollouts (the failed group never rendered)", _total(samples, "ray_worldagent_world_rollouts_total"), ok),
            ("groups the buffer refused", _total(samples, "ray_worldagent_buffer_dropped_total", buffer=run), 1),
        ]
        out += [f"{what}: exported {got}, expected {want}" for what, got, want in checks if got != want]
        if _total(samples, "ray_worldagent_learner_steps_total") < 1:  # the learner steps on its own clock
            out.append("no learner step exported yet")
        return out

    try:
        deadline = time.monotonic() + 360  # the job holds for 600 s: the test always releases it
        while True:
            job = _get(f"{base}/api/jobs/{sid}")
            if loop is None:
                for line in _job_logs(base, sid).splitlines():
                    if line.startswith("LOOP_DONE "):
                        loop = json.loads(line[len("LOOP_DONE "):])
            apps = _get(f"{base}/api/serve/applications/").get("applications") or {}
            apps_running |= {name for name, a in apps.items() if a.get("status") == "RUNNING"}
            samples = _scrape()
            seen |= set(samples)
            problems = disagreements()
            if not problems:
                break
            assert job["status"] in ("PENDING", "RUNNING") and time.monotonic() < deadline, (
                f"job {job['status']}; {problems}; loop: {loop}\n{_job_logs(base, sid)[-4000:]}")
            time.sleep(1.0)
    finally:
        release.write_text("done")

    assert loop["episodes"] == EXPECTED_EPISODES and loop["failed"] == EXPECTED_FAILED, loop
    assert loop["refed_refused"] is True and loop["progress_lines"] >= 1, loop
    assert any(ls.get("replica") for ls, _ in samples["ray_worldagent_engine_weights_version"])
    assert any(ls.get("replica") for ls, _ in samples["ray_worldagent_world_batch_seconds_count"])

    # the job, as the dashboard lists it, succeeds once released; the apps are gone after it
    deadline = time.monotonic() + 240
    while (job := _get(f"{base}/api/jobs/{sid}"))["status"] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"job still {job['status']} 240 s after release"
        time.sleep(1.0)
    logs = _job_logs(base, sid)
    assert job["status"] == "SUCCEEDED", logs[-5000:]
    listed = {j["submission_id"]: j for j in _get(f"{base}/api/jobs/")}
    assert listed[sid]["status"] == "SUCCEEDED" and "tests.ray.dashboard_job" in listed[sid]["entrypoint"]
    assert f"JOB_URL {base}/#/jobs/{sid}" in logs  # the link a run prints on a cluster
    summary = json.loads(logs.split("SUMMARY ", 1)[1].splitlines()[0])
    assert summary["shutdown_problems"] == [] and summary["learner_error"] is None, summary
    assert "killed by `ray.kill`" not in logs and "Traceback" not in logs, logs[-5000:]
    apps = _get(f"{base}/api/serve/applications/").get("applications") or {}
    assert not (APPS & set(apps)), f"apps left behind: {sorted(apps)}"
