"""Every Ray metric WorldAgent-Ray exports, defined in this one module.

Ray exports them to Prometheus with the prefix ``ray_`` (histograms as ``_bucket``, ``_sum``
and ``_count`` series), and the Grafana dashboard in ``deployments/grafana/`` (built by
:mod:`worldagent_ray.runtime.grafana` from :data:`METRICS`) shows them. Each part of the
system creates its own small set in the process it runs in:

- :class:`LoopMetrics`: the driver (episodes, success, reward, the five critic scores, stage
  latency, queue depths, retries, curriculum phase);
- :class:`WorldMetrics`: a world replica (rollouts, batch size, batch time; the batch time
  summed over time is the replica's busy time, i.e. its utilisation);
- :class:`EngineMetrics`: an engine replica (the weights version it generates with);
- :class:`BufferMetrics`: the rollout buffer actor (size, staleness, drops);
- :class:`LearnerMetrics`: the learner's rank 0 (version, loss, KL, grad norm, reward,
  staleness, idle, steps).

:data:`METRICS` lists every definition (name, kind, description, tags, buckets); the classes
build their Ray metrics from it, so a name cannot exist in one place only. Importing this
module does not import Ray: the Ray metric objects are made when a class is instantiated.

Gauges are re-reported every half export interval by a daemon thread (:class:`LiveGauge`):
Ray's metrics agent drops a gauge series that was not reported for two export intervals, so
a value set once (the learner's last loss, a replica's weights version, the curriculum phase)
would otherwise vanish from Prometheus while it is still true. A series still ends with the
process that reports it.

Counters are declared at 0 for the tag sets known in advance (the statuses of a phase once
it has episodes, a stage's retries once it ran, a world's error outcome, the buffer's drop
reasons), as Prometheus advises: "0 successes" shows as 0, not as "no data".
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

from ..rl.buffer import DROP_REASONS
from ..schemas import SCORE_DIMENSIONS, Episode, Rollout

PROMETHEUS_PREFIX = "ray_"
"""Ray prefixes every custom metric with this in the Prometheus export."""

LATENCY_BOUNDARIES_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
"""Bucket bounds (seconds) of every latency histogram."""

STALENESS_BOUNDARIES = (0.5, 1.5, 2.5, 3.5, 4.5, 8.5, 16.5, 32.5)
"""Staleness buckets: 0, 1, 2, 3, 4, 5-8, 9-16, 17-32, more (Ray wants positive bounds)."""

BATCH_BOUNDARIES = (1, 2, 4, 8, 16, 32, 64)

SCORE_BOUNDARIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Buckets of the critic scores (each in [0, 1])."""


