"""The sandbox kitchen: parser, rules engine, rendering, bad input, reference images."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from worldagent_ray.config import SandboxConfig
from worldagent_ray.schemas import Plan, StepStatus, Task
from worldagent_ray.world.base import WorldModel
from worldagent_ray.world.reference import ReferenceImageError, load_reference_image
from worldagent_ray.world.sandbox import (KitchenState, SandboxTaskGenerator, SandboxWorld, StepParser,
                                          build_task, load_rules, reference_plan)
from worldagent_ray.world.sandbox.rules import RulesError, parse_rules

RULES = load_rules()
PARSER = StepParser(RULES)
SMALL = SandboxConfig(image_size=32, frames_per_step=2, write_mp4=False, write_gif=False)


@pytest.fixture(scope="module")
def world():
    return SandboxWorld(SMALL, critic_frames=2)


def _task(family="omelette", **params):
    defaults = {"omelette": {"item_loc": "counter"}}
    return build_task(family, {**defaults.get(family, {}), **params})


def _run(world, task, actions):
    _, gt = world.simulate(task, Plan.from_actions(actions))
    return gt


# --------------------------------------------------------------------------- parser


@pytest.mark.parametrize(
    "text, verb, roles",
    [
        ("Turn on the stove", "turn_on", {"obj": "stove"}),
        ("switch ON the Stove!!", "turn_on", {"obj": "stove"}),
        ("ignite the burner", "turn_on", {"obj": "stove"}),
        ("turn the stove on", "turn_on", {"obj": "stove"}),
        ("turn the stove off", "turn_off", {"obj": "stove"}),
        ("Then carefully crack two eggs into a bowl.", "crack", {"obj": "egg", "dest": "bowl"}),
        ("Pick up the mug", "pick_up", {"obj": "cup"}),
        ("grab tomatoes", "pick_up", {"obj": "tomato"}),
        ("put down the knife", "put", {"obj": "knife", "dest": "counter"}),
        ("Place the frying pan onto the stovetop", "put", {"obj": "pan", "dest": "stove"}),
        ("use the knife to slice the tomato", "slice", {"obj": "tomato", "tool": "knife"}),
        ("get the egg out of the refrigerator", "pick_up", {"obj": "egg"}),
        ("pour water from the kettle into the cup", "pour", {"obj": "kettle", "dest": "cup"}),
        ("Serve the omelette on a plate", "put", {"obj": "egg", "dest": "plate"}),
        ("Crème: crack the égg into the bowl", "crack", {"obj": "egg", "dest": "bowl"}),
        ("whisk the eggs", "whisk", {"obj": "egg", "tool": "whisk"}),
        ("pick up the whisk", "pick_up", {"obj": "whisk"}),
    ],
)
def test_parser_handles_synonyms_case_plurals_fillers(text, verb, roles):
    p = PARSER.parse(text)
    assert p.reason is None, p.reason
    assert (p.verb, p.roles) == (verb, roles)


def test_parser_resolves_pronoun_to_previous_object():
    assert PARSER.parse("whisk it", context_obj="egg").roles["obj"] == "egg"


@pytest.mark.parametrize("text", ["", "   ", "煮鸡蛋", "dance wildly", "Crème brûlée", "12345"])
def test_parser_rejects_unreadable_text_with_reason(text):
    p = PARSER.parse(text)
    assert p.verb is None and p.reason


def test_parser_names_unknown_object():
    p = PARSER.parse("pick up the banana")
    assert p.reason and "banana" in p.reason


def test_yaml_booleans_do_not_leak_into_vocabulary():
    assert "on" in RULES.prepositions["dest"] and "off" in RULES.prepositions["source"]
    assert "on" in RULES.objects["stove"].props


def test_bad_rules_fail_with_named_entry():
    with pytest.raises(RulesError, match="unknown check 'levitate'"):
        parse_rules({"objects": {"egg": {}}, "verbs": {"fly": {"synonyms": ["fly"], "roles": [{"name": "obj"}],
                                                               "canonical": "fly", "pre": [{"check": "levitate"}]}}})


# --------------------------------------------------------------------------- verbs / preconditions


@pytest.mark.parametrize(
    "family, params, actions, prop",
    [
        ("turn_on_stove", {}, ["turn on the stove"], ("stove", "on", True)),
        ("open_fridge", {}, ["open the fridge"], ("fridge", "open", True)),
        ("fill_kettle", {}, ["fill the kettle"], ("kettle", "filled", True)),
        ("wash", {"item": "tomato", "item_loc": "counter"}, ["wash the tomato"], ("tomato", "washed", True)),
        ("slice_and_plate", {"item": "tomato", "item_loc": "counter"}, ["slice the tomato"], ("tomato", "sliced", True)),
        ("crack_and_whisk", {"item_loc": "counter"}, ["crack the egg into the bowl", "whisk the egg"], ("egg", "whisked", True)),
        ("boil_water", {}, ["fill the kettle", "put the kettle on the stove", "turn on the stove", "boil the kettle"],
         ("kettle", "boiled", True)),
    ],
)
def test_each_verb_sets_its_effect(world, family, params, actions, prop):
    gt = _run(world, build_task(family, params), actions)
    assert all(s.status == StepStatus.EXECUTED for s in gt.steps), [s.reason for s in gt.steps]
    obj, name, value = prop
    assert gt.final_state["objects"][obj]["props"][name] == value


def test_pick_up_put_and_close(world):
    gt = _run(world, build_task("pick_up", {"item": "cup", "item_loc": "counter"}),
              ["pick up the cup", "put the cup on the table", "open the fridge", "close the fridge", "turn on the stove",
               "turn off the stove"])
    assert [s.status for s in gt.steps] == [StepStatus.EXECUTED] * 6
    assert gt.final_state["objects"]["cup"]["loc"] == "table"
    assert gt.final_state["objects"]["fridge"]["props"]["open"] is False


@pytest.mark.parametrize(
    "family, params, actions, reason_part, category",
    [
        ("pick_up", {"item": "cup", "item_loc": "counter", "distractors": ["bowl"]},
         ["pick up the bowl", "pick up the cup"], "already holding the bowl", "physics"),
        ("pick_up", {"item": "egg", "item_loc": "fridge"}, ["pick up the egg"], "closed fridge", "physics"),
        ("turn_on_stove", {}, ["pick up the stove"], "cannot be picked up", "object"),
        ("turn_on_stove", {}, ["turn on the stove", "turn on the stove"], "already on", "physics"),
        ("crack_and_whisk", {"item_loc": "counter"}, ["whisk the egg"], "not cracked", "physics"),
        ("omelette", {"item_loc": "counter"}, ["crack the egg into the bowl", "cook the egg"], "not in the pan", "physics"),
        ("omelette", {"item_loc": "counter"}, ["crack the egg into the pan", "put the pan on the stove", "cook the egg"],
         "stove is off", "physics"),
        ("boil_water", {}, ["put the kettle on the stove", "turn on the stove", "boil the kettle"], "no water", "physics"),
        ("wash", {"item": "tomato", "item_loc": "counter"}, ["slice the tomato"], "no knife", "object"),
        ("slice_and_plate", {"item": "tomato", "item_loc": "counter"}, ["pick up the tomato", "slice the tomato"],
         "down before slicing", "physics"),
        ("turn_on_stove", {}, ["crack the stove into the fridge"], "cannot be cracked", "object"),
    ],
)
def test_preconditions_fail_with_reason(world, family, params, actions, reason_part, category):
    gt = _run(world, build_task(family, params), actions)
    last = gt.steps[-1]
    assert last.status in (StepStatus.PRECONDITION_FAILED, StepStatus.NOT_UNDERSTOOD)
    assert reason_part in last.reason, last.reason
    assert last.category == category


def test_failed_step_leaves_state_unchanged(world):
    task = build_task("pick_up", {"item": "egg", "item_loc": "fridge"})
    gt = _run(world, task, ["pick up the egg"])
    assert gt.final_state == KitchenState.from_spec(RULES, task.world_spec["placement"]).snapshot()


def test_unknown_and_absent_objects_not_understood(world):
    gt = _run(world, build_task("turn_on_stove", {}), ["pick up the banana", "pick up the teabag"])
    assert [s.status for s in gt.steps] == [StepStatus.NOT_UNDERSTOOD] * 2
    assert "banana" in gt.steps[0].reason and "teabag" in gt.steps[1].reason


@pytest.mark.parametrize("family", ["omelette", "salad", "tea", "boil_water", "crack_and_whisk", "put_on_plate"])
def test_goal_predicates_false_before_true_after_reference(world, family):
    task = SandboxTaskGenerator(3).sample({"omelette": 3, "salad": 3, "tea": 3}.get(family, 2 if family in
                                          ("boil_water", "crack_and_whisk") else 1), family=family)
    before = _run(world, task, [])
    assert before.goal_predicates and not any(before.goal_predicates.values())
    after = _run(world, task, reference_plan(task).actions)
    assert after.goal_achieved, after.state_description
    assert after.relevant_step_order == after.expected_step_order


def test_shuffled_steps_change_expected_order(world):
    task = _task("omelette")
    actions = list(reversed(reference_plan(task).actions))
    gt = _run(world, task, actions)
    assert gt.relevant_step_order != gt.expected_step_order
    assert sorted(gt.relevant_step_order) == sorted(gt.expected_step_order)


# --------------------------------------------------------------------------- render / world protocol


def test_world_satisfies_protocol_and_writes_artifacts(tmp_path):
    w = SandboxWorld(SandboxConfig(image_size=64, frames_per_step=3), critic_frames=3)
    assert isinstance(w, WorldModel) and w.name == "sandbox"
    task = _task("omelette")
    [r] = w.render(task, [reference_plan(task)], str(tmp_path), seeds=[5])
    assert r.error is None and r.seed == 5 and r.world == "sandbox"
    assert r.num_frames == 1 + 3 * len(reference_plan(task).steps)
    assert r.video_uri.endswith(".mp4") and r.gif_uri.endswith(".gif") and len(r.frame_uris) == 3
    img = np.asarray(Image.open(r.frame_uris[0]))
    assert img.shape == (64, 64, 3)
    assert r.ground_truth.goal_achieved


def test_frames_show_state_change_and_motion(world):
    w = SandboxWorld(SandboxConfig(image_size=64, frames_per_step=4))
    task = build_task("turn_on_stove", {})
    frames, _ = w.simulate(task, Plan.from_actions(["turn on the stove"]))
    assert frames.shape == (5, 64, 64, 3) and frames.dtype == np.uint8
    red = lambda f: int(((f[..., 0] > 200) & (f[..., 1] < 100)).sum())  # noqa: E731
    assert red(frames[0]) == 0 and red(frames[-1]) > 10  # burner glows
    task = build_task("put_on_plate", {"item": "cup", "item_loc": "counter"})
    frames, _ = w.simulate(task, Plan.from_actions(["put the cup on the table"]))
    diffs = [np.abs(frames[i + 1].astype(int) - frames[i]).sum() for i in range(1, 4)]
    assert all(d > 0 for d in diffs)  # the cup slides over several frames


def test_admissible_actions_parse_back_and_are_modest(world):
    for phase in (1, 2, 3):
        task = SandboxTaskGenerator(1).sample(phase, index=2)
        acts = world.admissible_actions(task)
        assert 5 <= len(acts) <= 150
        for a in acts:
            p = PARSER.parse(a)
            assert p.verb and p.reason is None, a
        assert set(reference_plan(task).actions) <= set(acts)


def test_bad_inputs_give_rollouts_not_exceptions(tmp_path, world):
    task = _task("omelette")
    long_plan = Plan.from_actions(["stir"] * 1000)
    rs = world.render(task, [None, Plan(steps=[]), long_plan, Plan.from_actions(["ハンバーガーを食べる", "pick up the unicorn"])],
                      str(tmp_path))
    assert rs[0].error and "no plan" in rs[0].error
    assert rs[1].error is None and rs[1].ground_truth.steps == [] and rs[1].num_frames == 1
    skipped = [s for s in rs[2].ground_truth.steps if s.status == StepStatus.SKIPPED]
    assert len(rs[2].ground_truth.steps) == 1000 and len(skipped) == 1000 - SMALL.max_steps
    assert rs[2].num_frames == 1 + SMALL.frames_per_step * SMALL.max_steps
    assert [s.status for s in rs[3].ground_truth.steps] == [StepStatus.NOT_UNDERSTOOD] * 2
    assert "unicorn" in rs[3].ground_truth.steps[1].reason


def test_free_text_task_is_matched_or_gets_default_scene(world):
    t = Task(id="llm-1", goal="Switch on the burner", phase=1, source="llm")
    assert world.scene_spec(t)["family"] == "turn_on_stove"
    gt = _run(world, Task(id="llm-2", goal="Juggle three oranges", phase=1, source="llm"), ["pick up the egg"])
    assert gt.goal_predicates == {} and gt.steps[0].status == StepStatus.EXECUTED


# --------------------------------------------------------------------------- reference images


def _png(path, size):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_reference_image_loads_and_rejects_bad_files(tmp_path):
    ok = _png(tmp_path / "ok.png", 32)
    assert load_reference_image(ok, 32 * 32).size == (32, 32)
    with pytest.raises(ReferenceImageError, match="more than max_pixels"):
        load_reference_image(ok, 100)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ReferenceImageError, match="not a readable image"):
        load_reference_image(str(corrupt), 10**6)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes((tmp_path / "ok.png").read_bytes()[:200])
    with pytest.raises(ReferenceImageError, match="truncated|not a readable"):
        load_reference_image(str(trunc), 10**6)
    tiff = tmp_path / "x.tiff"
    Image.new("RGB", (8, 8)).save(tiff)
    with pytest.raises(ReferenceImageError, match="format TIFF"):
        load_reference_image(str(tiff), 10**6)
    with pytest.raises(ReferenceImageError, match="does not exist"):
        load_reference_image(str(tmp_path / "missing.png"), 10**6)


def test_bad_reference_image_recorded_in_rollout(tmp_path, world):
    big = _png(tmp_path / "big.png", 64)
    w = SandboxWorld(SMALL.model_copy(update={"max_reference_pixels": 100}))
    task = _task("omelette")
    [r] = w.render(task, [reference_plan(task)], str(tmp_path), reference_image=big)
    assert r.error and "reference image rejected" in r.error and "max_pixels" in r.error
    (tmp_path / "notimg.png").write_text("hello")
    [r] = world.render(task, [reference_plan(task)], str(tmp_path), reference_image=str(tmp_path / "notimg.png"))
    assert r.error and "not a readable image" in r.error
    [r] = world.render(task, [reference_plan(task)], str(tmp_path), reference_image=_png(tmp_path / "ok.png", 16))
    assert r.error is None


# --------------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(st.text(max_size=80).filter(lambda s: s.strip()), max_size=6))
def test_arbitrary_text_plans_never_crash(world, actions):
    task = _task("omelette")
    frames, gt = world.simulate(task, Plan.from_actions([a.strip()[:500] for a in actions]))
    assert frames.shape[0] == 1 + SMALL.frames_per_step * len(actions)
    assert len(gt.steps) == len(actions)


VOCAB = ["pick up the egg", "crack the egg into the bowl", "whisk it", "turn on the stove", "put the pan on the stove",
         "pour the egg into the pan", "cook the egg", "put the egg on the plate", "open the fridge", "grab the bowl"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(st.sampled_from(VOCAB), max_size=8), seed=st.integers(0, 2**31 - 1))
def test_same_seed_same_frames(world, actions, seed):
    task = _task("omelette", distractors=["cup"])
    plan = Plan.from_actions(actions)
    f1, g1 = world.simulate(task, plan, seed)
    f2, g2 = SandboxWorld(SMALL).simulate(task, plan, seed)
    assert np.array_equal(f1, f2) and g1 == g2


def test_rollouts_record_each_steps_frame_range(tmp_path):
    """Work package G: per-step frame ranges (frame 0 is the start state)."""
    from worldagent_ray.config import SandboxConfig
    from worldagent_ray.world.sandbox import SandboxTaskGenerator, SandboxWorld, reference_plan

    world = SandboxWorld(SandboxConfig(frames_per_step=3, max_steps=2, write_gif=False, image_size=32))
    task = SandboxTaskGenerator(seed=1).sample(phase=3, index=0)
    plan = reference_plan(task)
    (r,) = world.render(task, [plan], str(tmp_path))
    assert [(s.step, s.start, s.stop) for s in r.step_frames] == [(1, 1, 4), (2, 4, 7)]
    assert r.num_frames == 7 and [s.action for s in r.step_frames] == plan.actions[:2]
