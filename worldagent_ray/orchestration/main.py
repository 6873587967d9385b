"""Run one evolve job: connect to Ray, start (or attach to) the services, run the driver, print
the summary and write the report. All Ray work goes through ``runtime/``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from ..config import Config
from .evolve import EvolveDriver
from .progress import RunProgress
from .run_folder import RunFolder

log = logging.getLogger("worldagent_ray")


def _vocabulary_fn(cfg: Config) -> Callable | None:
    if cfg.world.backend != "sandbox" or not cfg.agents.action.constrain_to_vocabulary:
        return None
    from ..world.sandbox import SandboxWorld

    world = SandboxWorld(cfg.world.sandbox)  # pure and cheap: only the vocabulary is used here
    return world.admissible_actions


def run_evolve(cfg: Config, run: RunFolder, *, learn: bool = False, attach: bool = False, dashboard: bool = True,
               interactive: bool | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the loop of ``run`` to the end (or until Ctrl-C / a resumable stop); the summary."""
    from ..runtime import apps, cluster
    from ..runtime.memory_actor import create_memory_actor
    from ..runtime.metrics import LoopMetrics
    from ..runtime.services import RayServices

    info = cluster.connect(cfg, dashboard=dashboard)
    say(f"run folder: {run.local}" + (f" (artifacts: {run.artifacts})" if run.artifacts != str(run.local.resolve()) else ""))
    say(f"ray: {info.address}" + (f"  dashboard: {info.dashboard_url}" if info.dashboard_url else ""))
    from ..runtime.grafana import install_for_this_session
    from ..runtime.lifecycle import job_dashboard_url

    job_url = job_dashboard_url()
    if job_url:
        say(f"this job in the dashboard: {job_url}")
    panels = install_for_this_session()  # our Grafana panels beside Ray's, when this is the head node
    if panels is not None:
        say(f"grafana dashboard: {panels} (Metrics view; see deployments/grafana/README.md)")
    memory = create_memory_actor(cfg, run.artifacts, name=run.run_id, namespace=cluster.NAMESPACE) \
        if cfg.memory.enabled else None
    session = None
    handles = None
    try:
        if learn:
            from ..runtime.learning import start_learning
            from ..storage import train_storage

            # checkpoints on the run root (shared storage on a cluster), through the storage layer
            session = start_learning(cfg, run, namespace=cluster.NAMESPACE, say=say,
                                     storage_filesystem=train_storage(run.artifacts)[1])
        if attach:
            handles = apps.attach(cfg, progress=lambda m: say(f"  {m}"))
        else:
            handles = apps.deploy(cfg, publisher=session.publisher_name if session else None,
                                  namespace=cluster.NAMESPACE, progress=lambda m: say(f"  {m}"))
        say(f"serve applications: {', '.join(handles.app_names)}")
        services = RayServices(handles, memory, _vocabulary_fn(cfg))
        progress = RunProgress(planned=0, learn=session is not None, interactive=interactive).start()
        driver = EvolveDriver(cfg, run, services, learner=session, metrics=LoopMetrics(run.run_id),
                              progress=lambda snap: progress.update(snap, session.latest_step if session else None))
        try:
            summary = asyncio.run(driver.run_loop())
        except KeyboardInterrupt:  # Ctrl-C: keep what finished, report it, say how to resume
            summary = driver.summary()
            summary["interrupted"] = True  # the command line says how to resume
        finally:
            progress.close()
        if session is not None:
            summary["learner"] = session.finish()
        if memory is not None:
            services.optimize_memory(timeout_s=cfg.run.memory_timeout_s * 5)
        if cfg.run.report:
            from .report import write_report

            summary["report"] = str(write_report(run, summary))
        return summary
    finally:  # Serve applications first (attached ones stay up), then this run's actors
        from ..runtime.lifecycle import orderly_shutdown

        orderly_shutdown(apps.owned_apps(handles), [memory, *((session.buffer, session.publisher) if session else ())],
                         stop_ray=False, say=say)


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    # Plain lines never wrap (soft_wrap) and are data, not markup: a path or a learner dict
    # printed by a piped run stays one copyable line.
    console = Console(soft_wrap=True, highlight=False)
    say = lambda line: console.print(line, markup=False)  # noqa: E731
    say(f"WorldAgent-Ray: {summary['episodes']} episodes in {summary['elapsed_s']:.0f}s "
        f"({summary['episodes_per_s']:.2f} episodes/s)")
    t = Table()
    for col in ("phase", "episodes", "failed", "success rate", "mean reward"):
        t.add_column(col, justify="right")
    for p, d in summary["by_phase"].items():
        t.add_row(str(p), str(d["episodes"]), str(d["failed"]), f"{d['success_rate']:.0%}", f"{d['mean_reward']:.3f}")
    console.print(t)
    for ev in summary.get("promotions") or []:
        say(f"curriculum: phase {ev['from']} -> {ev['to']} at success {ev['success_rate']:.0%}")
    if summary.get("skipped_rounds"):
        say(f"rounds skipped (proposed again on --resume): {summary['skipped_rounds']}")
    if summary.get("uncommitted"):
        say(f"episodes not written to memory (redone on --resume): {summary['uncommitted']}")
    if summary.get("learner"):
        say(f"learner: {summary['learner']}")
    if summary.get("report"):
        say(f"report: {summary['report']}")
    if summary.get("error"):
        from rich.text import Text

        console.print(Text("stopped early: ", style="red") + Text(str(summary["error"])))
