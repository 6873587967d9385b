"""Agent cores without Ray: the curriculum rule, proposals with fallback, action prompts and parsing."""

import json
import re

import pytest

from worldagent_ray.agents.action import build_messages, order_memory, parse_sample
from worldagent_ray.agents.curriculum import CurriculumAgent, goals_schema, update_phase
from worldagent_ray.schemas import ActionRequest, Outcome
from worldagent_ray.config import ActionConfig, CurriculumConfig
from worldagent_ray.schemas import Completion, CurriculumState, MemoryHit, Task


def cur_cfg(**kw):
    base = dict(window=4, promote_threshold=0.75, demote_threshold=0.25, use_llm=False)
    base.update(kw)
    return CurriculumConfig(**base)


def outcomes(phase, pattern):
    return [Outcome(phase=phase, success=bool(c == "1")) for c in pattern]


def test_promotes_after_a_full_successful_window_only():
    cfg = cur_cfg()
    st = CurriculumState(phase=1)
    st = update_phase(cfg, st, outcomes(1, "111"))
    assert st.phase == 1, "fewer than `window` outcomes must not promote"
    st = update_phase(cfg, st, outcomes(1, "1"))
    assert st.phase == 2 and st.promotions[-1]["from"] == 1 and st.promotions[-1]["success_rate"] == 1.0


def test_new_phase_starts_with_a_fresh_window_and_demotes_on_failure():
    cfg = cur_cfg()
    st = update_phase(cfg, CurriculumState(phase=1), outcomes(1, "1111"))
    assert st.phase == 2
    st = update_phase(cfg, st, outcomes(2, "000"))
    assert st.phase == 2, "3 failures < window: no demotion yet"
    st = update_phase(cfg, st, outcomes(2, "0"))
    assert st.phase == 1 and st.promotions[-1] == {**st.promotions[-1], "from": 2, "to": 1}
    # back in phase 1, the old successes do not promote again at once
    st = update_phase(cfg, st, outcomes(1, "1"))
    assert st.phase == 1


def test_phase_bounds_and_middle_rates_hold():
    cfg = cur_cfg(max_phase=2)
    st = update_phase(cfg, CurriculumState(phase=2), outcomes(2, "1111"))
    assert st.phase == 2, "max_phase caps promotion"
    st = update_phase(cfg, CurriculumState(phase=1), outcomes(1, "0000"))
    assert st.phase == 1, "phase 1 cannot demote"
    st = update_phase(cur_cfg(), CurriculumState(phase=1), outcomes(1, "1010"))
    assert st.phase == 1 and not st.promotions


def test_bad_thresholds_are_rejected_with_names():
    with pytest.raises(ValueError, match="demote_threshold"):
        CurriculumConfig(promote_threshold=0.3, demote_threshold=0.5)


def test_free_text_curriculum_without_task_space_avoids_mastered():
    agent = CurriculumAgent(cur_cfg(tasks_per_proposal=3), task_space=None, engine=None)
    st = agent.initial_state()
    p = agent.propose(st, mastered={"turn on the stove"}, round_index=0)
    assert len(p.tasks) == 3 and all(t.phase == 1 for t in p.tasks)
    assert "Turn on the stove" not in {t.goal for t in p.tasks}
    assert p.sources == ["free_text"] * 3 and p.state.proposed == 3
    again = agent.propose(st, mastered={"turn on the stove"}, round_index=0)
    assert [t.id for t in again.tasks] == [t.id for t in p.tasks], "proposals are deterministic per round"


def test_goals_schema_bounds():
    s = goals_schema(4)
    assert s["properties"]["goals"]["maxItems"] == 4 and s["required"] == ["goals"]


def hit(i, success, reward):
    return MemoryHit(episode_id=f"e{i}", goal=f"goal {i}", phase=1, plan=["a", "b"], success=success,
                     reward=reward, feedback="order wrong" if not success else "")


def test_memory_context_successes_first_and_top_k():
    hits = [hit(1, False, 0.9), hit(2, True, 0.5), hit(3, True, 0.95), hit(4, False, 0.1)]
    assert [h.episode_id for h in order_memory(hits, 3)] == ["e3", "e2", "e1"]
    cfg = ActionConfig(memory_top_k=2)
    msgs = build_messages(cfg, ActionRequest(task=Task(id="t", goal="Boil water", phase=2), memory=hits,
                                             vocabulary=["fill the kettle", "turn on the kettle"]))
    user = msgs[-1]["content"]
    assert "Goal: Boil water" in user and "- fill the kettle" in user
    assert user.index("goal 3") < user.index("goal 2") and "goal 1" not in user
    assert msgs[0]["role"] == "system"


def test_reference_image_attached_only_for_vision_models():
    task = Task(id="t", goal="g", phase=1, reference_image="/tmp/x.png")
    text_only = build_messages(ActionConfig(), ActionRequest(task=task), attach_image=False)[-1]["content"]
    vision = build_messages(ActionConfig(), ActionRequest(task=task), attach_image=True)[-1]["content"]
    assert isinstance(text_only, str)
    assert vision[0] == {"type": "image", "image": "/tmp/x.png"} and vision[1]["type"] == "text"


