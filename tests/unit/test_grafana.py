"""The shipped Grafana dashboard: every panel reads a metric that ``runtime/metrics.py`` defines,
every defined metric has a panel, and the JSON follows Ray's dashboard conventions."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from worldagent_ray.runtime import grafana
from worldagent_ray.runtime.metrics import METRICS, MetricSpec, exported_series

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "deployments" / "grafana" / grafana.DASHBOARD_FILE


@pytest.fixture(scope="module")
def shipped() -> dict:
    return json.loads(SHIPPED.read_text())


def _leaf_panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        if p["type"] == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def test_shipped_json_is_the_generated_one(shipped):
    assert shipped == grafana.build_dashboard(), (
        f"{SHIPPED} is stale: python -m worldagent_ray.runtime.grafana {SHIPPED.relative_to(ROOT)}")
    assert SHIPPED.read_text() == grafana.dashboard_json()


def test_every_panel_metric_is_defined(shipped):
    exported = exported_series()
    used = grafana.panel_series(shipped)
    unknown = sorted(used - set(exported))
    assert not unknown, f"panels read metrics that runtime/metrics.py never exports: {unknown}"
    assert len(used) >= 25  # the parse found the queries at all


def test_every_defined_metric_has_a_panel(shipped):
    exported = exported_series()
    shown = {exported[s].name for s in grafana.panel_series(shipped)}
    assert set(METRICS) - shown == set(), "metrics defined but on no panel"


def test_the_five_critic_scores_are_a_metric():
    from worldagent_ray.schemas import SCORE_DIMENSIONS

    spec = METRICS["worldagent_critic_score"]
    assert spec.kind == "histogram" and "dimension" in spec.tag_keys and len(SCORE_DIMENSIONS) == 5
    assert spec.boundaries[-1] == 1.0


def test_required_panels_are_there(shipped):
    titles = {p["title"] for p in _leaf_panels(shipped)}
    for needed in ("Episodes/s by phase", "Success and reward by phase", "Critic scores (mean)", "Stage latency",
                   "Queue depth", "World-replica utilisation", "World batch size", "Buffer size",
                   "Staleness of consumed groups", "Learner loss", "KL and grad norm", "Learner steps/s and idle",
                   "Weights version per engine replica", "Retries and failed episodes"):
        assert needed in titles


def test_ray_conventions(shipped):
    names = [v["name"] for v in shipped["templating"]["list"]]
    assert names[:2] == ["datasource", "window"] and "SessionName" in names
    ds = shipped["templating"]["list"][0]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    ids = [p["id"] for p in shipped["panels"]] + [p["id"] for r in shipped["panels"] for p in r.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert shipped["uid"] == grafana.DASHBOARD_UID
    for p in _leaf_panels(shipped):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"] and p["description"], p["title"]


def test_queries_filter_on_the_session_and_use_defined_variables(shipped):
    defined = {v["name"] for v in shipped["templating"]["list"]}
    for expr in grafana.panel_exprs(shipped):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        for selector in re.findall(r"ray_\w+\{([^}]*)\}", expr):
            assert 'SessionName=~"$SessionName"' in selector, expr
        assert re.findall(r"ray_\w+(?!\w|\{)", expr) == [], f"unfiltered metric in {expr}"
        for var in re.findall(r"\$(\w+)", expr):
            assert var in defined, f"${var} is not a dashboard variable ({expr})"
        assert "[$window]" in expr or "rate(" not in expr, expr


@pytest.mark.parametrize("kw, needle", [
    (dict(name="worldagent_x", kind="counter", description="d"), "_total"),
    (dict(name="worldagent_x", kind="histogram", description="d"), "boundaries"),
    (dict(name="worldagent_x", kind="gauge", description="d", boundaries=(1.0,)), "boundaries"),
    (dict(name="other_x", kind="gauge", description="d"), "worldagent_"),
])
def test_bad_metric_definitions_are_refused(kw, needle):
    with pytest.raises(ValueError, match=needle):
        MetricSpec(**kw)


def test_histogram_series_names():
    spec = METRICS["worldagent_stage_latency_s"]
    assert spec.series == ("ray_worldagent_stage_latency_s_bucket", "ray_worldagent_stage_latency_s_sum",
                           "ray_worldagent_stage_latency_s_count")
    assert METRICS["worldagent_episodes_total"].series == ("ray_worldagent_episodes_total",)


def test_install_dashboard_into_a_ray_session(tmp_path, monkeypatch):
    monkeypatch.delenv(grafana.DASHBOARD_OUTPUT_DIR_ENV, raising=False)
    monkeypatch.delenv(grafana.METRICS_ROOT_ENV, raising=False)
    session = tmp_path / "session_x"
    path = grafana.install_dashboard(session)
    assert path == session / "metrics" / "grafana" / "dashboards" / grafana.DASHBOARD_FILE
    assert json.loads(path.read_text()) == grafana.build_dashboard()
    assert grafana.install_dashboard(session) == path  # idempotent
    assert [p.name for p in path.parent.iterdir()] == [grafana.DASHBOARD_FILE]
    monkeypatch.setenv(grafana.DASHBOARD_OUTPUT_DIR_ENV, str(tmp_path / "elsewhere"))
    assert grafana.install_dashboard(session) == tmp_path / "elsewhere" / grafana.DASHBOARD_FILE


def test_building_the_dashboard_does_not_import_ray():
    code = ("import sys, worldagent_ray.runtime.grafana as g; g.build_dashboard(); "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
