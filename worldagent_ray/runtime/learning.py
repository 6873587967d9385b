"""``--learn``: the asynchronous GRPO learner beside the rollouts.

The driver feeds every reward-scored group into the buffer actor as an ObjectRef (the data
stays in the object store); the Ray Train learner pulls batches, steps, checkpoints and
publishes weights; the Action engine replicas pick new versions up from the publisher
(pause -> load -> resume). Nothing here blocks the driver's event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Sequence

from ..config import Config
from ..schemas import PlanSample, ScoredGroup, Task, Verdict
from ..orchestration.run_folder import RunFolder

log = logging.getLogger(__name__)


def scored_group(task: Task, group_id: str, samples: Sequence[PlanSample], verdicts: Sequence[Verdict],
                 policy_version: int, episode_ids: Sequence[str]) -> ScoredGroup | None:
    """A GRPO group from one task's samples, or None when a sample carries no tokens (an
    engine error): such a group cannot be scored token by token."""
    if any(not s.completion.token_ids or len(s.completion.logprobs) != len(s.completion.token_ids)
           for s in samples):
        return None
    return ScoredGroup(
        group_id=group_id, task_id=task.id, policy_version=policy_version,
        prompt_token_ids=[list(s.completion.prompt_token_ids) for s in samples],
        completion_token_ids=[list(s.completion.token_ids) for s in samples],
        rollout_logprobs=[list(s.completion.logprobs) for s in samples],
        rewards=[float(v.reward) for v in verdicts],
        episode_ids=list(episode_ids),
    )


class GroupFeeder:
    """Puts scored groups into the buffer; waits (back-pressure) while the buffer is full."""

    def __init__(self, buffer: Any, run_id: str):
        self.buffer = buffer
        self.run_id = run_id
        self.fed = 0
        self.refused = 0
        self.skipped = 0

    async def feed(self, task: Task, samples: Sequence[PlanSample], verdicts: Sequence[Verdict],
                   policy_version: int, episode_ids: Sequence[str]) -> bool:
        import ray

        from ..rl.buffer import meta_of

        group = scored_group(task, f"{self.run_id}:{task.id}", samples, verdicts, policy_version, episode_ids)
        if group is None:
            self.skipped += 1
            return False
        ref = ray.put(group)
        ok = await self.buffer.put.remote(meta_of(group), [ref])
        if ok:
            self.fed += 1
        else:
            self.refused += 1  # duplicate / consumed / zero-variance: counted by the buffer too
        return bool(ok)


class LearningSession:
    def __init__(self, cfg: Config, run: RunFolder, namespace: str, say: Callable[[str], None] = print):
        from .buffer_actor import buffer_actor_name, create_buffer_actor
        from .learner_trainer import launch_learner
        from .weight_publisher import create_publisher_actor

        self.cfg = cfg
        self.say = say
        self.publisher_name = f"worldagent-weights-{run.run_id}"
        self.publisher = create_publisher_actor(self.publisher_name, namespace=namespace)
        self.buffer = create_buffer_actor(cfg.learner, name=run.run_id, namespace=namespace)
        self.feeder = GroupFeeder(self.buffer, run.run_id)
        # No idle timeout: the learner waits for rollouts (deployment can take minutes) and
        # stops when finish() closes the buffer and it has drained.
        self.trainer = launch_learner(cfg, str(run.local), buffer_actor_name(run.run_id), self.publisher_name,
                                      namespace=namespace, idle_timeout_s=None)
        self.result = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._fit, name="grpo-learner", daemon=True)
        self._thread.start()
        say(f"  learner started (Ray Train, {cfg.learner.num_workers} worker(s), {cfg.learner.backend})")

    def _fit(self) -> None:
        try:
            self.result = self.trainer.fit()
        except BaseException as e:  # surfaced by finish()
            self.error = e
            log.error("learner failed: %s", e)

    def finish(self, timeout_s: float = 600.0) -> dict[str, Any]:
        """Close the buffer (no more rollouts) and wait for the learner to drain it and stop."""
        import ray

        t0 = time.time()
        ray.get(self.buffer.close.remote())
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.error = TimeoutError(f"learner still running {timeout_s:.0f}s after the rollouts ended")
        stats = ray.get(self.buffer.stats.remote())
        out: dict[str, Any] = {"fed_groups": self.feeder.fed, "refused": self.feeder.refused,
                               "skipped": self.feeder.skipped, "buffer": stats,
                               "wait_s": round(time.time() - t0, 1)}
        if self.error is not None:
            out["error"] = f"{type(self.error).__name__}: {self.error}"
        elif self.result is not None:
            m = self.result.metrics or {}
            out.update({k: m[k] for k in ("policy_version", "loss", "reward_mean", "idle_frac") if k in m})
            out["checkpoint"] = str(self.result.checkpoint.path) if self.result.checkpoint else None
        return out


def start_learning(cfg: Config, run: RunFolder, namespace: str, say: Callable[[str], None] = print) -> LearningSession:
    return LearningSession(cfg, run, namespace, say)
