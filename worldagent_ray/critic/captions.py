"""Grounded state captions: sanitising, a repetition guard, a length cap, and faithfulness.

A small judge model's caption can loop ("The kitchen is now equipped with a kitchen robot,
..." until the token limit) or copy the prompt's template ("Goal conditions met: none,
goal_state_description: ..."). :func:`ground_caption` keeps a caption only when it is
clean text of bounded length that neither repeats itself nor leaks prompt or schema text;
otherwise the world's own scene description replaces it and a note says why.

:func:`caption_faithfulness` measures how many of the facts a caption states (an object's
location, an object's property) hold in the world's final state.

Every function here is total: any ``str`` in, a value out (no exception). Pure core: no Ray.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Mapping

MAX_CAPTION_CHARS = 2_000
"""Hard cap of :class:`~worldagent_ray.schemas.Verdict.state_caption` (the schema's limit)."""

LEAK_MARKERS: tuple[str, ...] = (
    "goal conditions met",
    "not met:",
    "goal_state_description",
    "state_description",
    "state_caption",
    "final state:",
    "scene:",
    "step outcomes:",
    "plan:",
    "goal:",
    "<|im_start|>",
    "<|im_end|>",
    "<|",
    "{",
    "}",
    "\"scores\"",
    "action_following",
    "temporal_consistency",
    "goal_achievement",
)
"""Lower-case substrings that only appear in a caption copied from the prompt or the schema."""

_WORD = re.compile(r"[a-z0-9_']+")


def sanitize_text(text: Any) -> str:
    """``text`` as clean printable text: lone surrogates and other unencodable code points
    dropped, control and format characters turned into spaces, whitespace collapsed.
    Anything that is not a ``str`` gives ``""``."""
    if not isinstance(text, str):
        return ""
    text = text.encode("utf-8", "ignore").decode("utf-8", "ignore")  # drops lone surrogates
    out = [" " if unicodedata.category(ch)[0] == "C" else ch for ch in text]
    return " ".join("".join(out).split())


def cap_length(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters, at the last sentence end (or word
    boundary) inside the limit when there is one in its second half."""
    max_chars = max(1, int(max_chars))
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    for sep in (". ", "; ", ", ", " "):
        k = cut.rfind(sep)
        if k >= max_chars // 2:
            return cut[: k + (1 if sep != " " else 0)].rstrip()
    return cut.rstrip()


def repetition_problem(text: str, ngram: int = 4, max_repeats: int = 2, min_unique: float = 0.5) -> str | None:
    """Why ``text`` is a loop, or None: an ``ngram``-word sequence occurring more than
    ``max_repeats`` times, or (for 12+ words) fewer than ``min_unique`` of its word
    ``ngram``-grams distinct."""
    words = _WORD.findall(text.lower())
    if len(words) < ngram:
        return None
    grams = [tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]
    counts: dict[tuple[str, ...], int] = {}
    for g in grams:
        counts[g] = counts.get(g, 0) + 1
    worst, n = max(counts.items(), key=lambda kv: kv[1])
    if n > max_repeats:
        return f"repeats {' '.join(worst)!r} {n} times"
    if len(words) >= 12 and len(counts) / len(grams) < min_unique:
        return f"only {len(counts)} of {len(grams)} {ngram}-word sequences are distinct"
    return None


def caption_problem(text: str) -> str | None:
    """Why a (sanitised) caption is unusable, or None: empty, leaked template text, or a loop."""
    if not text.strip():
        return "empty caption"
    low = text.lower()
    for marker in LEAK_MARKERS:
        if marker in low:
            return f"caption leaks prompt/schema text {marker!r}"
    return repetition_problem(text)


def ground_caption(caption: Any, fallback: str, max_chars: int = MAX_CAPTION_CHARS,
                   source: str = "caption") -> tuple[str, list[str]]:
    """A usable caption and notes: ``caption`` sanitised and length-capped when it is clean,
    else ``fallback`` (the world's own scene description) with a note naming the problem.

    Never raises. The result is at most ``min(max_chars, MAX_CAPTION_CHARS)`` characters.
    """
    limit = max(1, min(int(max_chars), MAX_CAPTION_CHARS))
    notes: list[str] = []
    text = sanitize_text(caption)
    problem = caption_problem(text)
    if problem is None:
        if len(text) > limit:
            notes.append(f"{source}: caption cut from {len(text)} to {limit} characters")
        return cap_length(text, limit), notes
    safe_fallback = cap_length(sanitize_text(fallback), limit)
    what = "caption is the world's scene description" if safe_fallback else "caption dropped"
    notes.append(f"{source}: degenerate caption ({problem}); {what}")
    return safe_fallback, notes


# --------------------------------------------------------------------------- faithfulness


def _objects(final_state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    objs = final_state.get("objects") if isinstance(final_state, Mapping) else None
    return {str(k): v for k, v in objs.items() if isinstance(v, Mapping)} if isinstance(objs, Mapping) else {}


def caption_facts(caption: str, final_state: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """The facts ``caption`` states about the scene, each with whether it holds in
    ``final_state`` (a sandbox ``GroundTruth.final_state``: ``{"objects": {name: {"loc",
    "props"}}, "held"}``).

    A caption is split into clauses (at ``;``, ``.``, ``and`` and commas outside parentheses,
    so "the tomato (washed, sliced) is in the bowl" is one clause). In a clause whose
    first named object is ``X``:

    * "in/on/at the ``Y``" (``Y`` a known object or fixture) states ``loc(X) == Y``;
    * "hold(s) the ``X``" states that the robot holds ``X``;
    * a property word of the scene (``washed``, ``on``, ``open``...) states that property of
      ``X``, or its absence when "not" precedes it.

    Facts about objects absent from the scene are not counted (the vocabulary is the scene's).
    """
    objs = _objects(final_state)
    if not objs or not isinstance(caption, str):
        return []
    held = final_state.get("held")
    prop_words = {p for o in objs.values() for p in (o.get("props") or {})}
    facts: list[tuple[str, bool]] = []
    text = re.sub(r"\(([^()]*)\)", lambda m: " " + m.group(1).replace(",", " ") + " ", caption.lower())
    for clause in re.split(r"[;.,]|\band\b", text):
        words = _WORD.findall(clause)
        named = [(i, w) for i, w in enumerate(words) if w in objs]
        if not named:
            continue
        i0, subj = named[0]
        if any(w in ("hold", "holds", "holding") for w in words[:i0]):
            facts.append((f"holding {subj}", held == subj))
            continue
        for i, w in enumerate(words):
            if i > i0 and w in ("in", "on", "at", "inside"):
                rest = words[i + 1:i + 3]
                dest = rest[1] if rest[:1] == ["the"] and len(rest) > 1 else (rest[0] if rest else None)
                if dest in objs and dest != subj:
                    facts.append((f"{subj} {w} {dest}", objs[subj].get("loc") == dest))
        for i, w in enumerate(words):
            if w not in prop_words:
                continue
            if w == "on" and i + 1 < len(words) and words[i + 1] in ("the", "a", "an"):
                continue  # a location, not the property "on"
            negated = i > 0 and words[i - 1] in ("not", "no", "un")
            value = bool((objs[subj].get("props") or {}).get(w, False))
            facts.append((f"{subj} {'not ' if negated else ''}{w}", value != negated))
    return facts


def caption_faithfulness(caption: str, final_state: Mapping[str, Any]) -> float | None:
    """Fraction of the facts ``caption`` states that hold in ``final_state``; None when it
    states none (see :func:`caption_facts`)."""
    facts = caption_facts(caption, final_state)
    return sum(ok for _, ok in facts) / len(facts) if facts else None
