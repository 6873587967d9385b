"""The ``worldagent`` command line: every command answers, with help text and clear errors.
(``worldagent run`` is exercised end to end through ``jobs/evolve.py`` in ``tests/e2e``.)"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from worldagent_ray.cli import app, bench_names, config_rows

runner = CliRunner()


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["config", "show", "--help"],
                                  ["config", "validate", "--help"], ["report", "--help"], ["bench", "--help"],
                                  ["models", "provision", "--help"]])
def test_every_command_has_help(args):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output


def test_config_show_prints_values_and_descriptions():
    r = runner.invoke(app, ["config", "show", "local-cpu", "--set", "run.iterations=7"], env={"COLUMNS": "220"})
    assert r.exit_code == 0, r.output
    assert "run.iterations" in r.output and "Curriculum proposals (rounds) in a run." in r.output
    assert "agents.action.group_size" in r.output and "smollm2-135m-instruct" in r.output


def test_config_validate_accepts_profiles_and_names_bad_fields(tmp_path):
    assert runner.invoke(app, ["config", "validate", "gpu-cluster"]).exit_code == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("agents: {action: {temperature: 9}}\nrun: {pipeline: {wrld: {workers: 1, queue: 1}}}\n")
    r = runner.invoke(app, ["config", "validate", str(bad)])
    assert r.exit_code == 2
    assert "agents.action.temperature" in r.output and "run.pipeline.wrld" in r.output


def test_run_refuses_a_bad_profile_before_starting_anything():
    r = runner.invoke(app, ["run", "--profile", "no-such-profile"])
    assert r.exit_code == 2 and "unknown profile" in r.output and "local-cpu" in r.output


def test_report_rebuilds_the_html_of_a_run(tmp_path):
    import asyncio

    from worldagent_ray.orchestration.evolve import EvolveDriver
    from worldagent_ray.orchestration.run_folder import RunFolder

    from tests.unit.orchestration.fakes import InProcessServices, fast_config

    cfg = fast_config("run.iterations=1", f"run.root={tmp_path}")
    run = RunFolder.create(cfg, "rep")
    asyncio.run(EvolveDriver(cfg, run, InProcessServices(cfg)).run_loop())
    r = runner.invoke(app, ["report", str(run.local)])
    assert r.exit_code == 0, r.output
    html = (run.local / "report.html").read_text()
    assert "8 episodes" in html and html.count('class="group"') == 2
    assert runner.invoke(app, ["report", str(tmp_path / "nope")]).exit_code == 2


def test_bench_lists_the_jobs_and_refuses_unknown_names():
    assert {"engines", "world", "pipeline"} <= set(bench_names())
    r = runner.invoke(app, ["bench", "nope"])
    assert r.exit_code == 2 and "available" in r.output and "world" in r.output


def test_models_provision_builds_a_builtin_and_refuses_unknown_names():
    r = runner.invoke(app, ["models", "provision", "tiny-random-llama"])
    assert r.exit_code == 0, r.output
    assert "tiny-random-llama:" in r.output
    r = runner.invoke(app, ["models", "provision", "gpt-17"])
    assert r.exit_code == 2 and "not builtin" in r.output


def test_config_rows_flatten_engine_maps():
    from worldagent_ray.config import load_config

    rows = dict((p, v) for p, v, _ in config_rows(load_config("local-cpu", environ={})))
    assert rows["engines.policy.model"] == "smollm2-135m-instruct"
    assert json.loads(rows["run.iterations"]) == 6
