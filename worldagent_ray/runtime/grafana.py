"""The WorldAgent-Ray Grafana dashboard, built from the metric definitions in :mod:`.metrics`.

The JSON follows the shape of the dashboards Ray generates for itself
(``ray/dashboard/modules/metrics``): a hidden ``datasource`` variable of type prometheus, a
``SessionName`` variable that every query filters on, a ``window`` interval for ``rate()``,
panels in rows on a 24-column grid. Ray writes its
dashboards into ``<session>/metrics/grafana/dashboards`` (or ``$RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR``)
and the Grafana provisioning it writes next to them loads every JSON file in that folder, so
:func:`install_dashboard` puts ours there after Ray has started.

The shipped copy is ``deployments/grafana/worldagent_grafana_dashboard.json``; regenerate it with
``python -m worldagent_ray.runtime.grafana deployments/grafana/worldagent_grafana_dashboard.json``
(a unit test fails when it is stale).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .metrics import METRICS, PROMETHEUS_PREFIX

DASHBOARD_UID = "worldagentRay"
DASHBOARD_FILE = "worldagent_grafana_dashboard.json"
DASHBOARD_OUTPUT_DIR_ENV = "RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR"  # the variable Ray's metrics head reads
METRICS_ROOT_ENV = "RAY_METRICS_OUTPUT_ROOT"

S = 'SessionName=~"$SessionName"'
RUN = f'{S}, run=~"$run"'
BUF = f'{S}, buffer=~"$run"'  # the buffer is named after the run
RUN_OK = RUN + ', status="ok"'
RUN_FAILED = RUN + ', status="failed"'
WORLD_ERR = S + ', outcome="error"'
W = "[$window]"


def _m(name: str, suffix: str = "") -> str:
    """A metric's Prometheus series name; fails at import if the metric is not defined."""
    if name not in METRICS:
        raise KeyError(f"{name!r} is not defined in worldagent_ray.runtime.metrics")
    return PROMETHEUS_PREFIX + name + suffix


def _rate(name: str, sel: str, suffix: str = "") -> str:
    return f"rate({_m(name, suffix)}{{{sel}}}{W})"


def _mean(name: str, sel: str, by: str) -> str:
    """Mean of a histogram's observations over the window: rate(sum) / rate(count)."""
    return (f"sum by ({by}) ({_rate(name, sel, '_sum')}) / "
            f"sum by ({by}) ({_rate(name, sel, '_count')})")


def _quantile(q: float, name: str, sel: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) ({_rate(name, sel, '_bucket')}))"


@dataclass
class Panel:
    title: str
    description: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    min: float | None = None
    max: float | None = None
    stack: bool = False


@dataclass
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


