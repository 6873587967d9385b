"""The HTML report: learner curve from the ledger, video links, config, escaping of model output."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from worldagent_ray.config import load_config
from worldagent_ray.orchestration.evolve import summarize
from worldagent_ray.orchestration.report import write_report
from worldagent_ray.orchestration.run_folder import RunFolder
from worldagent_ray.schemas import Episode, EpisodeRow, LearnerStep, Plan, Rollout, Scores, Task, Verdict


def learner_row(metrics, t=1.0) -> dict:
    """A learner step as the run folder writes it (``record_learner_steps``)."""
    return LearnerStep.from_metrics(metrics, t).model_dump(mode="json", exclude_none=True)


def _run(tmp_path, learner_rows=()):
    cfg = load_config("local-cpu", overrides=[f"run.root={tmp_path}"], environ={})
    run = RunFolder.create(cfg, "r")
    task = Task(id="r0000.0.t", goal="Boil <b>water</b>", phase=1)
    v = Verdict(state_caption='<script>alert("x")</script>', success=True, scores=Scores.zeros(), reward=0.5)
    ro = Rollout(task_id=task.id, plan_index=0, world="sandbox", video_uri=str(tmp_path / "v.mp4"),
                 gif_uri=str(tmp_path / "v.gif"))
    ep = Episode.new(run.run_id, task, 0, plan=Plan.from_actions(["<img src=x onerror=alert(1)>"]), rollout=ro,
                     verdict=v)
    run.record_episodes([EpisodeRow(**ep.summary().model_dump(), t=1.0)])
    run.metrics_ledger.append(list(learner_rows))  # as written, bad rows included
    return run, write_report(run, summarize(run.episode_rows(), 1.0)).read_text()


def test_model_output_is_escaped_and_media_linked(tmp_path):
    _, doc = _run(tmp_path)
    assert "<script>" not in doc and "&lt;script&gt;" in doc
    assert "<img src=x" not in doc and "Boil &lt;b&gt;water&lt;/b&gt;" in doc
    assert 'href="../v.mp4"' in doc and 'src="../v.gif"' in doc  # relative to the report
    assert 'id="config"' in doc and "profile: local-cpu" in doc
    assert 'id="learning"' not in doc  # no learner rows: no learning curve


def test_learning_curve_from_learner_rows_and_bad_rows_are_skipped(tmp_path):
    rows = [learner_row({"step": s, "policy_version": s, "loss": 1.0 / s, "reward_mean": 0.1 * s,
                         "grad_norm": float("nan")}, t=float(s)) for s in (1, 2, 3)]
    rows.append({"kind": "learner", "t": 4.0, "step": "not a number"})
    _, doc = _run(tmp_path, rows)
    section = doc.split('id="learning"', 1)[1].split("</section>", 1)[0]
    assert "3 optimizer steps, policy version 3 at the end" in section
    assert section.count('class="lc"') == 3  # loss, reward, version; grad norm was never finite
    assert "grad norm" not in section and "nan" not in section.lower()


def test_learner_row_keeps_the_curve_keys_and_refuses_bad_ones():
    row = learner_row({"step": 3.0, "policy_version": 3.0, "loss": 0.5, "kl": 0.01, "lr": 1e-5}, t=1.0)
    assert row == {"kind": "learner", "t": 1.0, "step": 3, "policy_version": 3, "loss": 0.5, "kl": 0.01}
    with pytest.raises(ValidationError, match="policy_version"):
        learner_row({"step": 1})
    with pytest.raises(ValidationError, match="loss"):
        learner_row({"step": 1, "policy_version": 1, "loss": "x"})
