"""Total parsers of judge output: any text in, a typed value or a :class:`JudgeParseError` out.

A judge's output is data: it is parsed, never run. JSON that is too large, too deeply
nested, or holds integers too long for Python's int parser, lone surrogates, NaN or huge
numbers is rejected with a reason, never with another exception type. Pure core: no Ray.
"""

from __future__ import annotations

import math
from typing import Any

from ..schemas import SCORE_DIMENSIONS, JsonRejection, Scores
from ..schemas import load_json as load_model_json
from .captions import MAX_CAPTION_CHARS, cap_length, sanitize_text

MAX_JUDGE_CHARS = 100_000
"""Judge outputs longer than this are rejected unparsed (a judge answer is a few hundred)."""


class JudgeParseError(ValueError):
    """Judge output that is not the expected JSON; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def load_json(text: Any, max_chars: int = MAX_JUDGE_CHARS) -> Any:
    """:func:`worldagent_ray.schemas.load_json` (total, surrogates cleaned), failing with a
    :class:`JudgeParseError`."""
    try:
        return load_model_json(text, max_chars=max_chars)
    except JsonRejection as e:
        raise JudgeParseError(e.reason) from None


def unit_number(v: Any, where: str) -> float:
    """``v`` as a float in [0, 1] (bools, NaN, infinities and huge ints rejected)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise JudgeParseError(f"{where} must be a number in [0, 1], got {type(v).__name__}")
    if isinstance(v, int):
        if not 0 <= v <= 1:
            raise JudgeParseError(f"{where} must be a number in [0, 1], got an integer out of range")
        return float(v)
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise JudgeParseError(f"{where} must be a number in [0, 1], got {v!r}")
    return float(v)


def parse_judgement(text: Any, max_caption_chars: int = MAX_CAPTION_CHARS) -> tuple[Scores, str]:
    """Scores and (sanitised, length-capped) caption from judge JSON
    ``{"scores": {<five dimensions>: number in [0, 1]}, "state_caption": str, ...}``.

    Raises:
        JudgeParseError: naming the problem; no other exception escapes.
    """
    data = load_json(text)
    if not isinstance(data, dict) or not isinstance(data.get("scores"), dict):
        raise JudgeParseError("no 'scores' object")
    raw = data["scores"]
    vals = {k: unit_number(raw.get(k), f"scores.{k}") for k in SCORE_DIMENSIONS}
    cap = data.get("state_caption")
    caption = cap_length(sanitize_text(cap), max(1, min(max_caption_chars, MAX_CAPTION_CHARS))) if isinstance(cap, str) else ""
    return Scores(**vals), caption


def parse_caption(text: Any, max_caption_chars: int = MAX_CAPTION_CHARS) -> str:
    """The caption in judge JSON ``{"state_caption": "..."}``, sanitised and length-capped.

    Raises:
        JudgeParseError: not JSON, no non-empty ``state_caption`` string; nothing else escapes.
    """
    data = load_json(text)
    cap = data.get("state_caption") if isinstance(data, dict) else None
    clean = sanitize_text(cap) if isinstance(cap, str) else ""
    if not clean:
        raise JudgeParseError("no non-empty 'state_caption' string")
    return cap_length(clean, max(1, min(max_caption_chars, MAX_CAPTION_CHARS)))
