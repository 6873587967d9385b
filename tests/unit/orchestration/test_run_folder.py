"""The run folder's ledgers survive torn writes (issue 9.4): a writer killed mid-line loses only
that line, which is kept aside; every complete row reads back, and later appends are intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from worldagent_ray.orchestration.run_folder import Ledger, RunFolder


def test_rows_after_a_torn_line_are_not_glued_onto_it(tmp_path):
    led = Ledger(tmp_path / "metrics.jsonl")
    led.append([{"kind": "event", "n": "a"}])
    with open(led.path, "ab") as f:  # a crash in the middle of row b
        f.write(b'{"kind": "event", "n": "b", "pad": "xxxx')
    reopened = Ledger(led.path)  # a new process opens the ledger and appends c, d
    reopened.append([{"kind": "event", "n": "c"}])
    reopened.append([{"kind": "event", "n": "d"}])
    assert [r["n"] for r in reopened.rows()] == ["a", "c", "d"]
    assert reopened.skipped == 0
    torn = (tmp_path / "metrics.jsonl.torn").read_bytes()
    assert torn.startswith(b'{"kind": "event", "n": "b"')  # kept, not silently dropped


def test_reader_skips_a_torn_tail_without_writing(tmp_path):
    led = Ledger(tmp_path / "x.jsonl")
    led.append([{"i": 1}, {"i": 2}])
    with open(led.path, "ab") as f:
        f.write(b'{"i": 3')
    reader = Ledger(led.path)
    assert [r["i"] for r in reader.rows()] == [1, 2] and reader.skipped == 1
    assert led.path.read_bytes().endswith(b'{"i": 3')  # reading never changes the file


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from worldagent_ray.orchestration.run_folder import Ledger
    led = Ledger(Path(sys.argv[1]))
    i = 0
    big = "x" * 200_000   # rows large enough that a kill lands mid-write
    while True:
        led.append([{"kind": "event", "i": i, "pad": big}])
        print(i, flush=True)
        i += 1
""")


@pytest.mark.timeout(120)
def test_a_writer_killed_mid_line_loses_only_that_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    torn_seen = False
    for trial in range(6):
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True, env=env)
        acked = []
        deadline = time.monotonic() + 60
        while len(acked) < 3 + trial and time.monotonic() < deadline:
            acked.append(int(proc.stdout.readline()))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        torn_seen |= not path.read_bytes().endswith(b"\n")
        led = Ledger(path)
        led.repair()
        rows = [r["i"] for r in led.rows() if r.get("kind") == "event"]
        # every row the writer reported as written (fsynced) is there, in order, exactly once
        assert set(acked) <= set(rows)
        assert led.skipped == 0 and path.read_bytes().endswith(b"\n")
        led.append([{"kind": "marker", "trial": trial}])
        assert list(led.rows())[-1] == {"kind": "marker", "trial": trial}
    all_rows = list(Ledger(path).rows())
    assert len([r for r in all_rows if r.get("kind") == "marker"]) == 6
    if torn_seen:
        assert (tmp_path / "metrics.jsonl.torn").exists()


def test_run_folder_repairs_both_ledgers_on_open(tmp_path):
    from tests.unit.orchestration.fakes import fast_config

    cfg = fast_config()
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"root": str(tmp_path)})})
    run = RunFolder.create(cfg, "torn")
    run.record_event("one")
    with open(run.metrics_path, "ab") as f:
        f.write(b'{"kind": "ev')
    with open(run.tasks_path, "ab") as f:
        f.write(b'{"kind": "round", "round": 0, "tas')
    reopened = RunFolder.open(run.local)
    assert reopened.rounds() == []
    reopened.record_event("two")
    assert [e["event"] for e in reopened.events()] == ["one", "two"]
    assert json.loads((run.local / "run.json").read_text())["run_id"] == "torn"


def test_ledgers_are_mirrored_to_a_uri_run_root_and_a_failed_copy_is_retried(s3_env, s3_server, tmp_path):
    """With the run root on S3 the local folder is only a working copy: after every write the
    ledger is copied under the run root. A copy that fails (here: the bucket does not exist
    yet) is counted, the local row is kept, and the next write copies the whole ledger."""
    from worldagent_ray import storage

    missing = f"{s3_env}-later"  # a bucket that does not exist yet
    run = RunFolder(tmp_path / "r1", artifacts=f"{missing}/runs/r1")
    run.record_event("first")
    assert run.mirror_errors == 1 and [e["event"] for e in run.events()] == ["first"]
    import boto3

    boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=missing.removeprefix("s3://"))
    run.record_event("second")
    copy = storage.read_bytes(f"{missing}/runs/r1/metrics.jsonl")
    assert copy == run.metrics_path.read_bytes()
    assert [json.loads(line)["event"] for line in copy.decode().splitlines()] == ["first", "second"]

    ok = RunFolder(tmp_path / "r2", artifacts=f"{s3_env}/runs/r2")
    assert ok.mirror() == 0  # nothing written yet
    ok.record_event("x")
    assert ok.mirror_errors == 0 and storage.exists(f"{s3_env}/runs/r2/metrics.jsonl")
    local = RunFolder(tmp_path / "r3")  # a local run root: the ledgers are already there
    local.record_event("y")
    assert local.mirror() == 0
