"""The cluster shape end to end (issue 10, "Done when"): the simulated 3-node cluster (a head
with no work, an ``llm`` and a ``video`` node mirroring cluster/rayjob.yaml, their labels and
custom resources checked first) and a local S3 server; ``ray job submit ... python
jobs/evolve.py --profile cluster-sim --learn`` runs five rounds, one at a time; then every
episode, video and checkpoint is under the S3 root, world replicas ran only on the video node,
engines only on the llm node, the Serve controller on the head, the learner with 2 workers (on
the llm node), both
policy engine replicas served ``policy_version >= 1`` (published by the collective broadcast,
gloo here; a later round planned with it) and the judge scored frames read from S3. The random
tiny VLM writes its plans and verdicts under grammar-constrained decoding (xgrammar in the
transformers engine), so they parse: most episodes are rendered and judged.

It skips, naming what is missing, only when a prerequisite is not installed (moto, s3fs).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.factories import (
    GROUP_LABEL,
    SIM_JOB,
    rayjob_groups,
    sim_nodes,
    start_sim_cluster,
    stop_sim_cluster,
)
from worldagent_ray.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "worldagent-sim"  # fixed in worldagent_ray/configs/cluster-sim.yaml
RUN = "e2e-cluster-sim"
JOB_TIMEOUT_S = 540
# Random tiny models: every group's rewards may be equal, so keep such groups for the learner
# (otherwise it never steps); one group per step and a checkpoint every step. One round in flight
# and five rounds: round r is proposed only once round r-1 has committed, and the learner has held
# round 1's groups since round 2 began, so the later rounds plan with published weights. (On a
# quiet machine version 1 is out ~5 s before round 3 starts; rounds 4 and 5 are the margin for a
# loaded one. The driver has no version gate; see the README's known limits.)
OVERRIDES = ["learner.drop_zero_variance=false", "learner.groups_per_step=1", "learner.checkpoint_every=1",
             "learner.max_staleness=4", "run.lookahead_rounds=1", "run.iterations=5"]


def _missing_prerequisites() -> list[str]:
    from worldagent_ray.models import is_builtin

    missing = []
    if importlib.util.find_spec("worldagent_ray.storage") is None:
        missing.append("worldagent_ray.storage (wp-storage)")
    if not is_builtin("tiny-random-qwen2.5-vl"):
        missing.append("the tiny-random-qwen2.5-vl builtin (wp-learner)")
    runtime = "\n".join(p.read_text() for p in (ROOT / "worldagent_ray" / "runtime").glob("*.py"))
    if not re.search(r"\.sync_method\b", runtime):
        missing.append("learner.sync_method wired in runtime/ (collective weight sync)")
    for mod in ("moto", "s3fs"):
        if importlib.util.find_spec(mod) is None:
            missing.append(f"the {mod} package")
    return missing


MISSING = _missing_prerequisites()
if MISSING:
    pytestmark.append(pytest.mark.skip(reason="cluster-sim e2e needs: " + "; ".join(MISSING)))


@pytest.fixture(scope="module")
def s3(request):
    """The session's moto S3 server (tests/conftest.py, wp-storage) with the fixed bucket."""
    import boto3

    server = request.getfixturevalue("s3_server")
    boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    return server


@pytest.fixture(scope="module")
def cluster(s3):
    """The simulated cluster; its nodes get the S3 endpoint and test credentials in their
    environment (as pods get them from a Secret or IRSA), so Ray workers read and write the bucket;
    the job itself never forwards them."""
    import os

    cfg = load_config("cluster-sim", environ={})
    nodes = sim_nodes(cfg, rayjob_groups(yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())))
    env = dict(os.environ, **s3.env, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RUST_LOG="error",
               PYTHONPATH=str(ROOT))  # workers import this checkout (as the image's installed package on a cluster)
    c = start_sim_cluster(nodes, env=env)
    try:
        yield c
    finally:
        stop_sim_cluster(c)


STATE = """
import json, sys
from ray.util.state import list_actors, list_nodes
if sys.argv[2] == "actors":
    rows = list_actors(address=sys.argv[1], limit=10000, detail=True, raise_on_missing_output=False)
    print("STATE " + json.dumps([{"cls": a.class_name, "node": a.node_id, "state": a.state} for a in rows]))
else:
    rows = list_nodes(address=sys.argv[1], filters=[("state", "=", "ALIVE")], detail=True)
    print("STATE " + json.dumps([{"id": n.node_id, "head": n.is_head_node, "labels": n.labels,
                                  "resources": n.resources_total} for n in rows]))
"""


def state(cluster, what: str) -> list[dict]:
    """Every actor the cluster ran (alive or dead) with its node (``what="actors"``), or every
    live node with its labels and resources (``"nodes"``), through Ray's state API (in a client
    process with the cluster's token auth)."""
    p = subprocess.run([sys.executable, "-c", STATE, cluster.dashboard, what], env=cluster.env, capture_output=True,
                       text=True, timeout=120)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("STATE ")]
    assert line, p.stdout[-1000:] + p.stderr[-2000:]
    return json.loads(line[0][len("STATE "):])


