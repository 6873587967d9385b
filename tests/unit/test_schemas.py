"""Messages: round trips, deterministic ids, and rejection of bad values (property tests)."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from worldagent_ray.schemas import (
    SCORE_DIMENSIONS,
    Completion,
    Episode,
    Plan,
    PlanParseError,
    PlanStep,
    Rollout,
    Scores,
    Task,
    Verdict,
    episode_id,
    parse_plan_json,
)

ids = st.from_regex(r"[A-Za-z0-9_.:\-]{1,40}", fullmatch=True)
texts = st.text(min_size=1, max_size=80).filter(lambda s: s.strip())
unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@st.composite
def tasks(draw):
    return Task(id=draw(ids), goal=draw(texts), phase=draw(st.integers(1, 3)))


@st.composite
def verdicts(draw):
    scores = Scores(**{k: draw(unit) for k in SCORE_DIMENSIONS})
    return Verdict(state_caption=draw(st.text(max_size=50)), success=draw(st.booleans()),
                   scores=scores, reward=draw(unit))


@given(tasks())
def test_task_round_trip(task):
    assert Task.model_validate_json(task.model_dump_json()) == task


@given(st.lists(texts, min_size=1, max_size=12))
def test_plan_round_trip_and_json_parse(actions):
    actions = [a.strip()[:500] for a in actions]
    plan = Plan.from_actions(actions)
    assert Plan.model_validate_json(plan.model_dump_json()) == plan
    assert parse_plan_json(plan.model_dump_json()).actions == actions


@given(verdicts())
def test_verdict_round_trip(verdict):
    assert Verdict.model_validate_json(verdict.model_dump_json()) == verdict


@given(tasks(), st.integers(0, 63), verdicts())
@settings(max_examples=50)
def test_episode_round_trip_and_deterministic_id(task, i, verdict):
    ep = Episode.new("run-1", task, i, plan=Plan.from_actions(["a"]), verdict=verdict)
    assert ep.id == episode_id("run-1", task.id, i)
    back = Episode.model_validate_json(ep.model_dump_json())
    assert back == ep and back.id == ep.id


def test_episode_ids_distinct_and_stable():
    a = {episode_id("r", f"t{t}", s) for t in range(20) for s in range(8)}
    assert len(a) == 160
    assert episode_id("r", "t1", 3) == episode_id("r", "t1", 3)
    # the separator keeps ("r1", "2") and ("r", "12") apart
    assert episode_id("r1", "2", 0) != episode_id("r", "12", 0)


@given(st.integers().filter(lambda p: p < 1 or p > 3))
def test_task_phase_out_of_range_names_field_and_value(phase):
    with pytest.raises(ValidationError) as e:
        Task(id="t", goal="g", phase=phase)
    msg = str(e.value)
    assert "phase" in msg and str(phase) in msg


@given(st.floats(allow_nan=False).filter(lambda x: x < 0 or x > 1))
def test_scores_out_of_range_rejected(x):
    with pytest.raises(ValidationError) as e:
        Scores(**{**{k: 0.5 for k in SCORE_DIMENSIONS}, "physics": x})
    assert "physics" in str(e.value)


def test_bad_values_are_named():
    with pytest.raises(ValidationError, match="goal"):
        Task(id="t", goal="   ", phase=1)
    with pytest.raises(ValidationError, match="id"):
        Task(id="has space", goal="g", phase=1)
    with pytest.raises(ValidationError, match=r"steps\[1\]\.step must be 2"):
        Plan(steps=[PlanStep(step=1, action="a"), PlanStep(step=3, action="b")])
    with pytest.raises(ValidationError, match="unexpected|Extra inputs"):
        Task(id="t", goal="g", phase=1, colour="red")
    with pytest.raises(ValidationError, match="logprobs has 1 entries but token_ids has 2"):
        Completion(text="x", token_ids=[1, 2], logprobs=[-0.1])
    task = Task(id="t", goal="g", phase=1)
    with pytest.raises(ValidationError, match="does not match"):
        Episode(id="ep-wrong", run_id="r", task=task, sample_index=0, group_id="g")
    with pytest.raises(ValidationError, match="failure_reason"):
        Episode.new("r", task, 0, status="failed")
    with pytest.raises(ValidationError, match="plan_index"):
        Rollout(task_id="t", plan_index=-1)


@pytest.mark.parametrize(
    "text,reason",
    [
        ("not json", "not valid JSON"),
        ('{"plan": []}', "no 'steps'"),
        ('{"steps": 3}', "must be a list"),
        ('{"steps": [{"step": 1}]}', "no string 'action'"),
        ('{"steps": []}', "no steps"),
        ('{"steps": [{"step": 1, "action": "  "}]}', "empty"),
    ],
)
def test_parse_plan_rejects_with_reason(text, reason):
    with pytest.raises(PlanParseError, match=reason) as e:
        parse_plan_json(text)
    assert e.value.text == text


def test_parse_plan_renumbers_and_limits():
    p = parse_plan_json('{"steps": [{"step": 5, "action": "a"}, {"step": 2, "action": "b"}]}')
    assert [s.step for s in p.steps] == [1, 2] and p.actions == ["a", "b"]
    assert parse_plan_json('["x", {"action": "y"}]').actions == ["x", "y"]
    with pytest.raises(PlanParseError, match="max_steps=1"):
        parse_plan_json('["x", "y"]', max_steps=1)


def test_decoding_schemas_are_json_schema_objects():
    s = Plan.decoding_schema(max_steps=5, vocabulary=["b", "a", "a"])
    item = s["properties"]["steps"]["items"]["properties"]["action"]
    assert item["enum"] == ["a", "b"] and s["properties"]["steps"]["maxItems"] == 5
    v = Verdict.decoding_schema()
    assert set(v["properties"]["scores"]["required"]) == set(SCORE_DIMENSIONS)
    json.dumps(s), json.dumps(v)
