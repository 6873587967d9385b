"""SFT / DPO example formatting: the Action agent's exact prompt, completions that parse back to
the plan, held-out refusal, rejection sampling and best/worst pairs from memory rows."""

from __future__ import annotations

import json

import pytest

from worldagent_ray.agents.action import build_messages
from worldagent_ray.config import ActionConfig
from worldagent_ray.datasets.action_sft import (dpo_pairs_from_rows, generator_sft_examples, memory_sft_examples,
                                                plan_completion, reasoning_line)
from worldagent_ray.schemas import ActionRequest, parse_plan_json
from worldagent_ray.world.sandbox import SandboxTaskGenerator, SandboxWorld, reference_plan

from tests.factories import sandbox_episode

CFG = ActionConfig()
WORLD = SandboxWorld()
GEN = SandboxTaskGenerator(0)


def _ref(t):
    return reference_plan(t).actions


def _row(ep):
    return {"id": ep.id, "episode_json": ep.model_dump_json()}


def test_generator_examples_use_the_agents_exact_prompt_and_parse_back():
    tasks = GEN.split_tasks(2, "train")[:12]
    ex = generator_sft_examples(tasks, CFG, WORLD.admissible_actions, reference=_ref)
    assert len(ex) == 12
    for t, e in zip(tasks, ex):
        want = build_messages(CFG.model_copy(update={"use_memory": False}),
                              ActionRequest(task=t, memory=[], vocabulary=WORLD.admissible_actions(t)))
        assert e["prompt"] == want and e["task_id"] == t.id and e["split"] == "train"
        text = e["completion"][0]["content"]
        assert e["completion"][0]["role"] == "assistant"
        assert parse_plan_json(text, CFG.max_steps).actions == _ref(t)
        assert set(_ref(t)) <= set(WORLD.admissible_actions(t))  # the constrained decoder can write it


def test_heldout_tasks_are_refused():
    held = GEN.heldout_tasks(1, 2)
    with pytest.raises(ValueError, match="heldout"):
        generator_sft_examples(held, CFG, WORLD.admissible_actions, reference=_ref)


def test_reasoning_line_is_one_line_before_the_json():
    t = next(t for t in GEN.split_tasks(2, "train") if _ref(t)[0].startswith("open"))
    ex = generator_sft_examples([t], CFG, WORLD.admissible_actions, reference=_ref, reasoning=True)[0]
    line, plan = ex["completion"][0]["content"].split("\n")
    assert line == reasoning_line(t, _ref(t)) and line.startswith("Reasoning: First open the")
    assert parse_plan_json(plan).actions == _ref(t)
    with pytest.raises(ValueError):
        plan_completion([])


def test_memory_examples_keep_successful_train_episodes_once():
    tr = GEN.split_tasks(1, "train")[:3]
    held = GEN.heldout_tasks(1, 1)[0]
    eps = [
        sandbox_episode(tr[0], 0, _ref(tr[0]), success=True, reward=1.0),
        sandbox_episode(tr[0], 1, _ref(tr[0]), success=True, reward=1.0),  # same plan again: one example
        sandbox_episode(tr[1], 0, ["turn on the stove"], success=False, reward=0.3),
        sandbox_episode(tr[2], 0, _ref(tr[2]), success=True, reward=0.9),  # below min_reward
        sandbox_episode(held, 0, _ref(held), success=True, reward=1.0),  # held out: never trained on
    ]
    ex = memory_sft_examples([_row(e) for e in eps], CFG, WORLD.admissible_actions, min_reward=0.95)
    assert [e["task_id"] for e in ex] == [tr[0].id] and ex[0]["source"] == "memory"
    assert len(memory_sft_examples([_row(e) for e in eps], CFG, WORLD.admissible_actions, min_reward=0.5)) == 2


def test_dpo_pairs_best_vs_worst_per_group():
    a, b = GEN.split_tasks(2, "train")[:2]
    held = GEN.heldout_tasks(2, 1)[0]
    eps = [
        sandbox_episode(a, 0, ["slice the tomato"], success=False, reward=0.2, raw_output='{"steps": []}'),
        sandbox_episode(a, 1, _ref(a), success=True, reward=1.0),
        sandbox_episode(a, 2, ["wash the tomato"], success=False, reward=0.5),
        sandbox_episode(b, 0, _ref(b), success=True, reward=1.0),
        sandbox_episode(b, 1, ["turn on the stove"], success=False, reward=0.9),  # within the margin
        sandbox_episode(held, 0, _ref(held), success=True, reward=1.0),
        sandbox_episode(held, 1, ["open the fridge"], success=False, reward=0.0),
    ]
    pairs = dpo_pairs_from_rows([_row(e) for e in eps], CFG, WORLD.admissible_actions, margin=0.2)
    assert len(pairs) == 1 and pairs[0]["task_id"] == a.id
    assert parse_plan_json(pairs[0]["chosen"][0]["content"]).actions == _ref(a)
    assert pairs[0]["rejected"][0]["content"] == '{"steps": []}'  # what the model actually wrote
    assert pairs[0]["prompt"][1]["content"].startswith(f"Goal: {a.goal}")
    assert len(dpo_pairs_from_rows([_row(e) for e in eps], CFG, WORLD.admissible_actions, margin=0.05)) == 2
    with pytest.raises(ValueError, match="margin"):
        dpo_pairs_from_rows([], CFG, WORLD.admissible_actions, margin=0)
    json.dumps(pairs)  # examples are plain JSON (they travel through Ray Data as strings)