def test_nodes_mirror_the_rayjob_worker_groups(cluster):
    """A head with no work; an ``llm`` and a ``video`` node with their group's labels (its own,
    and the one Ray derives from RAY_NODE_TYPE_NAME as on KubeRay) and custom resources that
    stand in for GPUs."""
    nodes = {n["id"]: n for n in state(cluster, "nodes")}
    assert set(nodes) == set(cluster.nodes.values())
    head, llm, video = (nodes[cluster.nodes[g]] for g in ("head", "llm", "video"))
    assert head["head"] and head["resources"].get("CPU", 0) == 0
    for node, group in ((llm, "llm"), (video, "video")):
        assert node["labels"][GROUP_LABEL] == group and node["labels"]["ray.io/node-group"] == group
        assert node["resources"].get("GPU", 0) == 0
    assert llm["resources"]["llm_gpu"] == 5 and "video_gpu" not in llm["resources"]
    assert video["resources"]["video_gpu"] == 2 and "llm_gpu" not in video["resources"]


def test_evolve_on_the_simulated_cluster_with_s3(cluster, s3, monkeypatch):
    from worldagent_ray import storage

    for k, v in s3.env.items():  # this process reads the bucket afterwards
        monkeypatch.setenv(k, v)
    cfg = load_config("cluster-sim", overrides=OVERRIDES, environ={})
    ray_bin = str(Path(sys.executable).parent / "ray")
    # the `ray job submit` of cluster/local.md (+ a run name, the JSON summary and the test overrides)
    cmd = [ray_bin, "job", "submit", "--address", cluster.dashboard, "--working-dir", ".", "--", *SIM_JOB,
           "--run-name", RUN, "--json", *(x for o in OVERRIDES for x in ("--set", o))]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    elapsed = time.time() - t0
    assert p.returncode == 0 and "succeeded" in p.stdout, \
        f"job failed after {elapsed:.0f}s:\n{p.stdout[-6000:]}\n{p.stderr[-3000:]}"
    summary = json.loads(p.stdout.split("SUMMARY ", 1)[1].splitlines()[0])

    # every episode, video and checkpoint under the S3 root
    run_root = f"{cfg.run.root.rstrip('/')}/{RUN}"
    assert run_root.startswith(f"s3://{BUCKET}/")
    ledger = storage.read_bytes(f"{run_root}/metrics.jsonl").decode()  # the ledger copy under the run root
    rows = [json.loads(ln) for ln in ledger.splitlines() if ln.strip()]
    episodes = [r for r in rows if r.get("kind") == "episode"]
    G, tasks = cfg.agents.action.group_size, cfg.agents.curriculum.tasks_per_proposal
    assert len(episodes) == cfg.run.iterations * tasks * G == len({e["id"] for e in episodes}) == summary["episodes"]
    # an unparseable plan (tiny random policy) is an ok episode with a plan_error and no video;
    # every parsed plan was rendered, and its video is under the run root
    rendered = [e for e in episodes if e["status"] == "ok" and e["plan_error"] is None]
    # under the grammar a plan fails only when all its attempts run out of max_tokens (rare)
    assert len(rendered) >= 3 * len(episodes) // 4, [e["plan_error"] for e in episodes]
    assert all(e["video"] is None for e in episodes if e["plan_error"] is not None)
    for e in rendered:
        assert e["video"].startswith(run_root + "/") and storage.exists(e["video"]), e["video"]
    import lancedb

    memory = lancedb.connect(cfg.memory.uri, storage_options=storage.lancedb_storage_options(cfg.memory.uri))
    ids = set(memory.open_table(cfg.memory.table).to_arrow().column("id").to_pylist())
    assert {e["id"] for e in episodes} <= ids
    checkpoints = [u for u in storage.find(f"{run_root}/learner") if "checkpoint_" in u]
    assert checkpoints, "no learner checkpoint under the S3 root"

    # the judge scored frames it read from S3 (vlm_judge notes an unreadable frame, and gives no scores then)
    for e in rendered:
        assert e["scores"] is not None and not any("could not read the frames" in n or "no frames" in n
                                                   for n in e["notes"]), e["notes"]

    # placement, through Ray's state API
    rows = state(cluster, "actors")
    node_of = {v: k for k, v in cluster.nodes.items()}
    world = {node_of.get(a["node"]) for a in rows if a["cls"].startswith("ServeReplica:world:")}
    engines = {node_of.get(a["node"]) for a in rows if a["cls"].startswith("ServeReplica:engine-")}
    workers = [a for a in rows if a["cls"] == "RayTrainWorker"]
    assert world == {"video"} and engines == {"llm"}, (world, engines)
    assert {node_of.get(a["node"]) for a in rows if a["cls"] == "ServeController"} == {"head"}  # 0 CPUs: fits
    assert len(workers) >= cfg.learner.num_workers == 2 and {node_of.get(a["node"]) for a in workers} == {"llm"}

    # both policy engine replicas served weights the learner published (policy_version >= 1)
    learner = summary["learner"]
    assert "error" not in learner and learner.get("policy_version", 0) >= 1, learner
    assert learner["transport"] == "collective" and learner["published_version"] >= 1, learner
    replicas = learner["replicas"]  # the weight publisher's status: {replica id: {"acked": version, ...}}
    assert len(replicas) == cfg.resources.engines["policy"].replicas
    assert all(r["acked"] >= 1 for r in replicas.values()), replicas
    assert max(e["policy_version"] for e in episodes) >= 1
    print(f"cluster-sim e2e: job {elapsed:.0f}s, {len(episodes)} episodes, {len(checkpoints)} checkpoint files")
