"""Critic data from ground truth: plan variants, labels, SFT examples, preference pairs (no Ray)."""

from __future__ import annotations

import json
import random

import pytest

from worldagent_ray.config import SandboxConfig
from worldagent_ray.critic.text_judge import VERDICT_SYSTEM
from worldagent_ray.datasets.critic import (PLAN_KINDS, anchor_pairs, preference_pairs, rollouts_for_task, sft_example,
                                            split_rows, variant_plans)
from worldagent_ray.schemas import Plan
from worldagent_ray.world.sandbox import SandboxTaskGenerator, SandboxWorld, build_task, reference_plan

WORLD = SandboxWorld(SandboxConfig(image_size=32, frames_per_step=1, write_mp4=False, write_gif=False), critic_frames=2)


def _rows(n=3):
    g = SandboxTaskGenerator(3)
    tasks = [g.sample(p, split, index=i) for p in (1, 2, 3) for split in ("train", "heldout") for i in range(n)]
    return [r for t in tasks for r in rollouts_for_task(t, WORLD, "memory://critic-data", seed=0)]


ROWS = _rows()


def test_variants_are_deterministic_and_distinct():
    task = build_task("omelette", {"item_loc": "fridge"})
    ref, vocab = reference_plan(task), WORLD.admissible_actions(task)
    a = variant_plans(task, ref, vocab, random.Random(1))
    assert a == variant_plans(task, ref, vocab, random.Random(1))
    kinds = dict(a)
    assert [k for k, _ in a] == list(PLAN_KINDS)
    assert kinds["reference"] == ref and kinds["shuffled"].actions != ref.actions
    assert sorted(kinds["shuffled"].actions) == sorted(ref.actions)
    assert kinds["truncated"].actions == ref.actions[: len(kinds["truncated"].steps)] and len(kinds["truncated"].steps) < len(ref.steps)
    assert len(kinds["dropped"].steps) == len(ref.steps) - 1 and len(kinds["padded"].steps) == len(ref.steps) + 1
    assert all(x in vocab for x in kinds["random"].actions)
    with pytest.raises(ValueError, match="unknown plan kinds"):
        variant_plans(task, ref, vocab, random.Random(1), ["nope"])
    one = build_task("turn_on_stove", {})
    assert {k for k, _ in variant_plans(one, reference_plan(one), WORLD.admissible_actions(one), random.Random(0))} == {
        "reference", "padded", "corrupted", "random"}  # a one-step reference cannot be shuffled/truncated/dropped


def test_labels_are_the_ground_truth_and_varied():
    assert {r["kind"] for r in ROWS} == set(PLAN_KINDS)
    ref = [r for r in ROWS if r["kind"] == "reference"]
    assert ref and all(r["success"] and r["reward"] >= 0.9 for r in ref)
    assert 0.2 < sum(r["success"] for r in ROWS) / len(ROWS) < 0.6
    for r in ROWS:
        assert r["caption"].endswith("The goal is reached." if r["success"] else "The goal is not reached.")
        assert "Goal conditions" not in r["observation"] and "Step outcomes:" in r["observation"]
        assert r["success"] == (json.loads(r["scores_json"])["goal_achievement"] == 1.0)


def test_sft_examples_use_the_judge_prompt_and_target_json():
    ex = sft_example(ROWS[0])
    prompt, [answer] = json.loads(ex["prompt_json"]), json.loads(ex["completion_json"])
    assert prompt[0] == {"role": "system", "content": VERDICT_SYSTEM} and ROWS[0]["goal"] in prompt[1]["content"]
    target = json.loads(answer["content"])
    assert list(target) == ["state_caption", "success", "scores"] and target["success"] == ROWS[0]["success"]
    vlm = json.loads(sft_example(ROWS[0], "vlm", num_frames=2)["prompt_json"])
    assert [p["type"] for p in vlm[1]["content"]].count("image") == 2
    with pytest.raises(ValueError, match="modality"):
        sft_example(ROWS[0], "audio")