@dataclass(frozen=True)
class MetricSpec:
    """One metric definition. ``series`` are the names Prometheus shows for it."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.name.startswith("worldagent_"):
            raise ValueError(f"metric {self.name!r}: every WorldAgent metric name starts with 'worldagent_'")
        if self.kind == "counter" and not self.name.endswith("_total"):
            # Ray's OpenTelemetry exporter appends _total to a counter that lacks it; name it
            # as exported so that the dashboard and this registry agree.
            raise ValueError(f"counter {self.name!r} must end with '_total'")
        if (self.kind == "histogram") != (self.boundaries is not None):
            raise ValueError(f"metric {self.name!r}: boundaries are given for histograms and only for them")

    @property
    def series(self) -> tuple[str, ...]:
        base = PROMETHEUS_PREFIX + self.name
        if self.kind == "histogram":
            return (base + "_bucket", base + "_sum", base + "_count")
        return (base,)


METRICS: dict[str, MetricSpec] = {}
"""Every metric WorldAgent-Ray defines, by name."""


def _spec(name: str, kind: str, description: str, tag_keys: Sequence[str] = (),
          boundaries: Sequence[float] | None = None) -> MetricSpec:
    if name in METRICS:
        raise ValueError(f"metric {name!r} is defined twice")
    spec = MetricSpec(name, kind, description, tuple(tag_keys),  # type: ignore[arg-type]
                      None if boundaries is None else tuple(boundaries))
    METRICS[name] = spec
    return spec


def exported_series() -> dict[str, MetricSpec]:
    """Every Prometheus series name WorldAgent-Ray can export, mapped to its definition."""
    return {s: spec for spec in METRICS.values() for s in spec.series}


# ---------------------------------------------------------------------------- the driver
EPISODES = _spec("worldagent_episodes_total", "counter", "Episodes committed, by phase and status (ok, failed).",
                 ("run", "phase", "status"))
SUCCESSES = _spec("worldagent_success_total", "counter", "Successful episodes, by phase.", ("run", "phase"))
CRITIC_SCORE = _spec("worldagent_critic_score", "histogram",
                     "Critic score of each scored episode, by dimension (the five of seed 000) and phase.",
                     ("run", "phase", "dimension"), SCORE_BOUNDARIES)
STAGE_LATENCY = _spec("worldagent_stage_latency_s", "histogram", "Latency of one pipeline stage call (seconds).",
                      ("run", "stage"), LATENCY_BOUNDARIES_S)
QUEUE_DEPTH = _spec("worldagent_queue_depth", "gauge", "Groups waiting before a stage.", ("run", "stage"))
REWARD_MEAN = _spec("worldagent_reward_mean", "gauge", "Mean reward over the last episodes, by phase.",
                    ("run", "phase"))
SUCCESS_RATE = _spec("worldagent_success_rate", "gauge", "Success rate over the last episodes, by phase.",
                     ("run", "phase"))
PHASE = _spec("worldagent_curriculum_phase", "gauge", "Current curriculum phase.", ("run",))
RETRIES = _spec("worldagent_retries_total", "counter", "Stage calls retried, by stage.", ("run", "stage"))

# ---------------------------------------------------------------------------- world replicas
WORLD_ROLLOUTS = _spec("worldagent_world_rollouts_total", "counter", "Rollouts rendered, by outcome (ok, error).",
                       ("world", "replica", "outcome"))
WORLD_BATCH = _spec("worldagent_world_batch_requests", "histogram", "Requests per served batch.",
                    ("world", "replica"), BATCH_BOUNDARIES)
WORLD_BATCH_SECONDS = _spec("worldagent_world_batch_seconds", "histogram",
                            "Wall time of one served batch (the sum's rate is the replica's utilisation).",
                            ("world", "replica"), LATENCY_BOUNDARIES_S)

# ---------------------------------------------------------------------------- engine replicas
ENGINE_VERSION = _spec("worldagent_engine_weights_version", "gauge",
                       "Weights version an engine replica generates with.", ("engine", "replica"))

# ---------------------------------------------------------------------------- rollout buffer
BUFFER_SIZE = _spec("worldagent_buffer_size", "gauge", "Groups queued in the rollout buffer.", ("buffer",))
BUFFER_STALENESS = _spec("worldagent_buffer_staleness", "histogram",
                         "Policy versions between generation and consumption of a group.",
                         ("buffer",), STALENESS_BOUNDARIES)
BUFFER_DROPPED = _spec("worldagent_buffer_dropped_total", "counter",
                       "Groups refused or discarded by the buffer, by reason.", ("buffer", "reason"))

# ---------------------------------------------------------------------------- learner (rank 0)
LEARNER_VERSION = _spec("worldagent_learner_policy_version", "gauge", "Policy version of the learner.")
LEARNER_IDLE = _spec("worldagent_learner_idle_fraction", "gauge",
                     "Fraction of learner time spent waiting on the buffer.")
LEARNER_LOSS = _spec("worldagent_learner_loss", "gauge", "GRPO loss of the last step.")
LEARNER_KL = _spec("worldagent_learner_kl", "gauge",
                   "Mean k3 KL to the reference model in the last step (exported when learner.beta > 0).")
LEARNER_GRAD_NORM = _spec("worldagent_learner_grad_norm", "gauge", "Gradient norm of the last step (before clipping).")
LEARNER_REWARD = _spec("worldagent_learner_reward_mean", "gauge", "Mean reward of the last batch.")
LEARNER_STALENESS = _spec("worldagent_learner_staleness_mean", "gauge", "Mean staleness (versions) of the last batch.")
LEARNER_STEPS = _spec("worldagent_learner_steps_total", "counter", "Optimizer steps taken.")


def _make(spec: MetricSpec) -> Any:
    from ray.util import metrics as m

    if spec.kind == "counter":
        return m.Counter(spec.name, spec.description, tag_keys=spec.tag_keys)
    if spec.kind == "gauge":
        return m.Gauge(spec.name, spec.description, tag_keys=spec.tag_keys)
    return m.Histogram(spec.name, spec.description, boundaries=list(spec.boundaries or ()), tag_keys=spec.tag_keys)


def _declare(counter: Any, tags: dict[str, str]) -> None:
    """Export ``counter``'s series for ``tags`` at 0 before its first increment. (Ray's
    ``Counter.inc`` refuses 0, so the metric's own record call is used; adding 0 to a
    cumulative sum changes no value.)"""
    try:
        counter._record(0, tags=tags)
    except AttributeError:  # another Ray: the series then appears at its first increment
        pass


class LiveGauge:
    """A Ray ``Gauge`` whose last value per tag set is re-reported until the process ends
    (see the module docstring). Same ``set`` / ``set_default_tags`` as Ray's gauge."""

    def __init__(self, spec: MetricSpec):
        if spec.kind != "gauge":
            raise ValueError(f"LiveGauge needs a gauge, {spec.name!r} is a {spec.kind}")
        self.spec = spec
        self._gauge = _make(spec)
        self._last: dict[tuple, tuple[float, dict[str, str] | None]] = {}
        self._lock = threading.Lock()
        _keeper().add(self)

    def set_default_tags(self, tags: dict[str, str]) -> None:
        self._gauge.set_default_tags(tags)

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._gauge.set(value, tags=tags)
        with self._lock:
            self._last[tuple(sorted((tags or {}).items()))] = (value, tags)

    def refresh(self) -> None:
        with self._lock:
            last = list(self._last.values())
        for value, tags in last:
            self._gauge.set(value, tags=tags)


