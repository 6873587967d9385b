"""Task families of the sandbox kitchen, for the three curriculum phases of seed 000.

A family turns variation parameters (where the ingredients start, which distractor objects
are on the counter, a layout index) into a :class:`~worldagent_ray.schemas.Task` whose
``world_spec`` holds everything the world needs: the family, its params, the placement of
every portable object, the goal predicates (conditions of the rules file) and a reference
plan with a *stage* per step (steps of a lower stage come first in the recipe; steps of one
stage may go in any order). The task id is a hash of family and params, and the split is a
hash too: about 20 % of all variations are held out, the same ones on every machine.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Any, Callable

from ...schemas import Plan, Task
from .parser import StepParser, normalize
from .rules import Rules, load_rules

HELDOUT_PERCENT = 20
LAYOUTS = 6
FOOD = ("egg", "tomato", "lettuce")
PORTABLES = ("bowl", "plate", "pan", "cup", "kettle", "egg", "tomato", "lettuce", "knife", "whisk", "teabag")


@dataclass(frozen=True)
class Family:
    """One task family: ``build(params)`` gives (goal text, required objects and their
    start locations, goal predicates, reference steps [(action, stage)])."""

    name: str
    phase: int
    choices: dict[str, tuple[Any, ...]]  # param -> allowed values (besides distractors/layout)
    build: Callable[[dict[str, Any]], tuple[str, dict[str, str], list[dict[str, Any]], list[tuple[str, int]]]]
    keywords: tuple[str, ...] = ()  # a goal mentioning one of these words is this family


def _prop(name: str, obj: str, prop: str, value: Any = True) -> dict[str, Any]:
    return {"name": name, "check": "prop", "args": [obj, prop, value]}


def _at(name: str, obj: str, loc: str) -> dict[str, Any]:
    return {"name": name, "check": "at", "args": [obj, loc]}


def _fridge(loc: str, stage: int = 0) -> list[tuple[str, int]]:
    return [("open the fridge", stage)] if loc == "fridge" else []


def _turn_on_stove(p):
    return "Turn on the stove", {}, [_prop("stove_on", "stove", "on")], [("turn on the stove", 1)]


def _open_fridge(p):
    return "Open the fridge", {}, [_prop("fridge_open", "fridge", "open")], [("open the fridge", 1)]


def _pick_up(p):
    it, loc = p["item"], p["item_loc"]
    return (
        f"Pick up the {it}",
        {it: loc},
        [{"name": f"holding_{it}", "check": "holding", "args": [it]}],
        _fridge(loc) + [(f"pick up the {it}", 1)],
    )


def _put_on_plate(p):
    it, loc = p["item"], p["item_loc"]
    return (
        f"Put the {it} on the plate",
        {it: loc, "plate": "counter"},
        [_at(f"{it}_on_plate", it, "plate")],
        _fridge(loc) + [(f"put the {it} on the plate", 1)],
    )


def _fill_kettle(p):
    return "Fill the kettle", {"kettle": "counter"}, [_prop("kettle_filled", "kettle", "filled")], [
        ("fill the kettle", 1)
    ]


def _wash(p):
    it, loc = p["item"], p["item_loc"]
    return f"Wash the {it}", {it: loc}, [_prop(f"{it}_washed", it, "washed")], _fridge(loc) + [
        (f"wash the {it}", 1)
    ]


def _crack_and_whisk(p):
    loc = p["item_loc"]
    return (
        "Crack an egg into the bowl and whisk it",
        {"egg": loc, "bowl": "counter", "whisk": "counter"},
        [_prop("egg_cracked", "egg", "cracked"), _at("egg_in_bowl", "egg", "bowl"), _prop("egg_whisked", "egg", "whisked")],
        _fridge(loc) + [("crack the egg into the bowl", 1), ("whisk the egg", 2)],
    )


def _slice_and_plate(p):
    it, loc = p["item"], p["item_loc"]
    return (
        f"Slice the {it} and put it on the plate",
        {it: loc, "knife": "counter", "plate": "counter"},
        [_prop(f"{it}_sliced", it, "sliced"), _at(f"{it}_on_plate", it, "plate")],
        _fridge(loc) + [(f"slice the {it}", 1), (f"put the {it} on the plate", 2)],
    )


def _wash_and_slice(p):
    it, loc = p["item"], p["item_loc"]
    return (
        f"Wash and slice the {it}",
        {it: loc, "knife": "counter"},
        [_prop(f"{it}_washed", it, "washed"), _prop(f"{it}_sliced", it, "sliced")],
        _fridge(loc) + [(f"wash the {it}", 1), (f"slice the {it}", 2)],
    )


def _boil_water(p):
    return (
        "Boil water in the kettle",
        {"kettle": "counter"},
        [_prop("kettle_filled", "kettle", "filled"), _prop("water_boiled", "kettle", "boiled")],
        [("fill the kettle", 1), ("put the kettle on the stove", 2), ("turn on the stove", 2), ("boil the kettle", 3)],
    )


def _omelette(p):
    loc = p["item_loc"]
    return (
        "Cook an omelette and serve it on a plate",
        {"egg": loc, "bowl": "counter", "whisk": "counter", "pan": "counter", "plate": "counter"},
        [
            _prop("egg_cracked", "egg", "cracked"),
            _prop("egg_whisked", "egg", "whisked"),
            _prop("egg_cooked", "egg", "cooked"),
            _at("omelette_on_plate", "egg", "plate"),
        ],
        _fridge(loc)
        + [
            ("crack the egg into the bowl", 1),
            ("whisk the egg", 2),
            ("put the pan on the stove", 1),
            ("turn on the stove", 2),
            ("pour the egg into the pan", 3),
            ("cook the egg", 4),
            ("put the egg on the plate", 5),
        ],
    )


def _salad(p):
    tl, ll = p["tomato_loc"], p["lettuce_loc"]
    fridge = _fridge("fridge") if "fridge" in (tl, ll) else []
    return (
        "Make a salad and serve it on the table",
        {"tomato": tl, "lettuce": ll, "knife": "counter", "bowl": "counter"},
        [
            _prop("tomato_washed", "tomato", "washed"),
            _prop("tomato_sliced", "tomato", "sliced"),
            _prop("lettuce_sliced", "lettuce", "sliced"),
            _at("tomato_in_bowl", "tomato", "bowl"),
            _at("lettuce_in_bowl", "lettuce", "bowl"),
            _at("salad_on_table", "bowl", "table"),
        ],
        fridge
        + [
            ("wash the tomato", 1),
            ("slice the tomato", 2),
            ("put the tomato in the bowl", 3),
            ("slice the lettuce", 2),
            ("put the lettuce in the bowl", 3),
            ("put the bowl on the table", 4),
        ],
    )


def _tea(p):
    return (
        "Make a cup of tea and serve it on the table",
        {"kettle": "counter", "cup": "counter", "teabag": "counter"},
        [
            _at("teabag_in_cup", "teabag", "cup"),
            _prop("cup_filled", "cup", "filled"),
            _prop("water_hot", "cup", "hot"),
            _at("tea_on_table", "cup", "table"),
        ],
        [
            ("fill the kettle", 1),
            ("put the kettle on the stove", 2),
            ("turn on the stove", 2),
            ("boil the kettle", 3),
            ("put the teabag in the cup", 1),
            ("pour the kettle into the cup", 4),
            ("put the cup on the table", 5),
        ],
    )


_LOC = ("counter", "fridge")
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("turn_on_stove", 1, {}, _turn_on_stove),
        Family("open_fridge", 1, {}, _open_fridge),
        Family("pick_up", 1, {"item": ("cup", "egg", "tomato", "knife", "bowl", "lettuce"), "item_loc": _LOC}, _pick_up),
        Family("put_on_plate", 1, {"item": ("tomato", "egg", "lettuce", "cup"), "item_loc": _LOC}, _put_on_plate),
        Family("fill_kettle", 1, {}, _fill_kettle),
        Family("wash", 1, {"item": ("tomato", "lettuce"), "item_loc": _LOC}, _wash),
        Family("crack_and_whisk", 2, {"item_loc": _LOC}, _crack_and_whisk),
        Family("slice_and_plate", 2, {"item": ("tomato", "lettuce"), "item_loc": _LOC}, _slice_and_plate),
        Family("wash_and_slice", 2, {"item": ("tomato", "lettuce"), "item_loc": _LOC}, _wash_and_slice),
        Family("boil_water", 2, {}, _boil_water),
        Family("omelette", 3, {"item_loc": _LOC}, _omelette, keywords=("omelette", "omelet", "omelettes")),
        Family("salad", 3, {"tomato_loc": _LOC, "lettuce_loc": _LOC}, _salad, keywords=("salad",)),
        Family("tea", 3, {}, _tea, keywords=("tea",)),
    ]
}


def _normalize_params(family: Family, params: dict[str, Any]) -> dict[str, Any]:
    p = dict(params)
    # Only food starts in the fridge.
    if "item" in p and p["item"] not in FOOD:
        p["item_loc"] = "counter"
    p["distractors"] = sorted(set(p.get("distractors", [])))
    p["layout"] = int(p.get("layout", 0))
    return {k: p[k] for k in sorted(p)}


def _params_key(family: str, params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([family, params], sort_keys=True).encode()).hexdigest()


def split_of(family: str, params: dict[str, Any]) -> str:
    """'heldout' for about HELDOUT_PERCENT % of variations (by hash), else 'train'."""
    return "heldout" if int(_params_key(family, params)[:8], 16) % 100 < HELDOUT_PERCENT else "train"


def build_task(family_name: str, params: dict[str, Any], goal: str | None = None, source: str = "generator") -> Task:
    """The task of one family and variation (deterministic: same inputs, same task and id)."""
    if family_name not in FAMILIES:
        raise ValueError(f"unknown sandbox task family {family_name!r}; known: {sorted(FAMILIES)}")
    fam = FAMILIES[family_name]
    params = _normalize_params(fam, params)
    for k, allowed in fam.choices.items():
        if params.get(k) not in allowed:
            raise ValueError(f"family {family_name}: param {k}={params.get(k)!r} not in {list(allowed)}")
    text, placement, goal_preds, reference = fam.build(params)
    placement = dict(placement)
    for d in params["distractors"]:
        if d not in PORTABLES:
            raise ValueError(f"family {family_name}: distractor {d!r} is not a portable object")
        placement.setdefault(d, "counter")
    # Layout: rotate the order in which counter objects are listed (their slots).
    names = sorted(placement)
    k = params["layout"] % max(1, len(names))
    placement = {n: placement[n] for n in names[k:] + names[:k]}
    key = _params_key(family_name, params)
    spec = {
        "world": "sandbox",
        "family": family_name,
        "params": params,
        "placement": placement,
        "goal_predicates": goal_preds,
        # Recipe order: stably sorted by stage, so the reference plan is itself consistent.
        "reference": [{"action": a, "stage": s} for a, s in sorted(reference, key=lambda r: r[1])],
    }
    return Task(
        id=f"sbx.{family_name}.{key[:12]}",
        goal=goal or text,
        phase=fam.phase,
        split=split_of(family_name, params),
        source=source,  # type: ignore[arg-type]
        world_spec=spec,
    )


def reference_plan(task: Task) -> Plan:
    """An oracle plan that solves a generator task (the reference steps in recipe order)."""
    spec = task.world_spec or {}
    if "reference" not in spec:
        raise ValueError(f"task {task.id!r} has no sandbox world_spec with a reference plan")
    return Plan.from_actions([r["action"] for r in spec["reference"]])


def is_valid_task(task: Task) -> bool:
    """True when the task's world_spec rebuilds to the same task (family, params, id, split)."""
    spec = task.world_spec
    if not isinstance(spec, dict) or spec.get("world") != "sandbox":
        return False
    try:
        rebuilt = build_task(spec["family"], spec["params"])
    except (KeyError, TypeError, ValueError):
        return False
    return rebuilt.id == task.id and rebuilt.world_spec == spec and rebuilt.phase == task.phase


