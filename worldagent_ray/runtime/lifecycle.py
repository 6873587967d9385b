"""Orderly shutdown of a run: Serve applications, then actors, then Ray.

The noise a plain ``serve.shutdown()`` leaves on the driver's console ("Task
ServeController.graceful_shutdown failed ... The actor is dead because it was killed by
`ray.kill`") comes from calls still in flight to the Serve controller when it kills itself:
Ray reports each failed call of an actor with infinite retries to the driver. So:

1. **Serve applications** of the run are deleted one by one (agents before the engines they
   call) and awaited until gone, each wait bounded. The Serve controller itself is left
   alone: on a cluster it is shared with other jobs (``serve.shutdown()`` would end theirs),
   and on a Ray this process started, step 3 ends it.
2. **Actors** (memory, buffer, weight publisher...) are asked to exit with
   ``__ray_terminate__``, which runs after the calls already queued on them, so nothing of
   theirs is cut off; one that has not exited when the deadline passes is ``ray.kill``-ed.
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


def delete_serve_apps(apps: Sequence[str], timeout_s: float = 60.0) -> list[str]:
    """Delete the named Serve applications, in order, waiting for each to be gone (bounded).

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
    for name in apps:
        if name not in live:
            continue
        try:
            serve.delete(name, _blocking=False)
        except Exception as e:
            problems.append(f"serve app {name!r}: delete failed: {type(e).__name__}: {e}")
            continue
        while True:
            try:
                if name not in serve.status().applications:
                    break
            except Exception as e:
                problems.append(f"serve app {name!r}: status failed: {type(e).__name__}: {e}")
                break
            if time.monotonic() > deadline:
                problems.append(f"serve app {name!r} still deleting after {timeout_s:.0f}s")
                break
            time.sleep(0.2)
    return problems


def stop_actors(actors: Sequence[Any], timeout_s: float = 30.0) -> list[str]:
    """Ask each actor to exit after the calls already queued on it; ``ray.kill`` the ones
    that have not exited within ``timeout_s``. Returns one line per actor killed."""
    refs = {}
    for a in actors:
        if a is None:
            continue
        try:
            refs[a.__ray_terminate__.remote()] = a
        except Exception as e:  # already dead
            log.debug("__ray_terminate__: %s", e)
    if not refs:
        return []
    # a terminate call "fails" when its actor exits: that is the success we wait for
    done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    for ref in done:
        try:
            ray.get(ref, timeout=0)
        except Exception:
            pass
    problems = []
    for ref in pending:
        actor = refs[ref]
        problems.append(f"actor {actor} did not exit within {timeout_s:.0f}s; killed")
        ray.kill(actor, no_restart=True)
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
        apps: Serve application names of this run, callers before callees (e.g. ``action,
            curriculum, critic, world, engine-policy, engine-judge``).
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