class _Keeper:
    """One daemon thread per process that re-reports every live gauge."""

    def __init__(self) -> None:
        self.gauges: "weakref.WeakSet[LiveGauge]" = weakref.WeakSet()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def add(self, g: LiveGauge) -> None:
        with self.lock:
            self.gauges.add(g)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="worldagent-gauges", daemon=True)
                self.thread.start()

    @staticmethod
    def period_s() -> float:
        """Half of Ray's export interval (which Ray floors at 1 s)."""
        try:
            import ray

            return max(int(ray._config.metrics_report_interval_ms()), 1000) / 2000.0
        except Exception:  # an older Ray without the config accessor: its default interval
            return 5.0

    def _run(self) -> None:
        period = self.period_s()
        while True:
            time.sleep(period)
            with self.lock:
                gauges = list(self.gauges)
            for g in gauges:
                try:
                    g.refresh()
                except Exception:  # Ray is shutting down in this process; try again next time
                    pass


_KEEPER: _Keeper | None = None
_KEEPER_LOCK = threading.Lock()


def _keeper() -> _Keeper:
    global _KEEPER
    with _KEEPER_LOCK:
        if _KEEPER is None:
            _KEEPER = _Keeper()
        return _KEEPER


def replica_id() -> str:
    """The Serve replica this process runs (its unique id), or ``pid<N>`` outside Serve."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # not inside a Serve replica
        return f"pid{os.getpid()}"


class LoopMetrics:
    """The driver's metrics; every series carries the run id as the ``run`` tag."""

    def __init__(self, run_id: str, window: int = 64):
        self.tags = {"run": run_id}
        self.episodes_total = _make(EPISODES)
        self.success_total = _make(SUCCESSES)
        self.critic_score = _make(CRITIC_SCORE)
        self.stage_latency = _make(STAGE_LATENCY)
        self.queue_depth = LiveGauge(QUEUE_DEPTH)
        self.reward = LiveGauge(REWARD_MEAN)
        self.success = LiveGauge(SUCCESS_RATE)
        self.phase = LiveGauge(PHASE)
        self.retries = _make(RETRIES)
        self._recent: dict[int, deque] = defaultdict(lambda: deque(maxlen=window))
        self._declared: set[tuple[str, str]] = set()

    def _declare_once(self, kind: str, value: str) -> None:
        if (kind, value) in self._declared:
            return
        self._declared.add((kind, value))
        if kind == "stage":
            _declare(self.retries, {**self.tags, "stage": value})
        else:
            for status in ("ok", "failed"):
                _declare(self.episodes_total, {**self.tags, "phase": value, "status": status})
            _declare(self.success_total, {**self.tags, "phase": value})

    def stage(self, stage: str, latency_s: float, depths: Mapping[str, int]) -> None:
        self._declare_once("stage", stage)
        self.stage_latency.observe(latency_s, tags={**self.tags, "stage": stage})
        for k, v in depths.items():
            self.queue_depth.set(v, tags={**self.tags, "stage": k})

    def retry(self, stage: str) -> None:
        self._declare_once("stage", stage)
        self.retries.inc(tags={**self.tags, "stage": stage})

    def episodes(self, eps: Sequence[Episode], phase: int) -> None:
        """Count committed episodes; scored ones add their reward, success and five scores."""
        for e in eps:
            p = str(e.task.phase)
            self._declare_once("phase", p)
            self.episodes_total.inc(tags={**self.tags, "phase": p, "status": e.status})
            if e.status == "ok":
                self._recent[e.task.phase].append((e.reward, e.success))
                if e.success:
                    self.success_total.inc(tags={**self.tags, "phase": p})
                if e.verdict is not None:
                    scores = e.verdict.scores.as_dict()
                    for d in SCORE_DIMENSIONS:
                        self.critic_score.observe(scores[d], tags={**self.tags, "phase": p, "dimension": d})
        for ph, q in self._recent.items():
            if q:
                self.reward.set(sum(r for r, _ in q) / len(q), tags={**self.tags, "phase": str(ph)})
                self.success.set(sum(s for _, s in q) / len(q), tags={**self.tags, "phase": str(ph)})
        self.phase.set(phase, tags=self.tags)


