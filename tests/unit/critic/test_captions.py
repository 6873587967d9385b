"""Grounded captions: the repetition guard, leak detection, the length cap and faithfulness."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worldagent_ray.config import SandboxConfig
from worldagent_ray.critic.captions import (caption_facts, caption_faithfulness, caption_problem, ground_caption,
                                            sanitize_text)
from worldagent_ray.schemas import Plan
from worldagent_ray.world.sandbox import SandboxWorld, build_task, reference_plan

WORLD = SandboxWorld(SandboxConfig(image_size=32, frames_per_step=1, write_mp4=False, write_gif=False))
LOOP = "The kitchen is now equipped with a kitchen robot, " * 8
LEAK = "Goal conditions met: none, goal_state_description: the kitchen"


@pytest.mark.parametrize("bad,why", [(LOOP, "repeats"), (LEAK, "leaks"), ("   ", "empty"),
                                     ('{"state_caption": "x"}', "leaks"), ("stove on stove on stove on stove on "
                                                                          "stove on stove on", "repeats")])
def test_degenerate_captions_fall_back_to_the_world_description(bad, why):
    cap, notes = ground_caption(bad, "the stove is on.", 400, source="text_judge")
    assert cap == "the stove is on." and why in caption_problem(sanitize_text(bad))
    assert len(notes) == 1 and notes[0].startswith("text_judge: degenerate caption")


def test_clean_caption_is_kept_and_capped_at_a_sentence():
    text = ("The stove is on. The kettle is filled and sits on the stove. The cup waits on the counter "
            "next to the teabag, and the robot's hand is empty now.")
    cap, notes = ground_caption(text, "fallback", 80)
    assert cap.startswith("The stove is on.") and len(cap) <= 80 and cap.endswith(".")
    assert notes and "cut" in notes[0]
    assert ground_caption("The egg is cracked.", "fb", 400) == ("The egg is cracked.", [])


@settings(derandomize=True, max_examples=300, deadline=None)
@given(st.text(), st.text(), st.integers(min_value=-5, max_value=5000))
def test_ground_caption_is_total_and_bounded(caption, fallback, limit):
    cap, notes = ground_caption(caption, fallback, limit)
    assert len(cap) <= max(1, min(limit, 2000))
    cap.encode("utf-8")
    assert all(isinstance(n, str) for n in notes)


def test_the_worlds_own_description_is_fully_faithful_and_a_wrong_one_is_not():
    task = build_task("salad", {"tomato_loc": "counter", "lettuce_loc": "counter"})
    _, gt = WORLD.simulate(task, reference_plan(task))
    assert caption_faithfulness(gt.state_description, gt.final_state) == 1.0
    assert len(caption_facts(gt.state_description, gt.final_state)) >= 6
    wrong = "The tomato is on the counter; the bowl is in the fridge. The lettuce is not sliced."
    assert caption_faithfulness(wrong, gt.final_state) == 0.0
    assert caption_faithfulness(LOOP, gt.final_state) is None  # states no checkable fact
    _, gt0 = WORLD.simulate(task, Plan.from_actions(["wash the tomato"]))
    assert caption_faithfulness("the tomato (washed) is on the counter and the robot holds nothing",
                                gt0.final_state) == 1.0


@settings(derandomize=True, max_examples=200, deadline=None)
@given(st.text())
def test_faithfulness_is_total(text):
    task = build_task("turn_on_stove", {})
    _, gt = WORLD.simulate(task, reference_plan(task))
    f = caption_faithfulness(text, gt.final_state)
    assert f is None or 0.0 <= f <= 1.0
    assert caption_faithfulness(text, {}) is None and caption_faithfulness(text, {"objects": 3}) is None
