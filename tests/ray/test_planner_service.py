"""The planner service on the sandbox over HTTP: one small request, bad requests, the handle API."""

from __future__ import annotations

import base64
import io
import os
import socket

import pytest

from worldagent_ray.config import load_config
from worldagent_ray.schemas import PlanResult

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    import ray
    from ray import serve

    from worldagent_ray.runtime.planner_deployment import serve_planner

    root = tmp_path_factory.mktemp("planner")
    cfg = load_config("local-cpu", environ={}, overrides=[
        "engines.policy.backend=transformers", "engines.policy.model=tiny-random-llama",
        "engines.policy.dtype=float32", "engines.policy.max_json_retries=0", "agents.action.max_tokens=96",
        "agents.critic.scorers=[verifiable]", "planner.num_candidates=3", "planner.iterations=2",
        f"planner.http_port={_free_port()}", f"run.root={root}", "world.sandbox.write_gif=false",
        "world.sandbox.image_size=32", "resources.world.num_cpus=0.25", "resources.critic.num_cpus=0.25",
        "resources.engines.policy.num_cpus=0.5", "run.stage_timeout_s=120",
    ])
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        handle = serve_planner(cfg)
        yield cfg, handle
    finally:
        serve.shutdown()
        ray.shutdown()


def _post(cfg, body, method="POST"):
    import httpx

    url = f"http://{cfg.planner.http_host}:{cfg.planner.http_port}{cfg.planner.route_prefix}"
    return httpx.request(method, url, json=body, timeout=120)


def test_plan_over_http_on_the_sandbox(service):
    cfg, _ = service
    assert cfg.planner.http_host == "127.0.0.1"  # localhost unless configured otherwise
    r = _post(cfg, {"goal": "Open the fridge", "method": "cem", "seed": 1})
    assert r.status_code == 200, r.text
    res = PlanResult.model_validate(r.json())
    assert res.method == "cem" and res.task.goal == "Open the fridge" and res.task.source == "user"
    assert 1 <= len(res.trace) <= 2 and res.world_calls <= 6
    # a random tiny policy rarely writes a plan; the chain (uniform over the sandbox's actions) does
    assert res.best is not None and res.rollout is not None and os.path.exists(res.best.video_uri)
    assert res.verdict.reward == pytest.approx(res.best.reward) and res.rollout.step_frames
    assert res.rollout.ground_truth is not None  # the sandbox imagines with ground truth


def test_bad_requests_are_refused_with_the_field_named(service):
    cfg, _ = service
    r = _post(cfg, {"goal": "   "})
    assert r.status_code == 422 and "goal" in r.json()["error"]
    r = _post(cfg, {"goal": "Open the fridge", "num_candidates": 99})
    assert r.status_code == 422 and "num_candidates=99 is outside 1..3" in r.json()["error"]
    r = _post(cfg, {"goal": "Open the fridge", "reference_image_b64": "%%%"})
    assert r.status_code == 422 and "base64" in r.json()["error"]
    assert _post(cfg, None, method="GET").status_code == 405


def test_handle_api_with_a_reference_image_and_a_full_task(service):
    from PIL import Image

    from worldagent_ray.world.sandbox import SandboxTaskGenerator

    _, handle = service
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="PNG")
    task = SandboxTaskGenerator(seed=0).heldout_tasks(1, 1)[0]
    res = handle.plan.remote({"task": task.model_dump(mode="json"), "method": "best_of_n", "num_candidates": 2,
                              "iterations": 1, "reference_image_b64": base64.b64encode(buf.getvalue()).decode()}
                             ).result(timeout_s=120)
    assert res.task.id == task.id and res.task.reference_image.endswith("reference.img")
    assert len(res.trace) == 1 and res.policy_samples == 2
    assert handle.health.remote().result(timeout_s=30)["requests"] >= 1
