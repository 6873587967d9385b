"""orchestration/main.py's summary: piped to a narrow console (a CI log, a `ray job` log),
the headline, a long report path and a learner dict stay whole, copyable lines, and text
with brackets is printed as data (never read as rich markup)."""

from __future__ import annotations

from worldagent_ray.orchestration.main import print_summary


def test_summary_lines_never_wrap_and_brackets_are_data(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    path = "/tmp/" + "a-long-run-folder-name/" * 6 + "report.html"
    summary = {"episodes": 8, "elapsed_s": 3.2, "episodes_per_s": 2.5,
               "by_phase": {1: {"episodes": 8, "failed": 1, "success_rate": 0.5, "mean_reward": 0.25}},
               "learner": {"fed_groups": 3, "ids": "[red]not markup[/red]"}, "report": path,
               "error": "driver: [bold]ValueError[/bold] at [0, 1]"}
    print_summary(summary)
    lines = capsys.readouterr().out.splitlines()
    assert "WorldAgent-Ray: 8 episodes in 3s (2.50 episodes/s)" in lines
    assert f"report: {path}" in lines
    assert "learner: {'fed_groups': 3, 'ids': '[red]not markup[/red]'}" in lines
    assert "stopped early: driver: [bold]ValueError[/bold] at [0, 1]" in lines
