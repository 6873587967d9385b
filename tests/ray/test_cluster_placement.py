"""The cluster shape on one machine (issue 10.2): the simulated cluster of tests/conftest.py (a
head with no work, an ``llm`` and a ``video`` node with the labels and custom resources of
cluster/rayjob.yaml's worker groups). The Serve deployments and the Ray Train learner are
placed from the cluster-sim profile's ``resources.*.custom``, and Ray's state API shows world
replicas only on the video node, engine replicas and learner workers only on the llm node.

The engines load tiny-random-llama here (about 1 s): placement is under test, not the model
(the cluster-sim models run end to end in tests/e2e/test_cluster_sim.py)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from tests.factories import GROUP_LABEL, make_groups
from worldagent_ray.config import load_config, used_engines

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

NAMESPACE = "sim-placement"


def _cfg():
    overrides = {"engines.policy.model": "tiny-random-llama", "engines.judge.model": "tiny-random-llama",
                 "resources.world.autoscaling.min_replicas": "2",  # both video_gpu slots: both must be on video
                 "learner.max_steps": "1", "learner.groups_per_step": "2", "learner.checkpoint_every": "1",
                 "learner.max_staleness": "100", "run.name": "sim"}
    return load_config("cluster-sim", overrides=[f"{k}={v}" for k, v in overrides.items()], environ={})


@pytest.fixture(scope="module")
def connected(sim_cluster):
    """This process as a driver of the simulated cluster (token auth: tests/conftest.py sets
    RAY_AUTH_MODE=token before Ray is imported)."""
    import ray

    assert os.environ.get("RAY_AUTH_MODE") == "token"
    ray.init(address=sim_cluster.gcs, namespace=NAMESPACE, log_to_driver=False)
    try:
        yield sim_cluster
    finally:
        ray.shutdown()


def _actors(cluster, prefix: str, state: str | None = None) -> list[tuple[str, str]]:
    """``(group of the node, state)`` of every actor whose class name starts with ``prefix``."""
    from ray.util.state import list_actors

    group = {v: k for k, v in cluster.nodes.items()}
    return [(group.get(a.node_id, a.node_id), a.state) for a in list_actors(address=cluster.dashboard, limit=10000, detail=True)
            if (a.class_name or "").startswith(prefix) and (state is None or a.state == state)]


def test_nodes_mirror_the_rayjob_worker_groups(connected):
    from ray.util.state import list_nodes

    nodes = {n.node_id: n for n in list_nodes(address=connected.dashboard, filters=[("state", "=", "ALIVE")])}
    assert set(nodes) == set(connected.nodes.values())
    head, llm, video = (nodes[connected.nodes[g]] for g in ("head", "llm", "video"))
    assert head.is_head_node and head.resources_total.get("CPU", 0) == 0  # no work on the head
    for node, group in ((llm, "llm"), (video, "video")):
        # the group's own label, and the one Ray derives from RAY_NODE_TYPE_NAME as on KubeRay
        assert node.labels[GROUP_LABEL] == group and node.labels["ray.io/node-group"] == group
        assert node.resources_total.get("GPU", 0) == 0  # custom resources stand in for GPUs
    assert llm.resources_total["llm_gpu"] == 5 and "video_gpu" not in llm.resources_total
    assert video.resources_total["video_gpu"] == 2 and "llm_gpu" not in video.resources_total


def test_world_replicas_on_the_video_node_engines_on_the_llm_node(connected):
    from ray import serve

    from worldagent_ray.runtime.engine_deployment import engine_app
    from worldagent_ray.runtime.world_deployment import world_app

    cfg = _cfg()
    assert used_engines(cfg) == ["policy", "judge"]
    serve.start(proxy_location="Disabled")
    try:
        handles = {name: serve.run(engine_app(cfg, name), name=f"engine-{name}", route_prefix=None)
                   for name in used_engines(cfg)}
        world = serve.run(world_app(cfg), name="world", route_prefix=None)
        # every replica answers (so each one really runs where the state API says)
        assert world.info.remote().result(timeout_s=120)["world"] == "diffusers"
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while len(seen) < cfg.resources.engines["policy"].replicas and time.monotonic() < deadline:
            seen.add(handles["policy"].info.remote().result(timeout_s=60)["replica"])
        assert len(seen) == 2
        assert handles["judge"].info.remote().result(timeout_s=60)["engine"] == "judge"

        assert sorted(_actors(connected, "ServeReplica:world:", "ALIVE")) == [("video", "ALIVE")] * 2
        assert sorted(_actors(connected, "ServeReplica:engine-policy:", "ALIVE")) == [("llm", "ALIVE")] * 2
        assert _actors(connected, "ServeReplica:engine-judge:", "ALIVE") == [("llm", "ALIVE")]
        assert _actors(connected, "ServeController", "ALIVE") == [("head", "ALIVE")]  # 0 CPUs: fits the head
    finally:
        serve.shutdown()


def test_learner_workers_on_the_llm_node(connected, tmp_path):
    """The real learner (Ray Train, 2 gloo workers, LoRA) steps once from a real buffer; its
    workers ran on the llm node (their placement comes from resources.learner.custom)."""
    import ray

    from worldagent_ray.rl.buffer import meta_of
    from worldagent_ray.runtime.buffer_actor import BufferActor, buffer_actor_name
    from worldagent_ray.runtime.learner_trainer import launch_learner
    from worldagent_ray.runtime.weight_publisher import create_publisher_actor

    cfg = _cfg()
    lc = cfg.learner
    assert (lc.num_workers, cfg.resources.learner.custom) == (2, {"llm_gpu": 1.0}) and lc.lora
    buffer = ray.remote(BufferActor).options(name=buffer_actor_name("sim"), namespace=NAMESPACE, num_cpus=0).remote(
        put_timeout_s=5.0, name="sim", max_groups=lc.buffer_max_groups, max_staleness=lc.max_staleness,
        stale_policy=lc.stale_policy, drop_zero_variance=lc.drop_zero_variance)
    publisher = create_publisher_actor("sim-weights", namespace=NAMESPACE)
    # a full batch for each of the 2 workers, whether rank 0 pulls for both or each rank pulls its own
    for g in make_groups(7, n_groups=2 * lc.num_workers):
        assert ray.get(buffer.put.remote(meta_of(g), [ray.put(g)]), timeout=30)
    trainer = launch_learner(cfg, tmp_path / "run", buffer_actor_name("sim"), "sim-weights", namespace=NAMESPACE,
                             idle_timeout_s=10.0, extra_loop_config={"batch_timeout_s": 1.0})
    out: dict = {}
    fit = threading.Thread(target=lambda: out.update(result=trainer.fit()), daemon=True)
    fit.start()
    fit.join(300)  # bounded: a rank stuck in a collective must fail the test, not hang it
    assert not fit.is_alive(), "the learner did not finish one step within 300 s"
    result = out["result"]
    assert result.error is None
    assert (result.metrics or {}).get("policy_version") == 1, result.metrics
    assert ray.get(publisher.status.remote(), timeout=30)["version"] == 1
    workers = _actors(connected, "RayTrainWorker")
    assert len(workers) == lc.num_workers and {g for g, _ in workers} == {"llm"}, workers
