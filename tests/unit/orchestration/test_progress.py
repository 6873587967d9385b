"""The live progress display: rate, ETA, phase, success rate and learner facts; plain lines when
stdout is not a terminal; what to print after Ctrl-C."""

from __future__ import annotations

import io

import pytest

from worldagent_ray.orchestration.progress import RunProgress, resume_command
from worldagent_ray.schemas import Episode, Scores, Task, Verdict


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _eps(n: int, success: bool, phase: int = 1, failed: bool = False) -> list[Episode]:
    task = Task(id=f"t{phase}", goal="Boil water", phase=phase)
    if failed:
        return [Episode.new("run", task, i, status="failed", failure_reason="world: boom") for i in range(n)]
    v = Verdict(state_caption="c", success=success, scores=Scores.zeros(), reward=1.0 if success else 0.0)
    return [Episode.new("run", task, i, verdict=v) for i in range(n)]


def test_plain_lines_carry_rate_eta_phase_success_and_learner():
    out, clock = io.StringIO(), Clock()
    p = RunProgress(planned=8, learn=True, interactive=False, out=out, every_s=10, clock=clock)
    with p:
        p(2, 8)  # first report: no rate yet
        p.episodes(_eps(2, True), phase=1)
        clock.t += 4
        p(4, 8)  # 2 episodes in 4 s; throttled (< every_s since the last line)
        p.episodes(_eps(1, False) + _eps(1, True, failed=True), phase=2)
        p.learner(3, 1.5)
        clock.t += 10
        p(6, 8)  # 4 episodes in 14 s
    assert p.lines[0].startswith("[evolve] 2/8 episodes (25%) · -- episodes/s · ETA --:--")
    assert "learner waiting" in p.lines[0]
    last = p.lines[-1]
    assert "6/8 episodes (75%)" in last and "0.29 episodes/s" in last and "ETA 0:07" in last
    assert "phase 2" in last and "success 67% (last 3)" in last and "1 failed" in last
    assert "learner v3, staleness 1.5" in last
    assert out.getvalue().splitlines() == p.lines
    assert len(p.lines) == 2, p.lines  # the 4/8 report fell inside the 10 s throttle


def test_the_last_report_is_always_printed():
    out, clock = io.StringIO(), Clock()
    p = RunProgress(planned=4, interactive=False, out=out, every_s=1000, clock=clock)
    with p:
        p(2, 4)
        clock.t += 1
        p(4, 4)  # done: printed despite the throttle
    assert [l.split(" · ")[0] for l in p.lines] == ["[evolve] 2/4 episodes (50%)", "[evolve] 4/4 episodes (100%)"]
    assert "learner" not in out.getvalue()  # not learning: no learner facts


def test_a_resumed_run_counts_only_its_own_episodes_in_the_rate():
    clock = Clock()
    p = RunProgress(planned=20, interactive=False, out=io.StringIO(), clock=clock)
    p(12, 20)  # 10 episodes were there before the resume
    clock.t += 10
    p(14, 20)
    assert p.rate == pytest.approx(0.2) and p.eta_s == pytest.approx(30.0)


def test_terminal_bar_shows_the_same_facts():
    out, clock = io.StringIO(), Clock()
    p = RunProgress(planned=4, learn=True, interactive=True, out=out, clock=clock)
    with p:
        p(2, 4)
        p.episodes(_eps(2, True), phase=3)
        p.learner(7, None)
        clock.t += 2
        p(4, 4)
    text = out.getvalue()
    assert "4/4" in text and "phase 3" in text and "success 100%" in text and "learner v7" in text
    assert "ep/s" in text


def test_interrupted_says_what_finished_and_how_to_resume():
    out = io.StringIO()
    p = RunProgress(planned=8, interactive=False, out=out)
    text = p.interrupted({"episodes": 5, "failed": 1}, "runs/evolve-1")
    assert "5 episodes are committed (1 failed) in runs/evolve-1" in text
    assert resume_command("runs/evolve-1") in text and text in out.getvalue()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="planned"):
        RunProgress(planned=-1)
    with pytest.raises(ValueError, match="every_s"):
        RunProgress(planned=1, every_s=0)


def test_update_takes_the_drivers_snapshot_and_the_learners_latest_step():
    from worldagent_ray.schemas import LearnerStep

    clock, out = Clock(), io.StringIO()
    p = RunProgress(planned=0, learn=True, interactive=False, out=out, every_s=1.0, clock=clock)
    snap = {"committed": 0, "planned": 16, "failed": 0, "phase": 1, "success_rate": None}
    p.update(snap)
    assert "learner waiting" in p.line() and "0/16" in p.line()
    clock.t += 4.0
    p.update({**snap, "committed": 8, "failed": 2, "phase": 2, "success_rate": 0.25},
             LearnerStep(t=1.0, step=3, policy_version=3, staleness_mean=0.5))
    line = p.line()
    assert "8/16 episodes (50%)" in line and "2.00 episodes/s" in line and "ETA 0:04" in line
    assert "phase 2" in line and "success 25%" in line and "2 failed" in line and "learner v3, staleness 0.5" in line
    assert out.getvalue().splitlines()[-1] == line
