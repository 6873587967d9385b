"""Shared pytest fixtures. Keep this small; component fixtures live in their test files.
Shared plain helpers (test data factories) live in ``tests/factories.py``."""

from __future__ import annotations

import os
import subprocess

import pytest

from worldagent_ray.env import apply_env_defaults

apply_env_defaults(offline=True)  # tests never reach a model hub


@pytest.fixture(scope="session")
def tiny_llama_path() -> str:
    """Local folder of the builtin ``tiny-random-llama`` (built once into the cache)."""
    from worldagent_ray.models import resolve_model

    return resolve_model("tiny-random-llama")


@pytest.fixture(scope="session")
def tiny_engine(tiny_llama_path):
    """A session-wide transformers engine on ``tiny-random-llama`` (loads in about 1 s).

    Do not load weights into it; build your own engine for that.
    """
    from tests.factories import running_engine

    with running_engine(backend="transformers", model="tiny-random-llama", dtype="float32",
                        max_json_retries=1) as engine:
        yield engine


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module's tests (``pytest.mark.usefixtures("one_torch_thread")``).

    On a shared 2-core machine, 2 OpenMP threads spin against each other and a training step
    takes ~25x longer than with 1 thread; results do not depend on it.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- S3 (storage layer)
# A real S3-compatible server for the storage tests: moto's server mode, started once per
# session as a subprocess on 127.0.0.1 and always torn down. `s3_server` only starts it;
# `s3_env` puts its endpoint and test credentials into the environment of one test (so
# other tests never see them) and gives that test a fresh bucket.


class S3Server:
    """A running moto server: ``endpoint`` (http://127.0.0.1:port) and the ``env`` that
    points the storage layer at it."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }
        self._buckets = 0

    def create_bucket(self, prefix: str = "wa-test") -> str:
        """A new empty bucket; returns its name."""
        import os

        import boto3

        self._buckets += 1
        name = f"{prefix}-{os.getpid()}-{self._buckets}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=name)
        return name


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(log_path: str) -> tuple["subprocess.Popen", str]:
    """Start moto_server on a free port; retry with another port if it exits at once (the
    port was taken between choosing and binding). Readiness: an HTTP answer, 30 s at most."""
    import subprocess
    import sys
    import time
    import urllib.request

    for _ in range(3):
        port = _free_port()
        endpoint = f"http://127.0.0.1:{port}"
        log = open(log_path, "ab")
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                    return proc, endpoint
            except OSError:
                time.sleep(0.1)
        proc.kill()
        proc.wait(timeout=10)
    raise RuntimeError(f"moto server did not start on 127.0.0.1 within 30 s (log: {log_path})")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One moto S3 server for the session (subprocess on 127.0.0.1), killed at the end."""
    pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
    log_path = str(tmp_path_factory.mktemp("moto") / "moto.log")
    proc, endpoint = _start_moto(log_path)
    try:
        yield S3Server(endpoint)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except Exception:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The S3 server's endpoint and credentials in this test's environment, and a fresh
    bucket: yields ``s3://<bucket>`` (the root to write under)."""
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ROLE_ARN",
              "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return f"s3://{s3_server.create_bucket()}"


@pytest.fixture(params=["local", "file", "s3"])
def storage_root(request, tmp_path):
    """A fresh, empty run root of each kind the storage layer takes: a local path, a
    ``file://`` URI and an ``s3://`` URI on the test S3 server (through ``s3_env``)."""
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "file":
        return f"file://{tmp_path}/root"
    return request.getfixturevalue("s3_env") + "/root"


@pytest.fixture
def stalled_endpoint():
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a delay fault)."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    srv.settimeout(0.2)
    held: list = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join(timeout=5)
    for c in held:
        c.close()
    srv.close()


# --------------------------------------------------------------------------- token auth
# The simulated multi-node clusters (tests.factories.start_sim_cluster) and the e2e heads use
# token auth. Token auth everywhere: Ray 2.60 reads RAY_AUTH_MODE once per process (later changes are not
# seen) and turns token auth on only for clusters it starts itself, never when joining an
# address; so it is set here, before any test imports Ray. Local `ray.init()` clusters use token
# auth by default in 2.60 anyway, with the same ~/.ray/auth_token.
os.environ.setdefault("RAY_AUTH_MODE", "token")
