"""Judge-output parsers are total: any text in, a value or a JudgeParseError out (issue 9, item 3)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worldagent_ray.critic.captions import sanitize_text
from worldagent_ray.critic.parsing import JudgeParseError, parse_caption, parse_judgement
from worldagent_ray.schemas import SCORE_DIMENSIONS, Scores, Verdict

SETTINGS = settings(derandomize=True, max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
score_values = st.one_of(st.integers(min_value=-(10 ** 400), max_value=10 ** 400), st.floats(), st.booleans(),
                         st.none(), st.text(max_size=4))
NASTY = [
    "", "null", "[]", "{", "\ud83c", '{"state_caption": "\\ud83c"}', "[" * 5000 + "]" * 5000,
    '{"scores": ' + "[" * 3000 + "]" * 3000 + "}", "1" * 5000, '{"scores": {"physics": ' + "9" * 5000 + "}}",
    '{"scores": {"physics": 1e999}}', '{"scores": {"physics": NaN}}', "x" * 200_000,
]


def _assert_total(fn, text):
    try:
        out = fn(text)
    except JudgeParseError as e:
        assert e.reason
        return None
    return out


@pytest.mark.parametrize("text", NASTY)
def test_nasty_inputs_give_typed_rejections(text):
    for fn in (parse_judgement, parse_caption):
        out = _assert_total(fn, text)
        if out is not None and fn is parse_caption:
            out.encode("utf-8")  # a returned caption is always encodable


def test_integer_score_of_400_digits_is_rejected_not_overflow():
    text = json.dumps({"scores": {k: 10 ** 400 for k in SCORE_DIMENSIONS}})
    with pytest.raises(JudgeParseError, match="scores.action_following"):
        parse_judgement(text)


@SETTINGS
@given(st.text())
def test_any_text_is_total(text):
    _assert_total(parse_judgement, text)
    _assert_total(parse_caption, text)


@SETTINGS
@given(json_values)
def test_any_json_is_total(value):
    text = json.dumps(value)
    _assert_total(parse_judgement, text)
    _assert_total(parse_caption, text)


@SETTINGS
@given(st.fixed_dictionaries({k: score_values for k in SCORE_DIMENSIONS}), st.text())
def test_scores_accepted_iff_in_unit_interval(raw, caption):
    text = json.dumps({"scores": raw, "state_caption": caption})
    valid = all(not isinstance(v, bool) and isinstance(v, (int, float)) and 0 <= v <= 1 for v in raw.values())
    if valid:
        scores, cap = parse_judgement(text)
        assert scores == Scores(**{k: float(v) for k, v in raw.items()})
        cap.encode("utf-8")
        Verdict(state_caption=cap, success=False, scores=scores, reward=0.0)  # never breaks the schema
    else:
        with pytest.raises(JudgeParseError):
            parse_judgement(text)


@SETTINGS
@given(st.text(min_size=1))
def test_caption_round_trip_is_clean_and_bounded(caption):
    try:
        cap = parse_caption(json.dumps({"state_caption": caption}), max_caption_chars=120)
    except JudgeParseError:
        assert sanitize_text(caption) == ""  # rejected only when nothing printable is left
        return
    assert 0 < len(cap) <= 120 and cap == cap.strip()
    cap.encode("utf-8")