class SandboxTaskGenerator:
    """Seeded generator of sandbox tasks.

    Args:
        seed (`int`): the same seed and index always give the same task.
        rules (`Rules`, *optional*): the kitchen rules (default: the packaged file).
    """

    def __init__(self, seed: int = 0, rules: Rules | None = None):
        self.seed = int(seed)
        self.rules = rules or load_rules()
        self._parser = StepParser(self.rules)

    def families(self, phase: int) -> list[str]:
        return [n for n, f in FAMILIES.items() if f.phase == phase]

    def _random_params(self, fam: Family, rng: random.Random, fixed: dict[str, Any] | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {k: rng.choice(v) for k, v in sorted(fam.choices.items())}
        params.update(fixed or {})
        used = set(fam.build(_normalize_params(fam, params))[1])
        pool = [o for o in PORTABLES if o not in used]
        params["distractors"] = rng.sample(pool, rng.randint(0, min(3, len(pool))))
        params["layout"] = rng.randrange(LAYOUTS)
        return _normalize_params(fam, params)

    def sample(
        self,
        phase: int,
        split: str = "train",
        index: int | None = None,
        rng: random.Random | None = None,
        family: str | None = None,
    ) -> Task:
        """One task of ``phase`` in ``split``: from ``rng`` if given, else from (seed, index)."""
        if phase not in (1, 2, 3):
            raise ValueError(f"phase must be 1, 2 or 3, got {phase!r}")
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        names = [family] if family else self.families(phase)
        if family and (family not in FAMILIES or FAMILIES[family].phase != phase):
            raise ValueError(f"family {family!r} is not a phase-{phase} family; known: {self.families(phase)}")
        if rng is None:
            rng = random.Random(f"{self.seed}:{phase}:{split}:{index or 0}:{family}")
        for _ in range(1000):
            fam = FAMILIES[rng.choice(names)]
            params = self._random_params(fam, rng)
            if split_of(fam.name, params) == split:
                return build_task(fam.name, params)
        raise RuntimeError(f"no {split} variation found for phase {phase}")  # ~impossible

    def heldout_tasks(self, phase: int, n: int) -> list[Task]:
        """``n`` distinct held-out tasks of ``phase`` (deterministic for the seed)."""
        out: dict[str, Task] = {}
        i = 0
        while len(out) < n and i < 50 * n + 100:
            t = self.sample(phase, "heldout", index=i)
            out.setdefault(t.id, t)
            i += 1
        return list(out.values())

    # ------------------------------------------------------------------ goal matching

    def _signature(self, text: str) -> set[tuple[str, str]]:
        clauses = re.split(r"\band\b|\bthen\b|[,;.]", " ".join(normalize(text)))
        sig: set[tuple[str, str]] = set()
        ctx = None
        for c in clauses:
            if not c.strip():
                continue
            ps = self._parser.parse(c, context_obj=ctx)
            if ps.verb and ps.reason is None:
                obj = ps.roles.get("obj")
                if obj:
                    sig.add((ps.verb, obj))
                    ctx = obj
                if ps.verb == "put" and ps.roles.get("dest"):
                    sig.add(("put->", ps.roles["dest"]))
        return sig

    def _family_signature(self, fam: Family, params: dict[str, Any]) -> set[tuple[str, str]]:
        return self._signature(fam.build(params)[0])

    def match_goal(self, text: str, split: str = "train") -> Task | None:
        """Map a free-text goal (e.g. from an LLM curriculum) to a known family, or None.

        A phase-3 family matches when the goal names its dish ("omelette", "salad", "tea");
        otherwise the goal's clauses are parsed as actions and must name exactly the actions
        of one family variation (e.g. "Switch on the burner" -> turn_on_stove). The returned
        task keeps the proposed goal text, with variation params derived from the text.
        """
        if not isinstance(text, str) or not text.strip():
            return None
        toks = set(normalize(text))
        rng = random.Random(f"{self.seed}:match:{' '.join(normalize(text))}")
        hits = [f for f in FAMILIES.values() if f.keywords and toks & set(f.keywords)]
        candidates: list[tuple[Family, dict[str, Any]]] = []
        if len(hits) == 1:
            candidates = [(hits[0], {})]
        elif not hits:
            sig = self._signature(text)
            if not sig:
                return None
            for fam in FAMILIES.values():
                if fam.keywords:
                    continue
                keys = sorted(k for k in fam.choices if k != "item_loc")
                combos: list[dict[str, Any]] = [{}]
                for k in keys:
                    combos = [dict(c, **{k: v}) for c in combos for v in fam.choices[k]]
                for combo in combos:
                    full = _normalize_params(fam, dict(combo, item_loc="counter") if "item_loc" in fam.choices else combo)
                    if self._family_signature(fam, full) == sig:
                        candidates.append((fam, combo))
        if len(candidates) != 1:
            return None
        fam, fixed = candidates[0]
        for _ in range(1000):
            params = self._random_params(fam, rng, fixed)
            if split_of(fam.name, params) == split:
                return build_task(fam.name, params, goal=text.strip()[:2000], source="llm")
        return None
