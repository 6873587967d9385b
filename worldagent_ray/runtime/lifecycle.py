"""A run's start-up facts (the dashboard's links) and its orderly shutdown: Serve
applications, then actors, then Ray.

The noise a plain ``serve.shutdown()`` leaves on the driver's console ("Task
ServeController.graceful_shutdown failed ... The actor is dead because it was killed by
`ray.kill`") comes from calls still in flight to the Serve controller when it kills itself:
Ray reports each failed call of an actor with infinite retries to the driver. So:

1. **Serve applications** of the run are deleted in waves (the agents and the world, then the
   engines they call), each wave's replicas stopping in parallel, and awaited until gone
   (bounded). The Serve controller itself is left
   alone: on a cluster it is shared with other jobs (``serve.shutdown()`` would end theirs),
   and on a Ray this process started, step 3 ends it.
2. **Actors** (memory, buffer, weight publisher...) are stopped once the calls already
   queued on them have run (a ``__ray_ready__`` barrier, bounded), then ``ray.kill``-ed with
   no call in flight, so nothing of theirs is cut off and nothing is reported as failed.
3. **Ray**: ``ray.shutdown()`` (for a Ray this process started this stops the local cluster;
   for a cluster it only disconnects the driver).

Nothing here raises: each problem is returned as a line, so the caller can print the run's
summary last, after everything is down.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import ray

log = logging.getLogger(__name__)


def dashboard_url() -> str | None:
    """``http://host:port`` of the Ray dashboard of the connected cluster (honours
    ``RAY_OVERRIDE_DASHBOARD_URL``); None when the dashboard is off or Ray is not connected."""
    try:
        url = ray._private.worker.get_dashboard_url()
    except Exception:
        return None
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def job_dashboard_url() -> str | None:
    """The dashboard page of this driver's job: by submission id under ``ray job submit``,
    else by job id. None without a dashboard."""
    base = dashboard_url()
    if base is None:
        return None
    job = None
    try:
        meta = ray._private.worker.global_worker.core_worker.get_job_config().metadata
        job = dict(meta).get("job_submission_id")
    except Exception:
        pass
    return f"{base}/#/jobs/{job or ray.get_runtime_context().get_job_id()}"


def delete_serve_apps(apps: Sequence[str | Sequence[str]], timeout_s: float = 60.0) -> list[str]:
    """Delete the named Serve applications wave by wave, waiting for each wave to be gone
    (bounded by ``timeout_s`` in all). An entry is a name (a wave of one) or a list of names
    deleted together (their replicas stop in parallel).

    Returns:
        `list[str]`: one line per application that could not be deleted in time.
    """
    from ray import serve

    problems: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        live = set(serve.status().applications)
    except Exception as e:  # Serve never started, or Ray is gone
        log.debug("serve.status: %s", e)
        return []
    for wave in apps:
        names = [wave] if isinstance(wave, str) else list(wave)
        deleting = []
        for name in names:
            if name not in live:
                continue
            try:
                serve.delete(name, _blocking=False)
                deleting.append(name)
            except Exception as e:
                problems.append(f"serve app {name!r}: delete failed: {type(e).__name__}: {e}")
        while deleting:
            try:
                present = set(serve.status().applications)
            except Exception as e:
                problems.append(f"serve apps {deleting}: status failed: {type(e).__name__}: {e}")
                break
            deleting = [n for n in deleting if n in present]
            if deleting and time.monotonic() > deadline:
                problems += [f"serve app {n!r} still deleting after {timeout_s:.0f}s" for n in deleting]
                break
            if deleting:
                time.sleep(0.2)
    return problems


def stop_actors(actors: Sequence[Any], timeout_s: float = 30.0) -> list[str]:
    """Stop each actor once the calls queued on it before have run.

    A ``__ray_ready__`` call is queued on each actor as a barrier (an actor runs the calls of
    one caller in order), then the actor is ``ray.kill``-ed with no call of ours in flight, so
    nothing fails visibly. (``__ray_terminate__`` would be the polite way, but on an actor
    with task retries Ray reports its own exit to the driver as a failed, retried call.)

    Returns:
        `list[str]`: one line per actor whose barrier did not return within ``timeout_s``
        (it is killed anyway).
    """
    live = [a for a in actors if a is not None]
    barrier = {}
    for a in live:
        try:
            barrier[a.__ray_ready__.remote()] = a
        except Exception as e:  # already gone
            log.debug("__ray_ready__: %s", e)
    done, pending = ray.wait(list(barrier), num_returns=len(barrier), timeout=timeout_s) if barrier else ([], [])
    for ref in done:
        try:
            ray.get(ref, timeout=0)
        except Exception as e:  # the actor died on its own; nothing left to stop
            log.debug("actor already dead: %s", e)
    problems = [f"actor {barrier[ref]} still busy after {timeout_s:.0f}s; killed" for ref in pending]
    for a in live:
        try:
            ray.kill(a, no_restart=True)
        except Exception as e:
            log.debug("ray.kill: %s", e)
    return problems


def orderly_shutdown(
    apps: Sequence[str] = (),
    actors: Sequence[Any] = (),
    *,
    stop_ray: bool = True,
    timeout_s: float = 60.0,
    say: Callable[[str], None] | None = None,
) -> list[str]:
    """Serve applications, then actors, then Ray (see the module docstring).

    Args:
        apps: Serve application names of this run, callers before callees, as names or waves
            of names deleted together (e.g. ``[[action, curriculum, critic, world],
            [engine-policy, engine-judge]]``, what ``apps.owned_apps`` gives).
        actors: actor handles of this run (memory, buffer, publisher); ``None`` entries are skipped.
        stop_ray: call ``ray.shutdown()`` at the end.
        timeout_s: bound of each of the first two steps.
        say: where to print the problems as they happen (default: only returned).

    Returns:
        `list[str]`: problems met (an app not deleted in time, an actor killed); empty when clean.
    """
    problems: list[str] = []
    if ray.is_initialized():
        problems += delete_serve_apps(apps, timeout_s)
        problems += stop_actors(actors, timeout_s)
    if stop_ray and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception as e:
            problems.append(f"ray.shutdown: {type(e).__name__}: {e}")
    if say is not None:
        for p in problems:
            say(f"shutdown: {p}")
    return problems