class WorldMetrics:
    """A world replica's metrics (tags ``world``: the backend's name, ``replica``: the Serve replica)."""

    def __init__(self, world: str, replica: str | None = None):
        self.tags = {"world": world, "replica": replica or replica_id()}
        self.rollouts = _make(WORLD_ROLLOUTS)
        self.batch = _make(WORLD_BATCH)
        self.latency = _make(WORLD_BATCH_SECONDS)
        for outcome in ("ok", "error"):
            _declare(self.rollouts, {**self.tags, "outcome": outcome})

    def record(self, n_requests: int, seconds: float, results: Sequence[Sequence[Rollout]]) -> None:
        self.batch.observe(n_requests, tags=self.tags)
        self.latency.observe(seconds, tags=self.tags)
        for rs in results:
            for r in rs:
                self.rollouts.inc(1, tags={**self.tags, "outcome": "error" if r.error else "ok"})


class EngineMetrics:
    """An engine replica's metrics (tags ``engine``: the engine's name in the config, ``replica``)."""

    def __init__(self, engine: str, replica: str | None = None):
        self.tags = {"engine": engine, "replica": replica or replica_id()}
        self.version = LiveGauge(ENGINE_VERSION)

    def weights_version(self, version: int) -> None:
        self.version.set(version, tags=self.tags)


class BufferMetrics:
    """The rollout buffer's metrics (tag ``buffer``: the buffer's name)."""

    def __init__(self, name: str):
        tags = {"buffer": name}
        self.size = LiveGauge(BUFFER_SIZE)
        self.size.set_default_tags(tags)
        self.staleness = _make(BUFFER_STALENESS)
        self.staleness.set_default_tags(tags)
        self.dropped = _make(BUFFER_DROPPED)
        self.dropped.set_default_tags(tags)
        for reason in DROP_REASONS:
            _declare(self.dropped, {"reason": reason})


class LearnerMetrics:
    """The learner's metrics (recorded on rank 0)."""

    def __init__(self) -> None:
        self.version = LiveGauge(LEARNER_VERSION)
        self.idle = LiveGauge(LEARNER_IDLE)
        self.loss = LiveGauge(LEARNER_LOSS)
        self.kl = LiveGauge(LEARNER_KL)
        self.grad_norm = LiveGauge(LEARNER_GRAD_NORM)
        self.reward = LiveGauge(LEARNER_REWARD)
        self.staleness = LiveGauge(LEARNER_STALENESS)
        self.steps = _make(LEARNER_STEPS)

    def record(self, version: int, metrics: Mapping[str, Any]) -> None:
        """One optimizer step: ``metrics`` as :meth:`LearnerCore.step` returns them (a key that
        is absent, e.g. ``kl`` when ``beta == 0``, leaves its gauge unset)."""
        self.version.set(version)
        self.idle.set(float(metrics.get("idle_frac", 0.0)))
        for gauge, key in ((self.loss, "loss"), (self.kl, "kl"), (self.grad_norm, "grad_norm"),
                           (self.reward, "reward_mean"), (self.staleness, "staleness_mean")):
            if key in metrics:
                gauge.set(float(metrics[key]))
        self.steps.inc()