ROWS: list[Row] = [
    Row("Loop", [
        Panel("Episodes/s by phase", "Committed episodes per second, by curriculum phase and status.",
              [(f"sum by (phase, status) ({_rate('worldagent_episodes_total', RUN)})",
                "phase {{phase}} {{status}}")], unit="ops", stack=True),
        Panel("Success and reward by phase",
              "Rolling means over the driver's last episodes (gauges) and the success rate over the window.",
              [(f"max by (phase) ({_m('worldagent_success_rate')}{{{RUN}}})", "success (rolling) phase {{phase}}"),
               (f"max by (phase) ({_m('worldagent_reward_mean')}{{{RUN}}})", "reward (rolling) phase {{phase}}"),
               (f"sum by (phase) ({_rate('worldagent_success_total', RUN)}) / "
                f"sum by (phase) ({_rate('worldagent_episodes_total', RUN_OK)})",
                "success (window) phase {{phase}}")], unit="percentunit", min=0, max=1),
        Panel("Critic scores (mean)", "Mean of each of the five critic scores over the window.",
              [(_mean("worldagent_critic_score", RUN, "dimension"), "{{dimension}}")],
              unit="percentunit", min=0, max=1),
        Panel("Critic scores (median by phase)", "Median of each critic score, by phase, from the histogram.",
              [(_quantile(0.5, "worldagent_critic_score", RUN, "dimension, phase"), "{{dimension}} phase {{phase}}")],
              unit="percentunit", min=0, max=1),
        Panel("Curriculum phase", "The curriculum's current phase (1 atomic, 2 composite, 3 multi-stage).",
              [(f"max by (run) ({_m('worldagent_curriculum_phase')}{{{RUN}}})", "{{run}}")], min=1, max=3),
    ]),
    Row("Pipeline", [
        Panel("Stage latency", "Latency of one stage call (action, world, critic): median, p95 and mean.",
              [(_quantile(0.5, "worldagent_stage_latency_s", RUN, "stage"), "p50 {{stage}}"),
               (_quantile(0.95, "worldagent_stage_latency_s", RUN, "stage"), "p95 {{stage}}"),
               (_mean("worldagent_stage_latency_s", RUN, "stage"), "mean {{stage}}")], unit="s"),
        Panel("Queue depth", "Groups waiting before each stage (a full queue pushes back on the stage before).",
              [(f"max by (stage) ({_m('worldagent_queue_depth')}{{{RUN}}})", "{{stage}}")]),
        Panel("Retries and failed episodes",
              "Stage calls retried per second, and episodes recorded as failed (after the last retry).",
              [(f"sum by (stage) ({_rate('worldagent_retries_total', RUN)})", "retries {{stage}}"),
               (f"sum by (phase) ({_rate('worldagent_episodes_total', RUN_FAILED)})",
                "failed episodes phase {{phase}}")], unit="ops"),
        Panel("World errors and buffer drops",
              "Rollouts the world returned with an error, and groups the buffer refused or discarded, by reason.",
              [(f"sum by (world) ({_rate('worldagent_world_rollouts_total', WORLD_ERR)})",
                "world errors {{world}}"),
               (f"sum by (reason) ({_rate('worldagent_buffer_dropped_total', BUF)})", "buffer drop {{reason}}")],
              unit="ops"),
    ]),
    Row("World model", [
        Panel("World-replica utilisation", "Fraction of wall time each world replica spends rendering a batch.",
              [(f"sum by (world, replica) ({_rate('worldagent_world_batch_seconds', S, '_sum')})",
                "{{world}} {{replica}}")], unit="percentunit", min=0),
        Panel("World batch size", "Mean requests per served batch (@serve.batch), per replica.",
              [(_mean("worldagent_world_batch_requests", S, "world, replica"), "{{world}} {{replica}}")]),
        Panel("Rollouts/s", "Rollouts rendered per second, by outcome.",
              [(f"sum by (world, outcome) ({_rate('worldagent_world_rollouts_total', S)})", "{{world}} {{outcome}}")],
              unit="ops", stack=True),
        Panel("World batch time", "Wall time of one served batch: median and p95.",
              [(_quantile(0.5, "worldagent_world_batch_seconds", S, "world"), "p50 {{world}}"),
               (_quantile(0.95, "worldagent_world_batch_seconds", S, "world"), "p95 {{world}}")], unit="s"),
    ]),
    Row("Rollout buffer", [
        Panel("Buffer size", "Groups queued in the rollout buffer.",
              [(f"max by (buffer) ({_m('worldagent_buffer_size')}{{{BUF}}})", "{{buffer}}")]),
        Panel("Staleness of consumed groups", "Policy versions between generation and consumption: mean and p95.",
              [(_mean("worldagent_buffer_staleness", BUF, "buffer"), "mean {{buffer}}"),
               (_quantile(0.95, "worldagent_buffer_staleness", BUF, "buffer"), "p95 {{buffer}}")]),
    ]),
    Row("Learner", [
        Panel("Learner loss", "GRPO loss of the last optimizer step.",
              [(f"max({_m('worldagent_learner_loss')}{{{S}}})", "loss")]),
        Panel("KL and grad norm", "k3 KL to the reference (only when learner.beta > 0) and the gradient norm.",
              [(f"max({_m('worldagent_learner_kl')}{{{S}}})", "KL"),
               (f"max({_m('worldagent_learner_grad_norm')}{{{S}}})", "grad norm")]),
        Panel("Learner steps/s and idle", "Optimizer steps per second and the fraction of time waiting on the buffer.",
              [(f"sum({_rate('worldagent_learner_steps_total', S)})", "steps/s"),
               (f"max({_m('worldagent_learner_idle_fraction')}{{{S}}})", "idle fraction")]),
        Panel("Learner reward and staleness", "Mean reward and mean staleness (versions) of the last batch.",
              [(f"max({_m('worldagent_learner_reward_mean')}{{{S}}})", "reward"),
               (f"max({_m('worldagent_learner_staleness_mean')}{{{S}}})", "staleness")]),
        Panel("Weights version per engine replica",
              "The learner's policy version and the version each engine replica generates with.",
              [(f"max({_m('worldagent_learner_policy_version')}{{{S}}})", "learner"),
               (f"max by (engine, replica) ({_m('worldagent_engine_weights_version')}{{{S}}})",
                "{{engine}} {{replica}}")]),
    ]),
]


def _panel_json(p: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": p.unit, "custom": {"fillOpacity": 10, "lineWidth": 1, "showPoints": "never",
                                                           "stacking": {"mode": "normal" if p.stack else "none"}}}
    if p.min is not None:
        defaults["min"] = p.min
    if p.max is not None:
        defaults["max"] = p.max
    return {
        "id": pid, "type": "timeseries", "title": p.title, "description": p.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {"datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": expr, "legendFormat": legend,
             "refId": chr(ord("A") + i), "interval": ""}
            for i, (expr, legend) in enumerate(p.targets)
        ],
    }


