"""Long-lived services (issue 10.7): `serve deploy` starts the applications once; drivers run with
``--attach``, use them without redeploying, and leave them running; two drivers one after the
other share the same world replicas; scaling the world app while a driver runs loses nothing."""

from __future__ import annotations

import subprocess
import time

import pytest
import yaml

from tests.e2e.helpers import (
    FAST,
    FAST_OVERRIDES,
    PY,
    ROOT,
    alive_actors,
    check_complete,
    job_env_vars,
    wait_for_episodes,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray]

def serve_config(path, world_replicas: int) -> None:
    """The shipped local-cpu Serve config with the fast test settings; the world app's replica
    count is set on the world app alone (the other apps' config stays identical)."""
    cfg = yaml.safe_load((ROOT / "deployments" / "local-cpu.yaml").read_text())
    cfg["applications"] = [a for a in cfg["applications"] if a["name"] != "engine-judge"]  # no judge in FAST
    for a in cfg["applications"]:
        extra = [f"resources.world.replicas={world_replicas}"] if a["name"] == "world" else []
        a["args"]["overrides"] = [*FAST_OVERRIDES, *extra]
    path.write_text(yaml.safe_dump(cfg))


def wait_running(serve_bin, address, env, n_apps: int) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        st = subprocess.run([serve_bin, "status", "--address", address], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60).stdout
        apps = (yaml.safe_load(st) or {}).get("applications") or {}
        if len(apps) >= n_apps and all(a.get("status") == "RUNNING" for a in apps.values()):
            return
        time.sleep(2)
    pytest.fail(f"serve applications did not reach RUNNING:\n{st}")


def world_replicas(env) -> list[str]:
    return alive_actors("WorldDeployment", env)


def deployed_at(serve_bin, address, env) -> dict[str, float]:
    """Each Serve application's last deploy time: it changes only when the app is (re)deployed,
    not when Serve replaces an unhealthy replica (which a loaded machine may cause)."""
    st = subprocess.run([serve_bin, "status", "--address", address], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=60).stdout
    apps = (yaml.safe_load(st) or {}).get("applications") or {}
    return {name: a.get("last_deployed_time_s") for name, a in apps.items()}


def test_drivers_attach_share_replicas_and_survive_scaling(ray_head, tmp_path):
    from pathlib import Path

    env = job_env_vars(RAY_ADDRESS=ray_head["gcs"], RAY_AUTH_MODE="token")
    serve_bin = str(Path(PY).parent / "serve")
    conf = tmp_path / "serve.yaml"
    serve_config(conf, world_replicas=1)
    p = subprocess.run([serve_bin, "deploy", str(conf), "--address", ray_head["dashboard"]], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    wait_running(serve_bin, ray_head["dashboard"], env, 5)
    assert len(world_replicas(env)) == 1
    deployed = deployed_at(serve_bin, ray_head["dashboard"], env)

    # driver 1 attaches, runs, and leaves the applications running
    args = ["--attach", "--set", f"run.root={tmp_path}", *FAST]
    d1 = subprocess.run([PY, "jobs/evolve.py", "--run-name", "one", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
    assert d1.returncode == 0, d1.stdout[-3000:] + d1.stderr[-3000:]
    assert "attached to 5 running applications" in d1.stdout
    check_complete(tmp_path / "one", 8)
    assert deployed_at(serve_bin, ray_head["dashboard"], env) == deployed  # not redeployed by driver 1...
    assert len(world_replicas(env)) == 1  # ...and still running after it

    # driver 2 attaches to the same replicas; the world app is scaled to 2 replicas mid-run
    d2 = subprocess.Popen([PY, "jobs/evolve.py", "--run-name", "two", *args, "--set", "run.iterations=4"],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run2 = tmp_path / "two"
        wait_for_episodes(run2, 2, d2, timeout=300)
        serve_config(conf, world_replicas=2)
        p = subprocess.run([serve_bin, "deploy", str(conf), "--address", ray_head["dashboard"]], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        out, _ = d2.communicate(timeout=600)
        assert d2.returncode == 0, out[-4000:]
        assert "attached to 5 running applications" in out
    finally:
        if d2.poll() is None:
            d2.kill()
    check_complete(run2, 16)  # nothing lost across the scale-up
    after = world_replicas(env)
    deadline = time.time() + 120
    while len(after) < 2 and time.time() < deadline:
        time.sleep(2)
        after = world_replicas(env)
    assert len(after) == 2
