"""The `ray start --head` fixture of the end-to-end tests (helpers are in helpers.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.e2e.helpers import PY, free_port, job_env_vars
from tests.factories import ensure_auth_token, kill_group, start_node


@pytest.fixture(scope="module")
def ray_head():
    """A `ray start --head` cluster in its own process group, torn down without `ray stop`
    (which would kill every Ray on the machine). One per test file: a session-wide head outlived
    its file by the rest of the worker's tests (an idle Ray still costs CPU on 2 cores)."""
    gcs, dash = free_port(), free_port()
    # A short temp dir: Ray's socket paths must stay under 107 bytes, which pytest's nested
    # tmp folders (with a worker folder under pytest-xdist) can exceed.
    tmp = Path(tempfile.mkdtemp(prefix="wa-head-", dir="/tmp"))
    ensure_auth_token()  # `ray start` in token mode needs it; a fresh machine has none
    env = job_env_vars(RAY_AUTH_MODE="token")  # the head and every client share ~/.ray/auth_token
    cmd = [str(Path(PY).parent / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=4",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--temp-dir={tmp}",
           # every port free, so that another Ray on the machine never collides with this one
           *(f"--{flag}={free_port()}" for flag in (
               "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
               "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port"))]
    # started again if it gives up (Ray waits a fixed 30 s for the node to register)
    proc = start_node("head", cmd, env, tmp, deadline_s=180)
    url = f"http://127.0.0.1:{dash}"
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # a head that died is reported at once
        try:
            opener.open(f"{url}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # it answers (401 when token auth is on): the head is up
        except Exception:
            time.sleep(1)
    else:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail(f"ray head's dashboard did not answer (exit {proc.poll()}): "
                    f"{(tmp / 'head.log').read_text()[-2000:]}")
    yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": url}
    # SIGTERM, then SIGKILL whatever is left of the group: `ray start --block` alone took over
    # 30 s to exit on SIGTERM (the test run waited for it)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    kill_group(proc)
    shutil.rmtree(tmp, ignore_errors=True)
