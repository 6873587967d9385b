"""The kitchen's state and the small engine that checks conditions and applies effects.

A state maps every object in the scene to ``{"loc": <object name> | "hand" | None,
"props": {...}}`` (fixtures have ``loc=None``). The hand holds at most one object: the one
whose ``loc`` is ``"hand"``. Conditions and effects come from the rules file; this module
only implements the primitives listed in :data:`.rules.CHECKS` and :data:`.rules.EFFECTS`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from .rules import Condition, Rules, Verb

HAND = "hand"
CATEGORY_OBJECT = "object"
CATEGORY_PHYSICS = "physics"

_DEFAULT_CATEGORY = {
    "kind": CATEGORY_OBJECT,
    "receptacle": CATEGORY_OBJECT,
    "distinct": CATEGORY_OBJECT,
}


@dataclass
class CheckResult:
    ok: bool
    reason: str | None = None
    category: str | None = None  # "object" or "physics" when not ok


class KitchenState:
    """A mutable scene. Build with :meth:`from_spec`; :meth:`snapshot` gives JSON."""

    def __init__(self, rules: Rules, objects: dict[str, dict[str, Any]]):
        self.rules = rules
        self.objects = objects

    # ------------------------------------------------------------------ build / view

    @classmethod
    def from_spec(cls, rules: Rules, placement: dict[str, Any]) -> "KitchenState":
        """``placement`` maps portable object -> location name or ``{"loc":..., "props":...}``.

        Fixtures are always present. Raises ``ValueError`` naming an unknown object or
        location (task specs come from the generator; a bad one is a bug worth a clear error).
        """
        objs: dict[str, dict[str, Any]] = {}
        for f in rules.fixtures:
            objs[f] = {"loc": None, "props": dict(rules.objects[f].props)}
        for name, spec in placement.items():
            if name not in rules.objects:
                raise ValueError(f"world_spec places unknown object {name!r}")
            if isinstance(spec, str):
                spec = {"loc": spec}
            props = dict(rules.objects[name].props)
            props.update(spec.get("props", {}))
            objs[name] = {"loc": spec["loc"], "props": props}
        for name, o in objs.items():
            if o["loc"] is not None and o["loc"] != HAND and o["loc"] not in objs:
                raise ValueError(f"world_spec puts {name!r} at {o['loc']!r}, which is not in the scene")
        return cls(rules, objs)

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy({"objects": self.objects, "held": self.held})

    def copy(self) -> "KitchenState":
        return KitchenState(self.rules, copy.deepcopy(self.objects))

    @property
    def held(self) -> str | None:
        return next((n for n, o in self.objects.items() if o["loc"] == HAND), None)

    def loc(self, name: str) -> str | None:
        return self.objects[name]["loc"]

    def flags(self, name: str) -> frozenset[str]:
        return self.rules.objects[name].flags

    def contents(self, name: str) -> list[str]:
        return [n for n, o in self.objects.items() if o["loc"] == name]

    def ancestors(self, name: str) -> list[str]:
        """Locations containing ``name``, innermost first (stops at the hand or a fixture)."""
        out, cur, seen = [], self.objects[name]["loc"], {name}
        while cur is not None and cur != HAND and cur not in seen:
            out.append(cur)
            seen.add(cur)
            cur = self.objects[cur]["loc"]
        return out

    def describe(self) -> str:
        """A plain-English description of the scene, one clause per portable object."""
        parts = []
        for name, o in self.objects.items():
            states = [k if v is True else f"not {k}" for k, v in o["props"].items() if isinstance(v, bool) and v]
            adj = f" ({', '.join(states)})" if states else ""
            if o["loc"] is None:
                if states:
                    parts.append(f"the {name} is {', '.join(states)}")
                continue
            if o["loc"] == HAND:
                parts.append(f"the robot holds the {name}{adj}")
            else:
                prep = "in" if "container" in self.flags(o["loc"]) else "on"
                parts.append(f"the {name}{adj} is {prep} the {o['loc']}")
        held = self.held
        if held is None:
            parts.append("the hand is empty")
        return "; ".join(parts) + "."

    # ------------------------------------------------------------------ conditions

    def _fmt(self, template: str, bind: dict[str, str], arg0: str | None) -> str:
        values = {k: v for k, v in bind.items()}
        values.setdefault("obj", arg0 or "object")
        values["held"] = self.held or "nothing"
        values["loc"] = (self.objects.get(arg0 or "", {}) or {}).get("loc") or "nowhere"
        try:
            return template.format(**values)
        except (KeyError, IndexError):
            return template

    def _resolve(self, arg: Any, bind: dict[str, str]) -> Any:
        return bind.get(arg, arg) if isinstance(arg, str) else arg

    def _primitive(self, check: str, a: list[Any]) -> tuple[bool, str]:
        """Evaluate one primitive; return (holds, default reason when it does not)."""
        objs = self.objects
        for x in a:
            if isinstance(x, str) and x in self.rules.objects and x not in objs and check not in ("prop",):
                return False, f"there is no {x} in this scene"
        if check == "kind":
            return a[1] in self.flags(a[0]), f"the {a[0]} is not {a[1]}"
        if check == "receptacle":
            f = self.flags(a[0])
            return bool({"container", "surface"} & f), f"nothing can be put in or on the {a[0]}"
        if check == "distinct":
            return a[0] != a[1], f"the {a[0]} and the {a[1]} are the same object"
        if check == "reachable":
            for anc in self.ancestors(a[0]):
                if "openable" in self.flags(anc) and not objs[anc]["props"].get("open", False):
                    return False, f"the {a[0]} is inside the closed {anc}"
            return True, ""
        if check == "accessible":
            f = self.flags(a[0])
            return (
                "openable" not in f or bool(objs[a[0]]["props"].get("open")),
                f"the {a[0]} is closed",
            )
        if check == "hand_empty":
            return self.held is None, f"the hand is already holding the {self.held}"
        if check == "hand_free_for":
            return self.held in (None, a[0]), f"the hand is already holding the {self.held}"
        if check == "holding":
            return self.held == a[0], f"the hand is not holding the {a[0]}"
        if check == "prop":
            if a[0] not in objs:
                return False, f"there is no {a[0]} in this scene"
            return objs[a[0]]["props"].get(a[1]) == a[2], f"the {a[0]} is {'not ' if a[2] else ''}{a[1]}"
        if check == "at":
            return objs[a[0]]["loc"] == a[1], f"the {a[0]} is not at the {a[1]}"
        if check == "contained":
            loc = objs[a[0]]["loc"]
            return (
                loc not in (None, HAND) and "portable" in self.flags(loc),
                f"the {a[0]} is not in a bowl, pan or other container",
            )
        if check == "not_within":
            return a[0] != a[1] and a[0] not in self.ancestors(a[1]), f"the {a[0]} cannot go inside itself"
        raise ValueError(f"unknown check {check!r}")  # prevented by rules validation

    def check(self, cond: Condition, bind: dict[str, str]) -> CheckResult:
        args = [self._resolve(x, bind) for x in cond.args]
        holds, default_reason = self._primitive(cond.check, args)
        if cond.negate:
            holds = not holds
        if holds:
            return CheckResult(True)
        absent = any(isinstance(x, str) and x in self.rules.objects and x not in self.objects for x in args)
        category = cond.category or (CATEGORY_OBJECT if absent else _DEFAULT_CATEGORY.get(cond.check, CATEGORY_PHYSICS))
        reason = default_reason if absent or not cond.reason else self._fmt(cond.reason, bind, args[0] if args else None)
        return CheckResult(False, reason, category)

    # ------------------------------------------------------------------ effects

    def apply(self, effects: tuple[dict[str, list[Any]], ...], bind: dict[str, str]) -> None:
        for eff in effects:
            (op, raw), = eff.items()
            a = [self._resolve(x, bind) for x in raw]
            if op == "move":
                self.objects[a[0]]["loc"] = a[1]
            elif op == "set":
                self.objects[a[0]]["props"][a[1]] = a[2]
            elif op == "copy":
                self.objects[a[2]]["props"][a[3]] = self.objects[a[0]]["props"].get(a[1])
            elif op == "move_contents":
                for c in self.contents(a[0]):
                    self.objects[c]["loc"] = a[1]

    # ------------------------------------------------------------------ one step

    def step(self, verb: Verb, bind: dict[str, str]) -> CheckResult:
        """Check the verb's preconditions against ``bind`` and apply its effects if they hold.

        Objects named by the binding must be in the scene (category ``object`` otherwise).
        The first case whose ``when`` holds is used; if none does, ``otherwise`` says why.
        """
        for role, name in bind.items():
            if name not in self.objects:
                return CheckResult(False, f"there is no {name} in this scene", CATEGORY_OBJECT)
        case = None
        for c in verb.cases:
            if all(self.check(w, bind).ok for w in c.when):
                case = c
                break
        if case is None:
            o = verb.otherwise
            reason = self._fmt(o.reason, bind, bind.get("obj")) if o and o.reason else "no rule applies"
            return CheckResult(False, reason, (o.category if o else None) or CATEGORY_PHYSICS)
        for cond in case.pre:
            r = self.check(cond, bind)
            if not r.ok:
                return r
        self.apply(case.effects, bind)
        return CheckResult(True)
