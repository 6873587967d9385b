"""``--learn``: the asynchronous GRPO learner beside the rollouts.

The driver feeds every reward-scored group into the buffer actor as an ObjectRef (the data
stays in the object store); the Ray Train learner pulls batches, steps, checkpoints on the run
root (shared storage), acknowledges what its checkpoints contain and publishes weights; the
Action engine replicas pick new versions up from the publisher (pause -> load -> resume).
Nothing here blocks the driver's event loop.

What the driver calls (:class:`LearningSession` is the driver's ``Learner``)::

    learning = start_learning(cfg, run, namespace)          # buffer, publisher, learner thread
    ok = await learning.feed(group)                         # per committed ScoredGroup
    reason = await learning.healthy()                       # None while it runs; also checked per feed
    summary = learning.finish()                             # close, drain, final stats

The learner's health is checked on every feed: once the learner has failed for good (Ray Train
restarts failed workers up to ``learner.max_failures`` times, restoring the last acknowledged
checkpoint; after that ``fit()`` raises) or has finished, feeding stops at once, the reason is
recorded in the run's event ledger (``learner_stopped``) and every later ``feed`` returns
False without waiting. While the learner is healthy and the buffer full, a feed waits for space
(back-pressure) in short polls, re-checking the health between them, for at most
``learner.feed_timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Callable, Sequence

from pydantic import ValidationError

from ..config import Config
from ..orchestration.run_folder import RunFolder
from ..rl.groups import scored_group
from ..schemas import LearnerStep, PlanSample, ScoredGroup, Task, Verdict

log = logging.getLogger(__name__)

__all__ = ["GroupFeeder", "LearningSession", "start_learning"]


class GroupFeeder:
    """Puts scored groups into the buffer while the learner is healthy.

    Args:
        buffer: the :class:`~worldagent_ray.runtime.buffer_actor.BufferActor` handle.
        run_id: prefix of the group ids (``<run_id>:<task id>``).
        health: ``() -> None`` while the learner runs, else why it stopped; checked before every
            feed and between the polls of a wait on a full buffer.
        feed_timeout_s: the longest one feed waits for space while the learner is healthy.
        poll_s: one wait on a full buffer before the health is checked again.
        on_stop: called once with the reason when feeding stops for good.
    """

    def __init__(self, buffer: Any, run_id: str, *, health: Callable[[], str | None] = lambda: None,
                 feed_timeout_s: float = 60.0, poll_s: float = 1.0, on_stop: Callable[[str], None] | None = None):
        if feed_timeout_s <= 0 or poll_s <= 0:
            raise ValueError(f"feed_timeout_s and poll_s must be > 0, got {feed_timeout_s}, {poll_s}")
        self.buffer = buffer
        self.run_id = run_id
        self.health = health
        self.feed_timeout_s = float(feed_timeout_s)
        self.poll_s = float(poll_s)
        self.on_stop = on_stop
        self.fed = 0
        self.refused = 0  # duplicate / consumed / zero-variance / full (counted by the buffer too)
        self.skipped = 0  # a sample without tokens: not a trainable group
        self.not_fed = 0  # after feeding stopped
        self.stopped: str | None = None

    def _stop(self, reason: str) -> None:
        if self.stopped is None:
            self.stopped = reason
            log.error("feeding the learner stopped: %s", reason)
            if self.on_stop is not None:
                self.on_stop(reason)

    def _still_healthy(self) -> bool:
        if self.stopped is None:
            reason = self.health()
            if reason is not None:
                self._stop(reason)
        return self.stopped is None

    async def feed(self, task: Task, samples: Sequence[PlanSample], verdicts: Sequence[Verdict],
                   policy_version: int, episode_ids: Sequence[str]) -> bool:
        """Build the task's scored group (see :func:`~worldagent_ray.rl.groups.scored_group`) and
        :meth:`feed_group` it; False (counted as ``skipped``) when a sample has no tokens."""
        group = scored_group(task, f"{self.run_id}:{task.id}", samples, [float(v.reward) for v in verdicts],
                             policy_version, episode_ids)
        if group is None:
            self.skipped += 1
            return False
        return await self.feed_group(group)

    async def feed_group(self, group: ScoredGroup) -> bool:
        """Queue one scored group. Returns True if queued; False if feeding has stopped (see
        :attr:`stopped`), the buffer refused it, or the buffer stayed full for
        ``feed_timeout_s``. Never raises for the learner's or the buffer's failures."""
        import ray

        from ..rl.buffer import meta_of
        from .buffer_actor import BufferFullTimeout

        if not self._still_healthy():
            self.not_fed += 1
            return False
        ref = ray.put(group)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.feed_timeout_s
        while True:
            remaining = deadline - loop.time()
            last = remaining <= self.poll_s
            try:
                ok = await self.buffer.put.remote(meta_of(group), [ref], max(0.0, min(self.poll_s, remaining)),
                                                  count_full=last)
            except BufferFullTimeout:
                if last:
                    self.refused += 1
                    return False
                if not self._still_healthy():
                    self.not_fed += 1
                    return False
                continue
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                self._stop(f"the buffer actor is gone: {e}")
                self.not_fed += 1
                return False
            if ok:
                self.fed += 1
            else:
                self.refused += 1
            return bool(ok)


class LearningSession:
    """The buffer and publisher actors and the Ray Train learner (``fit()`` on a thread).

    Args:
        cfg: the whole config (``cfg.learner``, the policy engine, resources).
        run: the run folder; learner checkpoints go under ``run.artifacts`` (the run root: a
            local path or a URI on shared storage), events into its ledger.
        namespace: the Ray namespace of the actors.
        say: progress lines.
        storage_filesystem: a ``pyarrow.fs.FileSystem`` for ``run.artifacts`` (``None``: pyarrow
            infers it from the URI).
    """

    def __init__(self, cfg: Config, run: RunFolder, namespace: str, say: Callable[[str], None] = print,
                 storage_filesystem: Any = None):
        from .buffer_actor import buffer_actor_name, create_buffer_actor
        from .learner_trainer import launch_learner
        from .weight_publisher import create_publisher_actor

        self.cfg = cfg
        self.run = run
        self.say = say
        self.publisher_name = f"worldagent-weights-{run.run_id}"
        self.publisher = create_publisher_actor(self.publisher_name, namespace=namespace)
        self.buffer = create_buffer_actor(cfg.learner, name=run.run_id, namespace=namespace)
        self.feeder = GroupFeeder(self.buffer, run.run_id, health=self.health,
                                  feed_timeout_s=cfg.learner.feed_timeout_s, on_stop=self._record_stop)
        # No idle timeout: the learner waits for rollouts (deployment can take minutes) and
        # stops when finish() closes the buffer and it has drained.
        self.trainer = launch_learner(cfg, run.artifacts, buffer_actor_name(run.run_id), self.publisher_name,
                                      namespace=namespace, idle_timeout_s=None,
                                      storage_filesystem=storage_filesystem)
        self.result = None
        self.error: BaseException | None = None
        self._steps_seq = 0  # next learner step record to copy into the ledger
        self.latest_step: LearnerStep | None = None  # the newest step record copied (progress shows it)
        self._thread = threading.Thread(target=self._fit, name="grpo-learner", daemon=True)
        self._thread.start()
        say(f"  learner started (Ray Train, {cfg.learner.num_workers} worker(s), {cfg.learner.backend}, "
            f"{cfg.learner.parallel_strategy})")

    def _fit(self) -> None:
        try:
            self.result = self.trainer.fit()
        except BaseException as e:  # surfaced by healthy() and finish()
            self.error = e
            log.error("learner failed: %s", e)

    def _record_stop(self, reason: str) -> None:
        self.run.record_event(event="learner_stopped", reason=reason[:500])
        self.say(f"  learner stopped: {reason[:200]}")

    async def feed(self, group: ScoredGroup) -> bool:
        """Queue one reward-scored group (the driver's ``Learner.feed``); see
        :meth:`GroupFeeder.feed_group`."""
        return await self.feeder.feed_group(group)

    async def healthy(self) -> str | None:
        """The driver's ``Learner.healthy``: see :meth:`health`. Also copies the learner's new
        step records into the run's ledger (bounded; a slow buffer only delays them)."""
        try:
            steps, nxt = await asyncio.wait_for(self.buffer.steps_since.remote(self._steps_seq), 10.0)
            self._record_steps(steps, nxt)
        except Exception as e:  # the curve is best effort; health below is what counts
            log.debug("learner steps not copied: %s", e)
        return self.health()

    def _record_steps(self, steps: list[tuple[float, dict[str, float]]], nxt: int) -> None:
        rows = []
        for t, m in steps:
            try:
                rows.append(LearnerStep.from_metrics(m, t))
            except ValidationError as e:
                log.warning("learner step record skipped: %s", e)
        self.run.record_learner_steps(rows)
        self._steps_seq = nxt
        if rows:
            self.latest_step = rows[-1]

    def health(self) -> str | None:
        """``None`` while the learner runs (Ray Train restarting a failed worker counts as
        running); otherwise why it stopped: failed for good, or finished."""
        if self.error is not None:
            return f"learner failed: {type(self.error).__name__}: {self.error}"
        if not self._thread.is_alive():
            step = (self.result.metrics or {}).get("step") if self.result is not None else None
            return f"learner finished (step {step})"
        return None

    def finish(self, timeout_s: float = 600.0) -> dict[str, Any]:
        """Close the buffer (no more rollouts) and wait up to ``timeout_s`` for a healthy learner
        to drain it, checkpoint and stop. Returns the feeding counts, the buffer's stats
        (``acked``, ``in_flight``, ``consumed_ids``, ...), the weight publisher's view
        (``published_version``, ``transport``: ``object_store`` or ``collective``, and
        ``replicas``: ``{replica id: {"acked", "behind", "live"}}``, the version each engine
        replica acknowledged serving) and the learner's final metrics or error."""
        import ray

        t0 = time.time()
        try:
            ray.get(self.buffer.close.remote(), timeout=30)
        except Exception as e:  # the buffer is gone: nothing left to drain
            self.error = self.error or e
        if self.error is None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                self.error = TimeoutError(f"learner still running {timeout_s:.0f}s after the rollouts ended")
        try:
            self._record_steps(*ray.get(self.buffer.steps_since.remote(self._steps_seq), timeout=30))
        except Exception as e:
            log.warning("learner steps not copied into the ledger: %s", e)
        try:
            stats = ray.get(self.buffer.stats.remote(), timeout=30)
        except Exception as e:
            stats = {"error": f"{type(e).__name__}: {e}"}
        try:  # what the engines serve: the publisher's latest version and each replica's ack
            weights = ray.get(self.publisher.status.remote(), timeout=30)
        except Exception as e:
            weights = {"error": f"{type(e).__name__}: {e}"}
        f = self.feeder
        out: dict[str, Any] = {"fed_groups": f.fed, "refused": f.refused, "skipped": f.skipped,
                               "not_fed": f.not_fed, "buffer": stats, "wait_s": round(time.time() - t0, 1),
                               "published_version": weights.get("version"), "transport": weights.get("transport"),
                               "replicas": {rid: {k: r[k] for k in ("acked", "behind", "live")}
                                            for rid, r in (weights.get("replicas") or {}).items()}}
        if "error" in weights:
            out["publisher_error"] = weights["error"]
        if f.stopped is not None:
            out["feeding_stopped"] = f.stopped
        if self.error is not None:
            out["error"] = f"{type(self.error).__name__}: {self.error}"
        elif self.result is not None:
            m = self.result.metrics or {}
            out.update({k: m[k] for k in ("policy_version", "loss", "reward_mean", "idle_frac", "step") if k in m})
            out["checkpoint"] = str(self.result.checkpoint.path) if self.result.checkpoint else None
        return out


def start_learning(cfg: Config, run: RunFolder, namespace: str, say: Callable[[str], None] = print,
                   storage_filesystem: Any = None) -> LearningSession:
    return LearningSession(cfg, run, namespace, say, storage_filesystem=storage_filesystem)
