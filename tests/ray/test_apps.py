"""runtime/apps.py and runtime/lifecycle.py on a real Serve: applications deploy together
(a rendezvous between two constructors proves they start in parallel), a failed or slow
application is named in a DeployError, and applications are deleted wave by wave."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def serve_up():
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="test-apps")
    serve.start(proxy_location="Disabled")
    try:
        yield serve
    finally:
        serve.shutdown()
        ray.shutdown()


def _deployments():
    import ray
    from ray import serve

    @ray.remote(num_cpus=0)
    class Rendezvous:
        def __init__(self):
            self.arrived: set[str] = set()

        def arrive(self, who: str) -> int:
            self.arrived.add(who)
            return len(self.arrived)

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Meets:
        """Starts only once the other application's replica has started too (bounded)."""

        def __init__(self, who: str, board_name: str):
            board = ray.get_actor(board_name)
            deadline = time.monotonic() + 60
            while ray.get(board.arrive.remote(who)) < 2:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{who}: the other replica never started")
                time.sleep(0.1)

        def __call__(self) -> str:
            return "ok"

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Broken:
        def __init__(self):
            raise ValueError("no weights at /nowhere")

    @serve.deployment(ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=1)
    class Slow:
        def __init__(self):
            time.sleep(120)

    return Rendezvous, Meets, Broken, Slow


def test_applications_start_together_and_are_deleted_in_waves(serve_up):
    from worldagent_ray.runtime.apps import run_together
    from worldagent_ray.runtime.lifecycle import delete_serve_apps

    Rendezvous, Meets, _, _ = _deployments()
    board = Rendezvous.options(name="board").remote()
    said: list[str] = []
    handles = run_together({"left": Meets.bind("left", "board"), "right": Meets.bind("right", "board")},
                           timeout_s=120, progress=said.append, labels={"left": "the left app"})
    assert handles["left"].remote().result(timeout_s=30) == "ok"
    assert handles["right"].remote().result(timeout_s=30) == "ok"
    assert sorted(m.split(" ready in ")[0] for m in said) == ["right", "the left app"], said

    assert delete_serve_apps([["left"], ["right", "never-deployed"]], timeout_s=60) == []
    assert not {"left", "right"} & set(serve_up.status().applications)
    import ray

    ray.kill(board)


def test_a_failed_application_is_named_with_its_error(serve_up):
    from worldagent_ray.runtime.apps import DeployError, run_together
    from worldagent_ray.runtime.lifecycle import delete_serve_apps

    _, _, Broken, _ = _deployments()
    with pytest.raises(DeployError, match=r"(?s)'broken' failed to deploy: .*no weights at /nowhere"):
        run_together({"broken": Broken.bind()}, timeout_s=120, progress=lambda m: None)
    assert delete_serve_apps(["broken"], timeout_s=60) == []


def test_a_slow_application_times_out_naming_it(serve_up):
    from worldagent_ray.runtime.apps import DeployError, run_together
    from worldagent_ray.runtime.lifecycle import delete_serve_apps

    _, _, _, Slow = _deployments()
    with pytest.raises(DeployError, match=r"not RUNNING after run.deploy_timeout_s=2s: slow \(DEPLOYING\)"):
        run_together({"slow": Slow.bind()}, timeout_s=2, progress=lambda m: None)
    assert delete_serve_apps(["slow"], timeout_s=60) == []
