"""The storage layer on plain paths, file:// URIs and a real S3 server (moto on 127.0.0.1):
the same tests for each, plus credentials, deadlines, retries, LanceDB and pyarrow."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from worldagent_ray import storage
from worldagent_ray.storage import (StorageCredentialsError, StorageError, StorageNotFoundError,
                                    StorageTimeoutError)


def test_write_read_list_and_delete(storage_root):
    a = storage.join(storage_root, "videos", "t1", "a.bin")
    b = storage.join(storage_root, "videos", "t1", "b.bin")
    c = storage.join(storage_root, "videos", "t2", "c.bin")
    assert not storage.exists(a)
    for uri, data in ((a, b"alpha"), (b, b"\x00" * 1000), (c, b"")):
        assert storage.write_bytes(uri, data) == uri
    assert storage.read_bytes(a) == b"alpha" and storage.read_bytes(b) == b"\x00" * 1000
    assert storage.read_bytes(c) == b""
    assert storage.exists(a) and storage.size(b) == 1000
    assert storage.ls(storage.join(storage_root, "videos", "t1")) == [a, b]
    assert storage.ls(storage.join(storage_root, "videos")) == [storage.join(storage_root, "videos", "t1"),
                                                       storage.join(storage_root, "videos", "t2")]
    assert storage.find(storage_root) == [a, b, c]
    storage.write_bytes(a, b"overwritten")
    assert storage.read_bytes(a) == b"overwritten"
    storage.delete(a)
    assert not storage.exists(a) and storage.find(storage_root) == [b, c]
    storage.delete(storage.join(storage_root, "videos"), recursive=True)
    assert storage.find(storage_root) == []


def test_missing_objects_name_the_uri(storage_root):
    missing = storage.join(storage_root, "nope", "x.png")
    with pytest.raises(StorageNotFoundError, match="does not exist") as e:
        storage.read_bytes(missing)
    assert missing in str(e.value) and e.value.uri == missing
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(StorageNotFoundError, match="nope"):
        storage.ls(storage.join(storage_root, "nope"))
    assert storage.find(storage.join(storage_root, "nope")) == []


def test_max_bytes_refuses_before_download(storage_root):
    uri = storage.write_bytes(storage.join(storage_root, "big.bin"), b"x" * 2048)
    assert storage.read_bytes(uri, max_bytes=2048) == b"x" * 2048
    with pytest.raises(StorageError, match="2048 bytes, more than the 100-byte limit") as e:
        storage.read_bytes(uri, max_bytes=100)
    assert uri in str(e.value)


def test_makedirs_and_local_writes_leave_no_temp_files(storage_root):
    d = storage.makedirs(storage.join(storage_root, "a", "b"))
    storage.write_bytes(storage.join(d, "f.txt"), b"1")
    assert [u.rsplit("/", 1)[1] for u in storage.find(storage_root)] == ["f.txt"]


def test_another_process_reads_what_this_one_wrote(storage_root):
    """Frames written by a world replica on one node are read by the critic on another."""
    uri = storage.write_bytes(storage.join(storage_root, "frames", "f0.png"), b"\x89PNG-ish")
    code = ("import sys; from worldagent_ray import storage; "
            "sys.stdout.write(storage.read_bytes(sys.argv[1]).hex())")
    out = subprocess.run([sys.executable, "-c", code, uri], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr
    assert bytes.fromhex(out.stdout) == b"\x89PNG-ish"


def test_plain_paths_become_absolute_and_join_keeps_uri_style(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = storage.write_bytes("rel/x.txt", b"1")
    assert uri == str(tmp_path / "rel" / "x.txt")
    assert storage.join("s3://b/run/", "/videos/", "t.mp4") == "s3://b/run/videos/t.mp4"
    assert storage.join("file:///tmp/r", "a") == "file:///tmp/r/a"
    assert storage.local_path("file:///tmp/r/a") == "/tmp/r/a" and storage.local_path("s3://b/a") is None
    with pytest.raises(ValueError, match="non-empty"):
        storage.normalize("  ")


# --------------------------------------------------------------------------- credentials


def _no_aws_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)


def test_missing_credentials_are_a_clear_error(monkeypatch):
    _no_aws_env(monkeypatch)
    with pytest.raises(StorageCredentialsError) as e:
        storage.read_bytes("s3://bucket/run/x.png")
    msg = str(e.value)
    assert "s3://bucket/run/x.png" in msg and "AWS_ACCESS_KEY_ID" in msg and "AWS_SECRET_ACCESS_KEY" in msg
    assert "never from config files" in msg
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "only-the-id")
    with pytest.raises(StorageCredentialsError, match="AWS_SECRET_ACCESS_KEY is not set") as e:
        storage.write_bytes("s3://bucket/x", b"1")
    assert "only-the-id" not in str(e.value)
    with pytest.raises(StorageError, match="needs a bucket"):
        storage.exists("s3://")


def test_settings_come_from_the_environment_and_hide_secrets():
    env = {"AWS_ACCESS_KEY_ID": "AKIA-SECRET-ID", "AWS_SECRET_ACCESS_KEY": "top-secret",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:10",
           "AWS_REGION": "eu-west-1"}
    s = storage.s3_settings(env)
    assert s.endpoint_url == "http://127.0.0.1:10" and s.region == "eu-west-1" and s.allow_http
    assert "top-secret" not in repr(s) and "AKIA-SECRET-ID" not in repr(s)
    role = storage.s3_settings({"AWS_ROLE_ARN": "arn:aws:iam::1:role/r", "AWS_WEB_IDENTITY_TOKEN_FILE": "/t"})
    assert role.uses_role and role.key is None and role.region == "us-east-1"


def test_lancedb_storage_options_and_train_storage_for_local_roots(tmp_path):
    assert storage.lancedb_storage_options(str(tmp_path)) is None
    path, fs = storage.train_storage(f"file://{tmp_path}/ckpt")
    assert path == f"{tmp_path}/ckpt" and fs is None


# --------------------------------------------------------------------------- deadlines and retries


def test_a_stalled_s3_endpoint_times_out_naming_the_uri(stalled_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", stalled_endpoint)
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    t0 = time.monotonic()
    with pytest.raises(StorageTimeoutError) as e:
        storage.read_bytes("s3://bucket/run/frame.png", timeout_s=0.5, retries=1)
    assert time.monotonic() - t0 < 30  # bounded: 2 attempts of 0.5 s (generous slack for a busy box)
    assert "s3://bucket/run/frame.png" in str(e.value) and "2 attempt(s)" in str(e.value)
    with pytest.raises(StorageTimeoutError, match="write failed"):
        storage.write_bytes("s3://bucket/run/frame.png", b"x", timeout_s=0.5, retries=0)


def test_transient_errors_are_retried_and_permanent_ones_are_not(s3_env, monkeypatch):
    uri = storage.write_bytes(f"{s3_env}/x.bin", b"payload")
    fs, _ = storage.filesystem(uri)
    real = fs.cat_file
    calls = []

    def flaky(path, *a, **kw):  # injects two dropped connections, then lets the real call through
        calls.append(path)
        if len(calls) <= 2:
            raise ConnectionResetError(104, "Connection reset by peer")
        return real(path, *a, **kw)

    monkeypatch.setattr(fs, "cat_file", flaky)
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    assert storage.read_bytes(uri, retries=2) == b"payload" and len(calls) == 3
    calls.clear()
    with pytest.raises(StorageError, match="2 attempt") as e:
        storage.read_bytes(uri, retries=1)  # both attempts meet an injected fault
    assert "ConnectionResetError" in str(e.value) and uri in str(e.value) and len(calls) == 2


def test_no_retry_on_permanent_errors(s3_env, monkeypatch):
    uri = f"{s3_env}/missing.bin"
    fs, _ = storage.filesystem(uri)
    real = fs.cat_file
    calls = []

    def counting(path, *a, **kw):
        calls.append(path)
        return real(path, *a, **kw)

    monkeypatch.setattr(fs, "cat_file", counting)
    with pytest.raises(StorageNotFoundError):
        storage.read_bytes(uri, retries=3)
    assert len(calls) == 1


# --------------------------------------------------------------------------- other consumers on S3


def test_lancedb_on_s3_with_the_layers_options(s3_env):
    import lancedb
    import pyarrow as pa

    uri = f"{s3_env}/memory"
    db = lancedb.connect(uri, storage_options=storage.lancedb_storage_options(uri))
    db.create_table("episodes", pa.table({"id": ["a", "b"], "reward": [0.5, 1.0]}))
    db.open_table("episodes").add(pa.table({"id": ["c"], "reward": [0.0]}))
    again = lancedb.connect(uri, storage_options=storage.lancedb_storage_options(uri))
    assert sorted(again.open_table("episodes").to_arrow().column("id").to_pylist()) == ["a", "b", "c"]
    assert any("/memory/episodes.lance/" in u for u in storage.find(uri))


def test_pyarrow_filesystem_writes_checkpoints_under_the_same_root(s3_env, tmp_path):
    import pyarrow.fs as pafs

    ckpt = tmp_path / "checkpoint_000001"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"w" * 4096)
    (ckpt / "meta.json").write_text('{"step": 1}')
    path, fs = storage.train_storage(f"{s3_env}/checkpoints")
    assert not path.startswith("s3://") and isinstance(fs, pafs.FileSystem)
    pafs.copy_files(str(ckpt), f"{path}/checkpoint_000001", destination_filesystem=fs)
    assert storage.read_bytes(f"{s3_env}/checkpoints/checkpoint_000001/meta.json") == b'{"step": 1}'
    assert storage.size(f"{s3_env}/checkpoints/checkpoint_000001/model.safetensors") == 4096