def test_plan_schema_caps_free_text_actions_from_the_config():
    from worldagent_ray.agents.action import ActionAgent
    from worldagent_ray.engines.json_check import json_rejection

    agent = ActionAgent(ActionConfig(max_steps=3, max_action_chars=12), engine=None, attach_image=False)
    schema = agent.schema_for(ActionRequest(task=Task(id="t", goal="g", phase=1)))
    step = schema["properties"]["steps"]["items"]["properties"]
    assert step["action"]["maxLength"] == 12 and step["step"] == {"type": "integer", "minimum": 1, "maximum": 3}
    assert json_rejection('{"steps": [{"step": 1, "action": "open the fridge"}]}', schema)  # 15 chars > 12
    vocab = ActionRequest(task=Task(id="t", goal="g", phase=1), vocabulary=["open fridge door"])
    assert agent.schema_for(vocab)["properties"]["steps"]["items"]["properties"]["action"]["enum"] == ["open fridge door"]
    with pytest.raises(ValueError, match="max_action_chars"):
        ActionConfig(max_action_chars=0)


def test_plans_are_decoded_in_the_prompts_key_order(tiny_engine):
    # The prompt's example and the SFT targets write {"step": .., "action": ..}; the engine's grammar imposes
    # the schema's property order, so the agent must hand the engine its schema as built (grouping requests
    # by a key-sorted copy once forced "action" first on every plan).
    from worldagent_ray.agents.action import ActionAgent

    agent = ActionAgent(ActionConfig(max_steps=3, group_size=2, max_tokens=96, temperature=1.0), tiny_engine,
                        attach_image=False)
    reqs = [ActionRequest(task=Task(id=f"t{i}", goal=g, phase=1), vocabulary=v, seed=i)
            for i, (g, v) in enumerate([("open it", ["open the fridge", "close the fridge"]),
                                        ("wash it", ["wash the cup"]), ("open it too", ["open the fridge", "close the fridge"])])]
    assert '{"step": 1, "action": "..."}' in build_messages(agent.cfg, reqs[0], False)[-1]["content"]
    decoded = 0
    for samples in agent.act(reqs):
        for s in samples:
            if s.plan is None:
                continue
            first_keys = re.findall(r'\{\s*"(\w+)"', s.completion.text)  # the first key of every object
            assert first_keys[0] == "steps" and first_keys[1:] == ["step"] * len(s.plan.steps), s.completion.text
            decoded += 1
    assert decoded >= 4


def comp(text, finish="stop", rejected=()):
    return Completion(text=text, token_ids=[1], logprobs=[-0.5], finish_reason=finish, rejected=list(rejected))


def test_parse_sample_plans_and_reasons():
    plan, err = parse_sample(comp(json.dumps({"steps": [{"step": 1, "action": "turn on the stove"}]})), 8)
    assert err is None and plan.actions == ["turn on the stove"]
    plan, err = parse_sample(comp('{"steps": [{"step": 1, "act'), 8)
    assert plan is None and "not valid JSON" in err
    plan, err = parse_sample(comp('{"steps": [', finish="length"), 8)
    assert "cut at max_tokens" in err
    plan, err = parse_sample(comp("x", finish="error", rejected=[{"text": "x", "reason": "not JSON"}]), 8)
    assert plan is None and "not JSON" in err


def test_reentering_a_phase_after_a_long_history_never_freezes_it():
    """Issue 9, finding 10: with the history trimmed, the stored window start went stale and a
    re-entered phase 2 stayed through 40 losses and then 40 wins. The rule reads only the stay."""
    cfg = cur_cfg(window=8, max_phase=3)
    st = CurriculumState(phase=1)
    st = update_phase(cfg, st, outcomes(1, "1" * 8))  # -> 2
    st = update_phase(cfg, st, outcomes(2, "1" * 3 + "0" * 40))  # long stay in 2, demoted to 1 in it
    assert st.phase == 1
    st = update_phase(cfg, st, outcomes(1, "1" * 8))  # re-enter 2 with a long, trimmed history
    assert st.phase == 2 and len(st.history[2]) <= 4 * cfg.window
    st = update_phase(cfg, st, outcomes(2, "0" * 40))
    assert st.phase == 1, "40 losses in a re-entered phase must demote"
    st = update_phase(cfg, st, outcomes(1, "1" * 8))
    st = update_phase(cfg, st, outcomes(2, "1" * 40))
    assert st.phase == 3, "40 wins in a re-entered phase must promote"


def test_the_rule_decides_on_the_last_window_of_the_stay_only():
    from hypothesis import given, settings
    from hypothesis import strategies as stt

    cfg = cur_cfg(window=4)

    @settings(max_examples=300, deadline=None)
    @given(stt.lists(stt.tuples(stt.integers(1, 3), stt.booleans()), max_size=120))
    def check(seq):
        st = CurriculumState(phase=1)
        for phase, ok in seq:
            before = st.phase
            stay_before = list(st.stay)
            st = update_phase(cfg, st, [Outcome(phase=phase, success=ok)])
            assert len(st.stay) <= cfg.window and all(len(h) <= 4 * cfg.window for h in st.history.values())
            if st.phase != before:  # a change needs a full window of this phase ending with this outcome
                window = (stay_before + [ok])[-cfg.window:]
                assert phase == before and len(window) == cfg.window and st.stay == []
                rate = sum(window) / cfg.window
                assert (rate >= cfg.promote_threshold) if st.phase > before else (rate < cfg.demote_threshold)

    check()