def _query_variable(name: str, label: str, metric: str, hide: int = 0, selector: str = "") -> dict[str, Any]:
    q = f"label_values({metric}{{{selector}}}, {label})" if selector else f"label_values({metric}, {label})"
    return {
        "name": name, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "description": f"Filter queries to specific values of {label}.",
        "definition": q, "query": {"query": q, "refId": "StandardVariableQuery"},
        "refresh": 2, "hide": hide, "includeAll": True, "multi": True, "allValue": ".*", "sort": 2,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def build_dashboard() -> dict[str, Any]:
    """The dashboard as a dict (``json.dumps`` it for Grafana)."""
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row in ROWS:
        panels.append({"id": pid, "type": "row", "title": row.title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y = pid + 1, y + 1
        for i, p in enumerate(row.panels):
            panels.append(_panel_json(p, pid, 12 * (i % 2), y + 8 * (i // 2)))
            pid += 1
        y += 8 * ((len(row.panels) + 1) // 2)
    episodes = _m("worldagent_episodes_total")
    return {
        "title": "WorldAgent-Ray", "uid": DASHBOARD_UID, "description":
            "The self-evolving loop: throughput, success, critic scores, stages, world replicas, buffer, learner.",
        "version": 1, "schemaVersion": 27, "style": "dark", "editable": True, "graphTooltip": 1,
        "refresh": "10s", "time": {"from": "now-30m", "to": "now"},
        "tags": ["worldagent"],
        "annotations": {"list": [{"builtIn": 1, "datasource": "-- Grafana --", "enable": True, "hide": True,
                                  "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
                                  "type": "dashboard"}]},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "hide": 2, "refresh": 1,
             "includeAll": False, "multi": False, "current": {"selected": False},
             "description": "Filter queries of a specific Prometheus type."},
            {"name": "window", "label": "Window", "type": "interval", "query": "30s,1m,5m,15m", "hide": 0,
             "description": "Averaging window of rate() and histogram queries.", "auto": False, "refresh": 2,
             "current": {"selected": True, "text": "1m", "value": "1m"},
             "options": [{"selected": v == "1m", "text": v, "value": v} for v in ("30s", "1m", "5m", "15m")]},
            _query_variable("SessionName", "SessionName", episodes),
            _query_variable("run", "run", episodes, selector=S),
        ]},
        "panels": panels,
    }


def dashboard_json() -> str:
    return json.dumps(build_dashboard(), indent=2, sort_keys=True) + "\n"


def ray_dashboard_dir(session_dir: str | os.PathLike[str]) -> Path:
    """The folder Ray's Grafana provisioning loads dashboards from, for a Ray session folder
    (the same rule as Ray's metrics head: the two ``RAY_METRICS_*`` variables win)."""
    if os.environ.get(DASHBOARD_OUTPUT_DIR_ENV):
        return Path(os.environ[DASHBOARD_OUTPUT_DIR_ENV])
    root = os.environ.get(METRICS_ROOT_ENV) or os.path.join(session_dir, "metrics")
    return Path(root) / "grafana" / "dashboards"


def install_dashboard(session_dir: str | os.PathLike[str]) -> Path:
    """Write the dashboard next to Ray's own for the session in ``session_dir`` (on the head
    node: the folder of ``ray.init``'s session, e.g. ``/tmp/ray/session_latest``). Call it after
    Ray started (Ray's dashboard recreates that folder at start). Returns the file written."""
    out = ray_dashboard_dir(session_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / DASHBOARD_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(dashboard_json())
    os.replace(tmp, path)
    return path


def install_for_this_session() -> Path | None:
    """:func:`install_dashboard` for the Ray session this process is connected to, when this
    node holds that session's Grafana folder (the head node, where a ``ray job submit`` driver
    runs by default); None elsewhere or when Ray's dashboard is off. Never raises."""
    try:
        import ray

        session = ray._private.worker.global_worker.node.get_session_dir_path()
        if not (ray_dashboard_dir(session).parent).is_dir():  # no Grafana config: not head, or no dashboard
            return None
        return install_dashboard(session)
    except Exception:
        return None


def panel_series(dashboard: dict[str, Any]) -> set[str]:
    """Every ``ray_*`` series name the dashboard's queries read."""
    import re

    names: set[str] = set()
    for expr in panel_exprs(dashboard):
        names.update(re.findall(r"\bray_[A-Za-z0-9_:]+", expr))
    return names


def panel_exprs(dashboard: dict[str, Any]) -> list[str]:
    out = []

    def walk(panels: Sequence[dict[str, Any]]) -> None:
        for p in panels:
            out.extend(t["expr"] for t in p.get("targets", []))
            walk(p.get("panels", []))

    walk(dashboard.get("panels", []))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    text = dashboard_json()
    if args:
        Path(args[0]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
