"""Video-action rows (pure): selection SQL, shards, newest writes, rows from episodes, reader errors."""

from __future__ import annotations

import pytest

from worldagent_ray.datasets.video_action import (
    ExportSelectionError,
    VideoActionDataset,
    export_row,
    exportable,
    newest_writes,
    selection_where,
    video_relpath,
)
from worldagent_ray.schemas import (
    Episode,
    GroundTruth,
    Plan,
    Rollout,
    Scores,
    StepFrames,
    StepOutcome,
    StepStatus,
    Task,
    Verdict,
)

TASK = Task(id="t.1", goal="Wash the tomato", phase=2)
PLAN = Plan.from_actions(["open the fridge", "wash the tomato"])


def _ep(**kw) -> Episode:
    return Episode.new("run-a", TASK, 0, plan=PLAN, **kw)


def test_selection_is_validated_and_pushed_down_as_sql():
    where = selection_where([2, 1, 2], True, 0.5)
    assert where == "(success = true) AND (reward >= 0.5) AND (status = 'ok') AND (phase IN (1, 2))"
    assert "success" not in selection_where([3], None, 0.0)
    for bad in ([], [0], [4], [True]):
        with pytest.raises(ExportSelectionError, match="phases"):
            selection_where(bad, None, 0.0)
    with pytest.raises(ExportSelectionError, match="min_reward"):
        selection_where([1], None, 1.5)


def test_video_shards_are_stable_and_bounded():
    paths = {video_relpath(f"ep-{i}", 4) for i in range(64)}
    assert {p.split("/")[1] for p in paths} == {"000", "001", "002", "003"}
    assert video_relpath("ep-x", 4) == video_relpath("ep-x", 4)
    assert all(p.startswith("videos/") and p.endswith(".mp4") for p in paths)


def test_newest_write_of_each_episode_wins():
    w = newest_writes(["a", "a", "b", "a"], [1.0, 3.0, 2.0, 3.0], ["w1", "w2", "w3", "w0"])
    assert w == {("a", "w2"), ("b", "w3")}


def test_rows_carry_actions_with_frame_ranges_and_step_outcomes():
    gt = GroundTruth(steps=[StepOutcome(index=0, text="open the fridge", status=StepStatus.EXECUTED),
                            StepOutcome(index=1, text="wash the tomato", status=StepStatus.PRECONDITION_FAILED)])
    rollout = Rollout(task_id=TASK.id, plan_index=0, video_uri="/v/a.mp4", num_frames=7, world="sandbox",
                      ground_truth=gt, step_frames=[StepFrames(step=1, action="open the fridge", start=1, stop=4),
                                                    StepFrames(step=2, action="wash the tomato", start=4, stop=7)])
    verdict = Verdict(state_caption="wet", success=False, reward=0.4, scores=Scores.zeros())
    ep = _ep(rollout=rollout, verdict=verdict, policy_version=3)
    row = export_row(ep, "videos/001/x.mp4")
    assert row["steps"] == [
        {"step": 1, "action": "open the fridge", "start": 1, "stop": 4, "status": "executed"},
        {"step": 2, "action": "wash the tomato", "start": 4, "stop": 7, "status": "precondition_failed"},
    ]
    assert (row["reward"], row["success"], row["policy_version"], row["plan"]) == (0.4, False, 3, PLAN.actions)
    assert row["video"] == "videos/001/x.mp4" and row["source_video"] == "/v/a.mp4" and row["phase"] == 2
    # a world that rendered one clip for the whole plan: actions without ranges
    one_clip = export_row(_ep(rollout=rollout.model_copy(update={"step_frames": [], "ground_truth": None})), "v")
    assert [(s["start"], s["stop"], s["status"]) for s in one_clip["steps"]] == [(None, None, None)] * 2


def test_only_finished_episodes_with_a_video_are_exportable():
    ok = Rollout(task_id=TASK.id, plan_index=0, video_uri="/v/a.mp4")
    assert exportable(_ep(rollout=ok)) is None
    assert exportable(_ep(rollout=ok.model_copy(update={"error": "boom"}))) == "no video"
    assert exportable(_ep()) == "no video"
    assert exportable(_ep(rollout=ok, status="failed", failure_reason="world: timeout")) == "status failed"
    assert exportable(Episode.new("run-a", TASK, 1, rollout=ok)) == "no plan"


def test_reader_refuses_a_folder_that_is_not_a_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="rows/"):
        VideoActionDataset(str(tmp_path))
    with pytest.raises(ValueError, match="mode"):
        VideoActionDataset(str(tmp_path), mode="frames")
