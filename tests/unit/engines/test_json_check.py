"""``json_rejection`` is total: any input gives a reason (a valid UTF-8 string) or None, never
an exception -- deep nesting, huge integers, lone surrogates, NaN and non-strings included."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worldagent_ray.engines.json_check import MAX_JSON_DEPTH, json_rejection
from worldagent_ray.schemas import Plan, Verdict

SCHEMAS = [Plan.decoding_schema(max_steps=4), Verdict.decoding_schema(),
           {"type": "array", "items": {"type": "integer", "minimum": 0, "enum": [1, 2, 3]}}]


def _total(text, schema) -> str | None:
    reason = json_rejection(text, schema)
    assert reason is None or (isinstance(reason, str) and reason)
    if reason is not None:
        reason.encode("utf-8")  # always encodable, whatever the input held
    return reason


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(derandomize=True, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(), schema=st.sampled_from(SCHEMAS))
def test_any_text_gives_a_reason_or_none(text, schema):
    _total(text, schema)


@settings(derandomize=True, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values, schema=st.sampled_from(SCHEMAS))
def test_any_json_document_gives_a_reason_or_none(value, schema):
    _total(json.dumps(value, allow_nan=True), schema)


@settings(derandomize=True, max_examples=60)
@given(depth=st.integers(min_value=1, max_value=5000), opener=st.sampled_from(["[", '{"a":']))
def test_deep_nesting_is_rejected_not_raised(depth, opener):
    closer = "]" if opener == "[" else "}"
    reason = _total(opener * depth + "1" + closer * depth, SCHEMAS[2])
    if depth > MAX_JSON_DEPTH:
        assert "nested deeper" in reason


@settings(derandomize=True, max_examples=40)
@given(digits=st.integers(min_value=4000, max_value=20000))
def test_huge_integers_are_rejected_or_checked_not_raised(digits):
    reason = _total("[" + "7" * digits + "]", SCHEMAS[2])
    assert reason is not None  # too many digits to parse, or not one of the enum values


@settings(derandomize=True, max_examples=100)
@given(code=st.integers(min_value=0xD800, max_value=0xDFFF), where=st.sampled_from(["value", "key"]))
def test_lone_surrogates_are_rejected(code, where):
    esc = f"\\u{code:04x}"
    doc = f'{{"steps": [{{"step": 1, "action": "a{esc}"}}]}}' if where == "value" else f'{{"{esc}": 1}}'
    reason = _total(doc, SCHEMAS[0])
    assert reason is not None and ("surrogate" in reason or "unexpected property" in reason
                                   or "missing required" in reason)
    assert _total(chr(code), SCHEMAS[0]) is not None  # a raw surrogate in the text itself


@pytest.mark.parametrize("doc", ["NaN", "[Infinity]", "[-Infinity]", "[1e999]"])
def test_non_finite_numbers_are_rejected(doc):
    assert _total(doc, {"type": "array"}) is not None


@pytest.mark.parametrize("bad", [None, b"{}", 3, ["{}"], object()])
def test_non_text_input_is_a_reason(bad):
    assert "not text" in _total(bad, SCHEMAS[0])


def test_valid_documents_still_pass():
    assert _total('{"steps": [{"step": 1, "action": "boil water"}]}', SCHEMAS[0]) is None
    assert _total("[1, 2, 3]", SCHEMAS[2]) is None
