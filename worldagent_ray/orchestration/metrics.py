"""Loop metrics: Ray metrics (Prometheus, shown in the Ray dashboard) for throughput, stage
latency, queue depths, and reward and success by phase."""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Sequence

from ..schemas import Episode

_LATENCY_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300]


class LoopMetrics:
    """Created in the driver process; every series carries the run id as a tag."""

    def __init__(self, run_id: str, window: int = 64):
        from ray.util import metrics as m

        self.tags = {"run": run_id}
        keys = ("run",)
        self.episodes_total = m.Counter("worldagent_episodes_total", "Episodes committed",
                                        tag_keys=keys + ("phase", "status"))
        self.success_total = m.Counter("worldagent_success_total", "Successful episodes", tag_keys=keys + ("phase",))
        self.stage_latency = m.Histogram("worldagent_stage_latency_s", "Latency of one pipeline stage call",
                                         boundaries=_LATENCY_BOUNDARIES, tag_keys=keys + ("stage",))
        self.queue_depth = m.Gauge("worldagent_queue_depth", "Items waiting before a stage", tag_keys=keys + ("stage",))
        self.reward = m.Gauge("worldagent_reward_mean", "Mean reward over the last episodes", tag_keys=keys + ("phase",))
        self.success = m.Gauge("worldagent_success_rate", "Success rate over the last episodes", tag_keys=keys + ("phase",))
        self.phase = m.Gauge("worldagent_curriculum_phase", "Current curriculum phase", tag_keys=keys)
        self.retries = m.Counter("worldagent_retries_total", "Stage calls retried", tag_keys=keys + ("stage",))
        self._recent: dict[int, deque] = defaultdict(lambda: deque(maxlen=window))

    def stage(self, stage: str, latency_s: float, depths: dict[str, int]) -> None:
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