def test_pairs_prefer_the_better_episode_of_the_same_task_and_respect_the_split():
    pairs = preference_pairs(ROWS, margin=0.05, max_pairs_per_task=4, seed=0)
    by_task: dict[str, int] = {}
    rows_by_conv = {json.dumps(json.loads(sft_example(r)["prompt_json"])): r for r in ROWS}
    for p in pairs:
        by_task[p["task_id"]] = by_task.get(p["task_id"], 0) + 1
        good, bad = rows_by_conv[p["chosen_json"]], rows_by_conv[p["rejected_json"]]
        assert good["task_id"] == bad["task_id"] == p["task_id"] and good["split"] == p["split"]
        assert good["reward"] - bad["reward"] >= 0.05 and p["reward_gap"] == pytest.approx(good["reward"] - bad["reward"])
    assert max(by_task.values()) <= 4 and len(by_task) == len({r["task_id"] for r in ROWS})
    parts = split_rows(ROWS)
    assert {r["task_id"] for r in parts["train"]}.isdisjoint({r["task_id"] for r in parts["heldout"]})
    assert all(r["split"] == "heldout" for r in parts["heldout"]) and parts["heldout"]


def test_memory_episode_becomes_a_record():
    from worldagent_ray.datasets.critic import record_from_episode
    from worldagent_ray.schemas import Episode

    task = build_task("turn_on_stove", {})
    plan = Plan.from_actions(["turn on the stove"])
    [r] = WORLD.render(task, [plan], "memory://critic-mem")
    ep = Episode.new("run", task, 0, plan=plan, rollout=r)
    rec = record_from_episode(ep)
    assert rec["kind"] == "memory" and rec["success"] and rec["split"] == task.split
    assert record_from_episode(Episode.new("run", task, 1, plan=None)) is None


def _conv_rows():
    return {json.dumps(json.loads(sft_example(r)["prompt_json"])): r for r in ROWS}


def test_anchor_pairs_put_a_success_above_a_failure_of_another_task():
    rows = [r for r in ROWS if r["split"] == "train"]
    pairs = anchor_pairs(rows, per_task=3, margin=0.05, seed=0)
    by_conv = _conv_rows()
    per_task: dict[str, int] = {}
    for p in pairs:
        good, bad = by_conv[p["chosen_json"]], by_conv[p["rejected_json"]]
        assert good["success"] and not bad["success"] and good["task_id"] != bad["task_id"]
        assert good["task_id"] == p["task_id"] and good["split"] == bad["split"] == p["split"] == "train"
        assert p["kind"] == "anchor" and good["reward"] - bad["reward"] >= 0.05
        assert p["reward_gap"] == pytest.approx(good["reward"] - bad["reward"])
        per_task[p["task_id"]] = per_task.get(p["task_id"], 0) + 1
    assert len({(p["chosen_json"], p["rejected_json"]) for p in pairs}) == len(pairs)  # distinct
    with_success = {r["task_id"] for r in rows if r["success"]}
    assert set(per_task) == with_success and max(per_task.values()) <= 3
    assert sum(per_task.values()) == 3 * len(with_success)  # enough failures elsewhere: every cap is reached
    # seeded, and the rows' order does not matter (Ray Data's is not fixed)
    assert anchor_pairs(list(reversed(rows)), per_task=3, margin=0.05, seed=0) == pairs
    assert anchor_pairs(rows, per_task=3, margin=0.05, seed=1) != pairs
    assert anchor_pairs(rows, per_task=0) == []
    assert {p["kind"] for p in preference_pairs(rows)} == {"task"}


def test_anchor_pairs_never_mix_splits_and_need_a_failure_elsewhere():
    with pytest.raises(ValueError, match="one split"):
        anchor_pairs(ROWS, per_task=2)
    one_task = [r for r in ROWS if r["task_id"] == ROWS[0]["task_id"]]
    assert anchor_pairs(one_task, per_task=4) == []  # no other task: no anchor
    assert anchor_pairs([r for r in ROWS if r["split"] == "train" and r["success"]], per_task=4) == []
