"""Text and JSON hygiene for model output, and the base of every message."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

SCORE_DIMENSIONS: tuple[str, ...] = (
    "action_following",
    "temporal_consistency",
    "object_interaction",
    "goal_achievement",
    "physics",
)
"""The critic's five dimensions, in the order of seed 000."""

MAX_GOAL_CHARS = 2_000
MAX_ACTION_CHARS = 500
MAX_JSON_CHARS = 65_536
"""Model output longer than this is rejected before it is parsed as JSON."""
MAX_JSON_DEPTH = 64
"""JSON nested deeper than this is rejected (the parser never recurses into it)."""


def clean_text(text: str) -> str:
    """``text`` with every unpaired UTF-16 surrogate (e.g. from a ``"\\ud83c"`` JSON escape in model
    output) replaced by U+FFFD, so it can always be encoded as UTF-8 and stored. Valid text is
    returned unchanged."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class JsonRejection(ValueError):
    """Text that is not an acceptable JSON document; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _depth_exceeds(text: str, limit: int) -> bool:
    """True if brackets outside strings nest deeper than ``limit`` (a linear scan, no recursion)."""
    depth, in_str, esc = 0, False, False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def load_json(text: Any, max_chars: int = MAX_JSON_CHARS, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse model output as JSON, totally: the value, or :class:`JsonRejection` naming why.

    Never raises anything else, whatever the input: non-strings, oversized text, nesting deeper
    than ``max_depth``, integers too long to convert, NaN/Infinity, and invalid JSON are all
    rejections. Strings in the value have unpaired surrogates replaced (:func:`clean_text`).
    """
    if not isinstance(text, str):
        raise JsonRejection(f"expected text, got {type(text).__name__}")
    if len(text) > max_chars:
        raise JsonRejection(f"output has {len(text)} characters, more than the limit {max_chars}")
    if _depth_exceeds(text, max_depth):
        raise JsonRejection(f"JSON nests deeper than {max_depth} levels")

    def _no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise JsonRejection(f"not valid JSON ({e.msg} at char {e.pos})") from None
    except (ValueError, RecursionError, OverflowError, MemoryError) as e:  # huge ints, NaN, depth
        raise JsonRejection(f"unacceptable JSON: {type(e).__name__}: {str(e)[:120]}") from None
    return _clean_strings(value)


def _clean_strings(value: Any) -> Any:
    """A copy of a parsed JSON value with every string cleaned (depth is bounded by the caller)."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [_clean_strings(x) for x in value]
    if isinstance(value, dict):
        return {clean_text(k): _clean_strings(x) for k, x in value.items()}
    return value


class _Message(BaseModel):
    """Base: strict about unknown fields, validates on assignment, JSON round-trips."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
