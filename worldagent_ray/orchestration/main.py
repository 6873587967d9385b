"""Set up Ray, deploy the parts, run the driver, print the summary and write the report."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any, Callable

from ..config import Config
from .evolve import EvolveDriver, Services
from .run_folder import RunFolder

log = logging.getLogger("worldagent_ray")

NAMESPACE = "worldagent"


def init_ray(cfg: Config) -> None:
    """Join the cluster named by RAY_ADDRESS / config (``ray job submit`` sets it), else start
    a local Ray with ``resources.ray_num_cpus`` logical CPUs, bound to localhost."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {k: v for k, v in os.environ.items()
                        if k.startswith(("HF_", "TRANSFORMERS_", "VLLM_", "WORLDAGENT", "RUST_LOG", "TOKENIZERS"))}}
    if address:
        ray.init(address=address, namespace=NAMESPACE, runtime_env=env, log_to_driver=False)
    else:
        ray.init(num_cpus=cfg.resources.ray_num_cpus, namespace=NAMESPACE, include_dashboard=False,
                 runtime_env=env, log_to_driver=False, _node_ip_address="127.0.0.1")


def _vocabulary_fn(cfg: Config) -> Callable | None:
    if cfg.world.backend != "sandbox" or not cfg.agents.action.constrain_to_vocabulary:
        return None
    from ..world.sandbox import SandboxWorld

    world = SandboxWorld(cfg.world.sandbox)  # pure and cheap: only the vocabulary is used here
    return world.admissible_actions


class _Progress:
    """A rich progress bar when interactive, a line every few episodes otherwise."""

    def __init__(self, interactive: bool):
        self.bar = None
        self.last = 0.0
        if interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("episodes"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            self.task = self.bar.add_task("episodes", total=1)
            self.bar.start()

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=max(total, done))
        elif time.time() - self.last > 10 or done >= total:
            self.last = time.time()
            print(f"[evolve] {done}/{total} episodes committed", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_evolve(cfg: Config, run: RunFolder, *, learn: bool = False, stop_after_episodes: int | None = None,
               interactive: bool | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    import ray

    from ..runtime.apps import deploy, teardown
    from ..runtime.memory_actor import create_memory_actor
    from ..runtime.metrics import LoopMetrics
    from .report import write_report

    init_ray(cfg)
    say(f"run folder: {run.local}  (ray: {ray.get_runtime_context().gcs_address})")
    memory = create_memory_actor(cfg, run.artifacts, name=run.run_id, namespace=NAMESPACE)
    learner = None
    try:
        publisher = None
        if learn:
            from ..runtime.learning import start_learning

            learner = start_learning(cfg, run, namespace=NAMESPACE, say=say)
            publisher = learner.publisher_name
        handles = deploy(cfg, publisher=publisher, namespace=NAMESPACE, progress=lambda m: say(f"  {m}"))
        services = Services(
            action=handles.action, world=handles.world, critic=handles.critic, curriculum=handles.curriculum,
            memory=memory, vocabulary=_vocabulary_fn(cfg),
            buffer=learner.feeder if learner else None,
        )
        progress = _Progress(sys.stdout.isatty() if interactive is None else interactive)
        driver = EvolveDriver(cfg, run, services, metrics=LoopMetrics(run.run_id), progress=progress,
                              stop_after_episodes=stop_after_episodes)
        try:
            summary = asyncio.run(driver.run_loop())
        except KeyboardInterrupt:  # Ctrl-C: keep what finished, report it, say how to resume
            summary = driver.summary()
            summary["interrupted"] = True
        finally:
            progress.close()
        if learner is not None:
            summary["learner"] = learner.finish()
        ray.get(memory.optimize.remote())
        if cfg.run.report:
            summary["report"] = str(write_report(run, summary))
        return summary
    finally:
        teardown()  # the learner's actors end with the job


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"WorldAgent-Ray: {summary['episodes']} episodes in {summary['elapsed_s']:.0f}s "
                    f"({summary['episodes_per_s']:.2f} episodes/s)")
    for col in ("phase", "episodes", "failed", "success rate", "mean reward"):
        t.add_column(col, justify="right")
    for p, d in summary["by_phase"].items():
        t.add_row(str(p), str(d["episodes"]), str(d["failed"]), f"{d['success_rate']:.0%}", f"{d['mean_reward']:.3f}")
    console = Console()
    console.print(t)
    for ev in summary.get("promotions") or []:
        console.print(f"curriculum: phase {ev['from']} -> {ev['to']} at success {ev['success_rate']:.0%}")
    if summary.get("learner"):
        console.print(f"learner: {summary['learner']}")
    if summary.get("report"):
        console.print(f"report: {summary['report']}")
