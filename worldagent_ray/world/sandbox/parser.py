"""Free-text plan step -> ``(verb, {role: object})``, driven by the rules' vocabulary.

The parser normalises text (Unicode folded to ASCII, lower case, punctuation dropped), finds
the earliest verb phrase (a contiguous synonym such as "switch on", or a split phrasal verb
such as "turn the stove on"), finds object mentions (multi-word synonyms first, then simple
plurals), and fills the verb's roles: a role with prepositions takes the first object after
one of them ("into the bowl"), a role with a preferred kind takes the first object of that
kind ("use the knife to slice..."), the remaining roles take the remaining mentions in order,
and defaults fill what is left. Pronouns ("whisk it") refer to the previous step's object.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from .rules import Rules, Verb

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


@dataclass
class ParsedStep:
    """A parse result. ``verb`` is None when the step was not understood (see ``reason``)."""

    verb: str | None
    roles: dict[str, str] = field(default_factory=dict)
    reason: str | None = None
    unknown: list[str] = field(default_factory=list)

    @property
    def args(self) -> list[str]:
        return list(self.roles.values())


def normalize(text: str) -> list[str]:
    """Fold to lower-case ASCII tokens: ``"Crack the Éggs!"`` -> ``["crack", "the", "eggs"]``."""
    folded = unicodedata.normalize("NFKD", text)
    folded = "".join(ch for ch in folded if not unicodedata.combining(ch))
    folded = folded.encode("ascii", "ignore").decode("ascii").lower()
    return [t for t in _NON_ALNUM.split(folded) if t]


@dataclass
class _Mention:
    obj: str
    start: int
    end: int
    prep: str | None  # the preposition right before it, if any


class StepParser:
    """Parses plan steps against a :class:`Rules` vocabulary."""

    def __init__(self, rules: Rules):
        self.rules = rules
        # object phrase (tuple of tokens) -> canonical name, longest first
        phrases: dict[tuple[str, ...], str] = {}
        for name, spec in rules.objects.items():
            phrases[(name,)] = name
            for syn in spec.synonyms:
                phrases[tuple(normalize(syn))] = name
        self._object_phrases = sorted(phrases.items(), key=lambda kv: -len(kv[0]))
        self._single = {p[0]: n for p, n in phrases.items() if len(p) == 1}
        self._verb_phrases: list[tuple[tuple[str, ...], Verb]] = sorted(
            ((syn, v) for v in rules.verbs.values() for syn in v.synonyms), key=lambda sv: -len(sv[0])
        )
        self._preps = rules.all_prepositions

    # ------------------------------------------------------------------ pieces

    def _find_verb(self, toks: list[str]) -> tuple[Verb, set[int]] | None:
        """Earliest verb phrase; at one position the longest contiguous match wins, then a
        split phrasal verb ("turn the stove on")."""
        for i, tok in enumerate(toks):
            split_match = None
            for syn, verb in self._verb_phrases:
                if syn[0] != tok:
                    continue
                if tuple(toks[i : i + len(syn)]) == syn:
                    return verb, set(range(i, i + len(syn)))
                if split_match is None and len(syn) == 2 and syn[1] in toks[i + 2 :]:
                    j = toks.index(syn[1], i + 2)
                    split_match = (verb, {i, j})
            if split_match:
                return split_match
        return None

    def _canonical_object(self, toks: list[str], i: int) -> tuple[str, int] | None:
        for phrase, name in self._object_phrases:
            if tuple(toks[i : i + len(phrase)]) == phrase:
                return name, len(phrase)
        tok = toks[i]
        for suffix in ("es", "s"):
            if tok.endswith(suffix) and tok[: -len(suffix)] in self._single:
                return self._single[tok[: -len(suffix)]], 1
        return None

    def _mentions(
        self, toks: list[str], used: set[int], context_obj: str | None
    ) -> tuple[list[_Mention], list[str]]:
        mentions: list[_Mention] = []
        unknown: list[str] = []
        prep: str | None = None
        i = 0
        while i < len(toks):
            if i in used:
                i += 1
                continue
            tok = toks[i]
            found = self._canonical_object(toks, i)
            if found:
                name, n = found
                mentions.append(_Mention(name, i, i + n, prep))
                prep = None
                i += n
                continue
            if tok in self.rules.pronouns and context_obj:
                mentions.append(_Mention(context_obj, i, i + 1, prep))
                prep = None
            elif tok in self._preps:
                prep = tok
            elif tok not in self.rules.fillers and tok not in self.rules.pronouns and not tok.isdigit():
                unknown.append(tok)
            i += 1
        return mentions, unknown

    def _prep_class(self, prep: str | None) -> str | None:
        if prep is None:
            return None
        for cls, words in self.rules.prepositions.items():
            if prep in words:
                return cls
        return None

    def _fill_roles(self, verb: Verb, mentions: list[_Mention]) -> dict[str, str | None]:
        roles: dict[str, str | None] = {r.name: None for r in verb.roles}
        free = list(mentions)

        def take(m: _Mention, role: str) -> None:
            roles[role] = m.obj
            free.remove(m)

        for r in verb.roles:  # 1. roles marked by a preposition
            if r.preps:
                m = next((m for m in free if self._prep_class(m.prep) == r.preps), None)
                if m:
                    take(m, r.name)
        for r in verb.roles:  # 2. roles with a preferred kind
            if roles[r.name] is None and r.kind:
                m = next((m for m in free if r.kind in self.rules.objects[m.obj].flags), None)
                if m:
                    take(m, r.name)
        for want_source in (False, True):  # 3. the rest in order (sources last)
            for r in verb.roles:
                if roles[r.name] is None:
                    m = next(
                        (m for m in free if (self._prep_class(m.prep) == "source") == want_source), None
                    )
                    if m:
                        take(m, r.name)
        for r in verb.roles:  # 4. defaults
            if roles[r.name] is None and r.default:
                roles[r.name] = r.default
        return roles

    # ------------------------------------------------------------------ API

    def parse(self, text: object, context_obj: str | None = None) -> ParsedStep:
        """Parse one step. Never raises: a step it cannot read gets ``verb=None`` and a reason."""
        if not isinstance(text, str):
            return ParsedStep(None, reason=f"step is not text (got {type(text).__name__})")
        toks = normalize(text)
        if not toks:
            return ParsedStep(None, reason=f"step {text[:60]!r} has no readable words")
        found = self._find_verb(toks)
        if found is None:
            return ParsedStep(None, reason=f"no known action in {text[:80]!r}")
        verb, used = found
        mentions, unknown = self._mentions(toks, used, context_obj)
        roles = self._fill_roles(verb, mentions)
        missing = [r for r, v in roles.items() if v is None]
        if missing:
            if unknown:
                return ParsedStep(
                    verb.name, reason=f"unknown object {' '.join(unknown[:3])!r}", unknown=unknown
                )
            return ParsedStep(
                verb.name, reason=f"'{verb.name}' needs a {missing[0]} (e.g. {verb.canonical!r})"
            )
        return ParsedStep(verb.name, {k: v for k, v in roles.items() if v is not None}, unknown=unknown)
