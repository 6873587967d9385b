"""The kitchen's rules, loaded from data (``world/sandbox_data/kitchen.yaml``).

Nothing here knows a particular verb: objects, synonyms, roles, preconditions, effects and
appearance are all read from the YAML file and interpreted by :mod:`.state` and
:mod:`.parser`. :func:`load_rules` validates the file and fails with a message naming the
bad entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

DATA_PATH = Path(__file__).resolve().parent.parent / "sandbox_data" / "kitchen.yaml"

CHECKS: frozenset[str] = frozenset(
    {"kind", "receptacle", "distinct", "reachable", "accessible", "hand_empty", "hand_free_for",
     "holding", "prop", "at", "contained", "not_within"}
)
"""Condition primitives the engine implements (see the header of kitchen.yaml)."""

EFFECTS: frozenset[str] = frozenset({"move", "set", "copy", "move_contents"})


class RulesError(ValueError):
    """The rules file is malformed; the message names the entry."""


@dataclass(frozen=True)
class Condition:
    check: str
    args: tuple[Any, ...]
    negate: bool = False
    reason: str | None = None
    category: str | None = None


@dataclass(frozen=True)
class Role:
    name: str
    preps: str | None = None  # a key of rules.prepositions ("dest", "tool")
    kind: str | None = None  # a flag preferred for this role
    default: str | None = None


@dataclass(frozen=True)
class Case:
    when: tuple[Condition, ...]
    pre: tuple[Condition, ...]
    effects: tuple[dict[str, list[Any]], ...]


@dataclass(frozen=True)
class Verb:
    name: str
    synonyms: tuple[tuple[str, ...], ...]
    roles: tuple[Role, ...]
    canonical: str
    cases: tuple[Case, ...]
    otherwise: Condition | None = None
    admissible: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ObjectSpec:
    name: str
    synonyms: tuple[str, ...]
    flags: frozenset[str]
    props: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rules:
    objects: dict[str, ObjectSpec]
    verbs: dict[str, Verb]
    fillers: frozenset[str]
    pronouns: frozenset[str]
    prepositions: dict[str, frozenset[str]]
    fixtures: tuple[str, ...]
    render: dict[str, Any]

    @property
    def all_prepositions(self) -> frozenset[str]:
        return frozenset().union(*self.prepositions.values())


def _condition(raw: Any, where: str) -> Condition:
    if not isinstance(raw, dict) or "check" not in raw:
        raise RulesError(f"{where}: a condition must be a mapping with 'check', got {raw!r}")
    if raw["check"] not in CHECKS:
        raise RulesError(f"{where}: unknown check {raw['check']!r}; known: {sorted(CHECKS)}")
    extra = set(raw) - {"check", "args", "negate", "reason", "category"}
    if extra:
        raise RulesError(f"{where}: unknown condition field(s) {sorted(extra)}")
    return Condition(
        check=raw["check"],
        args=tuple(raw.get("args") or ()),
        negate=bool(raw.get("negate", False)),
        reason=raw.get("reason"),
        category=raw.get("category"),
    )


def _effects(raw: Any, where: str) -> tuple[dict[str, list[Any]], ...]:
    out = []
    for i, eff in enumerate(raw or []):
        if not isinstance(eff, dict) or len(eff) != 1 or next(iter(eff)) not in EFFECTS:
            raise RulesError(f"{where}.effects[{i}]: expected one of {sorted(EFFECTS)}, got {eff!r}")
        out.append(eff)
    return tuple(out)


def _verb(name: str, raw: dict[str, Any]) -> Verb:
    where = f"verbs.{name}"
    for key in ("synonyms", "roles", "canonical"):
        if key not in raw:
            raise RulesError(f"{where}: missing {key!r}")
    roles = tuple(Role(**r) for r in raw["roles"])
    shared_pre = tuple(_condition(c, f"{where}.pre") for c in raw.get("pre", []))
    shared_eff = _effects(raw.get("effects"), where)
    cases = []
    for j, c in enumerate(raw.get("cases") or [{}]):
        cw = f"{where}.cases[{j}]"
        cases.append(
            Case(
                when=tuple(_condition(x, cw + ".when") for x in c.get("when", [])),
                pre=tuple(_condition(x, cw + ".pre") for x in c.get("pre", [])) or shared_pre,
                effects=_effects(c.get("effects"), cw) or shared_eff,
            )
        )
    otherwise = raw.get("otherwise")
    return Verb(
        name=name,
        synonyms=tuple(tuple(s.split()) for s in raw["synonyms"]),
        roles=roles,
        canonical=raw["canonical"],
        cases=tuple(cases),
        otherwise=Condition("otherwise", (), False, otherwise["reason"], otherwise.get("category"))
        if otherwise
        else None,
        admissible=dict(raw.get("admissible") or {}),
    )


def parse_rules(data: dict[str, Any]) -> Rules:
    """Validate a rules mapping (the YAML's content) into :class:`Rules`."""
    objects = {}
    for name, spec in (data.get("objects") or {}).items():
        objects[name] = ObjectSpec(
            name=name,
            synonyms=tuple(spec.get("synonyms", [])),
            flags=frozenset(spec.get("flags", [])),
            props=dict(spec.get("props", {})),
        )
    if not objects:
        raise RulesError("rules define no objects")
    verbs = {name: _verb(name, raw) for name, raw in (data.get("verbs") or {}).items()}
    for f in data.get("fixtures", []):
        if f not in objects:
            raise RulesError(f"fixtures: {f!r} is not an object")
    rules = Rules(
        objects=objects,
        verbs=verbs,
        fillers=frozenset(data.get("fillers", [])),
        pronouns=frozenset(data.get("pronouns", [])),
        prepositions={k: frozenset(v) for k, v in (data.get("prepositions") or {}).items()},
        fixtures=tuple(data.get("fixtures", [])),
        render=dict(data.get("render") or {}),
    )
    for v in verbs.values():
        for r in v.roles:
            if r.preps is not None and r.preps not in rules.prepositions:
                raise RulesError(f"verbs.{v.name}: role {r.name} names unknown prepositions {r.preps!r}")
            if r.default is not None and r.default not in objects:
                raise RulesError(f"verbs.{v.name}: role {r.name} default {r.default!r} is not an object")
    return rules


@lru_cache(maxsize=4)
def load_rules(path: str | None = None) -> Rules:
    """Load and validate the kitchen rules (cached per path)."""
    p = Path(path) if path else DATA_PATH
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RulesError(f"cannot read rules file {str(p)!r}: {e}") from None
    if not isinstance(data, dict):
        raise RulesError(f"rules file {str(p)!r} must contain a mapping")
    return parse_rules(data)
