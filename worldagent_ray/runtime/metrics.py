"""Every Ray metric WorldAgent-Ray exports, defined in this one module.

Ray exports them to Prometheus (prefixed ``ray_``) and the Ray dashboard's Metrics view shows
them. Each part of the system creates its own small set in the process it runs in:

- :class:`LoopMetrics`: the driver (episodes, success, reward, stage latency, queue depths,
  retries, curriculum phase);
- :class:`WorldMetrics`: a world replica (rollouts, batch size, batch time);
- :class:`EngineMetrics`: an engine replica (the weights version it generates with);
- :class:`BufferMetrics`: the rollout buffer actor (size, staleness, drops);
- :class:`LearnerMetrics`: the learner's rank 0 (version, loss, reward, staleness, idle, steps).

Latency histograms share :data:`LATENCY_BOUNDARIES_S`.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Any, Mapping, Sequence

from ray.util import metrics as m

from ..schemas import Episode, Rollout

LATENCY_BOUNDARIES_S = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600]
"""Bucket bounds (seconds) of every latency histogram."""

STALENESS_BOUNDARIES = [0.5, 1.5, 2.5, 3.5, 4.5, 8.5, 16.5, 32.5]
"""Staleness buckets: 0, 1, 2, 3, 4, 5-8, 9-16, 17-32, more (Ray wants positive bounds)."""

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]


class LoopMetrics:
    """The driver's metrics; every series carries the run id as the ``run`` tag."""

    def __init__(self, run_id: str, window: int = 64):
        self.tags = {"run": run_id}
        keys = ("run",)
        self.episodes_total = m.Counter("worldagent_episodes_total", "Episodes committed",
                                        tag_keys=keys + ("phase", "status"))
        self.success_total = m.Counter("worldagent_success_total", "Successful episodes", tag_keys=keys + ("phase",))
        self.stage_latency = m.Histogram("worldagent_stage_latency_s", "Latency of one pipeline stage call",
                                         boundaries=LATENCY_BOUNDARIES_S, tag_keys=keys + ("stage",))
        self.queue_depth = m.Gauge("worldagent_queue_depth", "Items waiting before a stage", tag_keys=keys + ("stage",))
        self.reward = m.Gauge("worldagent_reward_mean", "Mean reward over the last episodes", tag_keys=keys + ("phase",))
        self.success = m.Gauge("worldagent_success_rate", "Success rate over the last episodes", tag_keys=keys + ("phase",))
        self.phase = m.Gauge("worldagent_curriculum_phase", "Current curriculum phase", tag_keys=keys)
        self.retries = m.Counter("worldagent_retries_total", "Stage calls retried", tag_keys=keys + ("stage",))
        self._recent: dict[int, deque] = defaultdict(lambda: deque(maxlen=window))

    def stage(self, stage: str, latency_s: float, depths: Mapping[str, int]) -> None:
        self.stage_latency.observe(latency_s, tags={**self.tags, "stage": stage})
        for k, v in depths.items():
            self.queue_depth.set(v, tags={**self.tags, "stage": k})

    def retry(self, stage: str) -> None:
        self.retries.inc(tags={**self.tags, "stage": stage})

    def episodes(self, eps: Sequence[Episode], phase: int) -> None:
        for e in eps:
            p = str(e.task.phase)
            self.episodes_total.inc(tags={**self.tags, "phase": p, "status": e.status})
            if e.status == "ok":
                self._recent[e.task.phase].append((e.reward, e.success))
                if e.success:
                    self.success_total.inc(tags={**self.tags, "phase": p})
        for ph, q in self._recent.items():
            if q:
                self.reward.set(sum(r for r, _ in q) / len(q), tags={**self.tags, "phase": str(ph)})
                self.success.set(sum(s for _, s in q) / len(q), tags={**self.tags, "phase": str(ph)})
        self.phase.set(phase, tags=self.tags)


class WorldMetrics:
    """A world replica's metrics (tag ``world``: the backend's name)."""

    def __init__(self, world: str):
        self.tags = {"world": world}
        self.rollouts = m.Counter("worldagent_world_rollouts", "Rollouts rendered, by outcome.",
                                  tag_keys=("world", "outcome"))
        self.batch = m.Histogram("worldagent_world_batch_requests", "Requests per served batch.",
                                 boundaries=BATCH_BOUNDARIES, tag_keys=("world",))
        self.latency = m.Histogram("worldagent_world_batch_seconds", "Wall time of one served batch.",
                                   boundaries=LATENCY_BOUNDARIES_S, tag_keys=("world",))

    def record(self, n_requests: int, seconds: float, results: Sequence[Sequence[Rollout]]) -> None:
        self.batch.observe(n_requests, tags=self.tags)
        self.latency.observe(seconds, tags=self.tags)
        for rs in results:
            for r in rs:
                self.rollouts.inc(1, tags={**self.tags, "outcome": "error" if r.error else "ok"})


class EngineMetrics:
    """An engine replica's metrics (tag ``engine``: the engine's name in the config)."""

    def __init__(self, engine: str):
        self.tags = {"engine": engine}
        self.version = m.Gauge("worldagent_engine_weights_version",
                               "Weights version an engine replica generates with", tag_keys=("engine",))

    def weights_version(self, version: int) -> None:
        self.version.set(version, tags=self.tags)


class BufferMetrics:
    """The rollout buffer's metrics (tag ``buffer``: the buffer's name)."""

    def __init__(self, name: str):
        tags = {"buffer": name}
        self.size = m.Gauge("worldagent_buffer_size", description="Groups queued in the rollout buffer.",
                            tag_keys=("buffer",))
        self.size.set_default_tags(tags)
        self.staleness = m.Histogram(
            "worldagent_buffer_staleness",
            description="Policy versions between generation and consumption of a group.",
            boundaries=STALENESS_BOUNDARIES,
            tag_keys=("buffer",),
        )
        self.staleness.set_default_tags(tags)
        self.dropped = m.Counter("worldagent_buffer_dropped_total",
                                 description="Groups refused or discarded by the buffer, by reason.",
                                 tag_keys=("buffer", "reason"))
        self.dropped.set_default_tags(tags)


class LearnerMetrics:
    """The learner's metrics (recorded on rank 0)."""

    def __init__(self) -> None:
        self.version = m.Gauge("worldagent_learner_policy_version", "Policy version of the learner")
        self.idle = m.Gauge("worldagent_learner_idle_fraction", "Fraction of learner time spent waiting on the buffer")
        self.loss = m.Gauge("worldagent_learner_loss", "GRPO loss of the last step")
        self.reward = m.Gauge("worldagent_learner_reward_mean", "Mean reward of the last batch")
        self.staleness = m.Gauge("worldagent_learner_staleness_mean", "Mean staleness (versions) of the last batch")
        self.steps = m.Counter("worldagent_learner_steps_total", "Optimizer steps taken")

    def record(self, version: int, metrics: Mapping[str, Any]) -> None:
        self.version.set(version)
        self.idle.set(float(metrics.get("idle_frac", 0.0)))
        for gauge, key in ((self.loss, "loss"), (self.reward, "reward_mean"), (self.staleness, "staleness_mean")):
            if key in metrics:
                gauge.set(float(metrics[key]))
        self.steps.inc()
