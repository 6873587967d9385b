"""The world as a Ray Serve deployment, on an in-process local Ray cluster."""

from __future__ import annotations

import asyncio
import os
import uuid

import numpy as np
import pytest

from worldagent_ray.config import Config, DiffusersConfig, load_config
from worldagent_ray.schemas import Plan, Task
from worldagent_ray.world.tiny_wan import ensure_tiny_wan

pytestmark = pytest.mark.ray

try:  # the sandbox backend is written by another part of the project
    from worldagent_ray.world.sandbox import SandboxWorld  # noqa: F401

    HAS_SANDBOX = True
except ImportError:
    HAS_SANDBOX = False


@pytest.fixture(scope="module")
def ray_serve(tmp_path_factory):
    """A local Ray (4 logical CPUs) with Serve and no HTTP proxy (other tests may hold port 8000)."""
    import ray
    from ray import serve

    cache = tmp_path_factory.mktemp("wan-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORLDAGENT_CACHE", str(cache))  # inherited by the replicas started below
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        ensure_tiny_wan("tiny-wan-t2v")
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        serve.start(proxy_location="Disabled")
        try:
            yield serve
        finally:
            serve.shutdown()
            ray.shutdown()


def _cfg(backend: str, **world) -> Config:
    overrides = [f"world.backend={backend}", "world.batch_wait_timeout_s=0.5", "world.max_batch_size=4",
                 "resources.world.num_cpus=1", "resources.world.max_ongoing_requests=16"]
    cfg = load_config("local-cpu", overrides=overrides, environ={})
    if backend == "diffusers":
        cfg.world.diffusers = DiffusersConfig(model="tiny-wan-t2v", **world)
    return cfg


def _task(i: int, goal: str = "Make a cup of tea") -> Task:
    return Task(id=f"svc-{i}", goal=goal, phase=1)


def _run(serve, cfg: Config):
    from worldagent_ray.runtime.world_deployment import world_app

    name = f"world-{uuid.uuid4().hex[:8]}"
    return name, serve.run(world_app(cfg), name=name, route_prefix=None)


def _frames(rollout):
    from worldagent_ray.world import media

    return np.stack([media.decode_image(media.read_bytes(u)) for u in rollout.frame_uris])


async def _gather(handle, calls):
    return await asyncio.gather(*(handle.render.remote(*c) for c in calls))


def test_deployment_options_follow_the_resources_section():
    from worldagent_ray.runtime.world_deployment import world_app

    gpu = world_app(load_config("gpu-cluster", environ={}))._bound_deployment
    assert gpu.ray_actor_options == {"num_cpus": 4.0, "num_gpus": 1.0, "resources": {"video_gpu": 1.0}}  # pinned to video nodes
    auto = gpu._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (2, 16, 1.0)
    assert gpu._deployment_config.max_ongoing_requests == 4
    assert gpu.init_args[0]["backend"] == "diffusers"
    assert gpu.init_args[1] == 8  # each replica writes the frames the judge asks for (agents.critic.num_frames)
    local = world_app(load_config("local-cpu", environ={}))._bound_deployment
    assert local.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 0.0} and local.num_replicas == 1


@pytest.mark.slow
def test_diffusers_service_batches_concurrent_requests_and_survives_bad_input(ray_serve, tmp_path):
    serve = ray_serve
    name, handle = _run(serve, _cfg("diffusers"))
    try:
        plan = Plan.from_actions(["Fill the kettle", "Boil water"])
        calls = [(_task(i), [plan, None], str(tmp_path / f"t{i}"), None, [i, i + 100]) for i in range(6)]
        results = asyncio.run(_gather(handle, calls))
        assert len(results) == 6
        for i, rollouts in enumerate(results):
            assert [r.task_id for r in rollouts] == [f"svc-{i}"] * 2
            assert rollouts[0].error is None and rollouts[0].seed == i and os.path.exists(rollouts[0].video_uri)
            assert "no plan" in rollouts[1].error
        info = handle.info.remote().result()
        assert info["world"] == "diffusers" and info["backend"]["shape"] == [64, 64, 9]
        assert info["requests_served"] == 6 and max(info["batch_sizes"]) > 1  # requests were batched
        assert max(info["batch_sizes"]) <= 4
        # the seed alone fixes the video: a request rendered alone matches its batched twin
        (alone,) = handle.render.remote(_task(0), [plan], str(tmp_path / "alone"), None, [0]).result()
        assert np.array_equal(_frames(alone), _frames(results[0][0]))

        # bad requests fail alone, with a message naming the problem ...
        with pytest.raises(Exception, match="invalid task.*goal"):
            handle.render.remote({"id": "x", "phase": 1}, [plan], str(tmp_path)).result()
        with pytest.raises(Exception, match="plans must be a list"):
            handle.render.remote(_task(9), "Boil water", str(tmp_path)).result()
        text = tmp_path / "ref.txt"
        text.write_text("not an image")
        (bad_ref,) = handle.render.remote(_task(10), [plan], str(tmp_path), str(text)).result()
        assert bad_ref.error.startswith("reference_image:")
        # ... and the replica keeps serving; a dict plan over the wire works too
        (ok,) = handle.render.remote(_task(11).model_dump(), [plan.model_dump()], str(tmp_path), None, [0]).result()
        assert ok.error is None and ok.num_frames == 9
        assert handle.health.remote().result()["ok"] is True
    finally:
        serve.delete(name)


@pytest.mark.skipif(not HAS_SANDBOX, reason="worldagent_ray.world.sandbox has not landed")
def test_sandbox_service_batches_and_survives_bad_input(ray_serve, tmp_path):
    from worldagent_ray.world.sandbox import SandboxTaskGenerator, reference_plan

    serve = ray_serve
    name, handle = _run(serve, _cfg("sandbox"))
    try:
        gen = SandboxTaskGenerator(seed=3)
        tasks = [gen.sample(phase=1 + i % 2, index=i) for i in range(5)]
        assert handle.admissible_actions.remote(tasks[0]).result(), "the sandbox lists its actions"
        calls = [(t, [reference_plan(t), Plan()], str(tmp_path / f"s{i}")) for i, t in enumerate(tasks)]
        results = asyncio.run(_gather(handle, calls))
        for task, (solved, empty) in zip(tasks, results):
            assert solved.task_id == task.id and solved.error is None and solved.num_frames > 0
            assert solved.ground_truth.goal_achieved and os.path.exists(solved.video_uri)
            assert not (empty.ground_truth and empty.ground_truth.goal_achieved)
        info = handle.info.remote().result()
        assert info["world"] == "sandbox" and max(info["batch_sizes"]) > 1
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        (bad_ref,) = handle.render.remote(tasks[0], [reference_plan(tasks[0])], str(tmp_path), str(bad)).result()
        assert bad_ref.error and "reference" in bad_ref.error
        with pytest.raises(Exception, match="invalid task"):
            handle.render.remote({"goal": ""}, [Plan()], str(tmp_path)).result()
        (ok,) = handle.render.remote(tasks[1], [reference_plan(tasks[1])], str(tmp_path)).result()
        assert ok.error is None and ok.ground_truth.goal_achieved
    finally:
        serve.delete(name)
