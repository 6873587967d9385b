"""A short real loop, submitted with ``ray job submit`` by ``tests/ray/test_dashboard.py``.

It deploys the real parts (policy engine on ``tiny-random-llama``, sandbox world, verifiable
critic, rule-based curriculum, memory actor) and the real learner (Ray Train, buffer,
weight publisher), runs the real driver for 2 rounds of 2 tasks x 2 samples, then HOLDS until
the test has read the dashboard's API and the metrics export back (the file named by
``--release`` appears), so that every process that owns a metric is still alive when it is
read. Then it shuts down in order (Serve apps, actors, Ray) and prints its summary last.

Faults are injected (test doubles, only for that): every world call of the first task fails
(its group becomes failed episodes), the first world call of the second task fails once (the
driver retries it), and one already-fed group is fed again (the buffer refuses it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from worldagent_ray.config import load_config
from worldagent_ray.orchestration.evolve import EvolveDriver
from worldagent_ray.orchestration.main import _vocabulary_fn
from worldagent_ray.orchestration.progress import RunProgress
from worldagent_ray.orchestration.run_folder import RunFolder
from worldagent_ray.runtime.services import RayServices

OVERRIDES = [
    "engines.policy.model=tiny-random-llama", "engines.policy.backend=transformers",
    "engines.policy.max_json_retries=0", "agents.curriculum.use_llm=false", "agents.critic.scorers=[verifiable]",
    "agents.action.group_size=2", "agents.action.max_tokens=32", "agents.curriculum.tasks_per_proposal=2",
    "run.iterations=2", "run.max_retries=1",
    "learner.groups_per_step=1", "learner.drop_zero_variance=false", "learner.beta=0.04",
    "learner.max_staleness=8", "learner.checkpoint_every=1000",
]


class _FlakyServices(RayServices):
    """The real Ray services with injected world faults by task slot (a test double only for
    that): every world call of the first task fails, the second task's first call fails once."""

    failed_once: set[str] = set()

    async def render(self, task, plans, out_dir, seeds):
        slot = task.id.split(".")[:2]
        if slot == ["r0000", "0"]:
            raise RuntimeError(f"injected fault: world down for {task.id}")
        if slot == ["r0000", "1"] and task.id not in self.failed_once:
            self.failed_once.add(task.id)
            raise RuntimeError(f"injected fault: one world call of {task.id} fails")
        return await super().render(task, plans, out_dir, seeds)


class _RecordingLearner:
    """The real LearningSession as the driver's learner; keeps the last group fed, to feed it again."""

    def __init__(self, session: Any):
        self.session = session
        self.last: Any = None

    async def feed(self, group: Any) -> bool:
        ok = await self.session.feed(group)
        if ok:
            self.last = group
        return ok

    async def healthy(self) -> str | None:
        return await self.session.healthy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--release", required=True, help="hold until this file exists")
    ap.add_argument("--hold-timeout-s", type=float, default=300.0)
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from worldagent_ray.runtime.apps import deploy, owned_apps
    from worldagent_ray.runtime.cluster import NAMESPACE, connect
    from worldagent_ray.runtime.learning import start_learning
    from worldagent_ray.runtime.lifecycle import job_dashboard_url, orderly_shutdown
    from worldagent_ray.runtime.memory_actor import create_memory_actor
    from worldagent_ray.runtime.metrics import LoopMetrics

    cfg = load_config("local-cpu", overrides=[*OVERRIDES, f"run.root={args.root}"], environ={})
    run = RunFolder.create(cfg, "dash")
    connect(cfg)  # joins the cluster of the job (RAY_ADDRESS)
    print(f"JOB_URL {job_dashboard_url()}", flush=True)
    serve.start(proxy_location="Disabled")  # no HTTP proxy: port 8000 may be someone else's
    memory = create_memory_actor(cfg, run.artifacts, name=run.run_id, namespace=NAMESPACE)
    learner = start_learning(cfg, run, namespace=NAMESPACE, say=print)
    handles = deploy(cfg, publisher=learner.publisher_name, namespace=NAMESPACE, progress=print)
    feeder = _RecordingLearner(learner)
    services = _FlakyServices(handles, memory, _vocabulary_fn(cfg))
    progress = RunProgress(planned=8, learn=True, interactive=False, every_s=5.0)
    with progress:
        driver = EvolveDriver(cfg, run, services, learner=feeder, metrics=LoopMetrics(run.run_id),
                              progress=lambda snap: progress.update(snap, learner.latest_step))
        summary = asyncio.run(driver.run_loop())
    refused = None
    if feeder.last is not None:  # the same group again: the buffer must refuse it (duplicate/consumed)
        refused = not asyncio.run(learner.feed(feeder.last))
    print("LOOP_DONE " + json.dumps({"run": str(run.local), "run_id": run.run_id, "episodes": summary["episodes"],
                                     "failed": summary["failed"], "refed_refused": refused,
                                     "progress_lines": len(progress.lines)}), flush=True)

    release = Path(args.release)
    deadline = time.monotonic() + args.hold_timeout_s
    while not release.exists():
        if time.monotonic() > deadline:
            print(f"HOLD TIMEOUT: {release} did not appear in {args.hold_timeout_s}s", flush=True)
            break
        time.sleep(0.2)
    learned = learner.finish(timeout_s=120)
    problems = orderly_shutdown(owned_apps(handles), [memory, learner.buffer, learner.publisher], stop_ray=True, timeout_s=60)
    assert not ray.is_initialized()
    print("SUMMARY " + json.dumps({"episodes": summary["episodes"], "failed": summary["failed"],
                                   "learner_error": learned.get("error"), "policy_version": learned.get("policy_version"),
                                   "shutdown_problems": problems}, default=str), flush=True)
    return 0 if release.exists() and not problems and "error" not in learned else 1


if __name__ == "__main__":
    sys.exit(main())
