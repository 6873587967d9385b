"""Task families of the sandbox kitchen, for the three curriculum phases of seed 000.

A family turns variation parameters into a :class:`~worldagent_ray.schemas.Task` whose
``world_spec`` holds everything the world needs: the family, its params, the placement of
every portable object, the goal predicates (conditions of the rules file) and a reference
plan with a *stage* per step (steps of a lower stage come first in the recipe; steps of one
stage may go in any order). The task id is a hash of family and params.

**The held-out split is compositional** (issue 11). A task's *composition* is its family with
the params that change the plan (item, where it starts, where it goes: the family's
``choices``); distractor objects and the layout change neither the goal text nor the reference
plan, so they play no part in the split. About :data:`HELDOUT_PERCENT` % of the compositions of
every multi-composition family are held out by a hash of their reference plan, the same ones on
every machine, so
e.g. "wash the lettuce from the fridge" is never trained on while washing other things from
the fridge and other uses of the lettuce are. Every goal template names all the plan-relevant
params, so no held-out goal text or reference plan occurs in the train split. A second
held-out set, :meth:`SandboxTaskGenerator.paraphrased_tasks`, gives the held-out compositions
goal texts written differently from the generator's templates (:data:`PARAPHRASES`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Any, Callable

from ...schemas import Plan, Task
from .parser import StepParser, normalize
from .rules import Rules, load_rules

HELDOUT_PERCENT = 25
LAYOUTS = 6
MAX_DISTRACTORS = 2
EGG = "egg"
WASHABLE = ("tomato", "lettuce", "potato", "carrot", "cucumber", "apple", "pepper", "mushroom")
SLICEABLE = WASHABLE + ("onion", "bread", "cheese")
FOOD = (EGG,) + SLICEABLE
TOOLS = ("cup", "knife", "bowl")  # non-food things a task may ask to pick up (always on the counter)
LOCS = ("counter", "fridge", "cupboard")
CLOSED = ("fridge", "cupboard")  # stores that must be opened before their contents can be reached
DESTS = ("plate", "bowl", "board", "tray")
# Distractors (and the free-text fallback scene of world.py) use the original counter set.
PORTABLES = ("bowl", "plate", "pan", "cup", "kettle", "egg", "tomato", "lettuce", "knife", "whisk", "teabag")
_CONTAINERS = ("bowl", "pan", "cup")

Build = Callable[[dict[str, Any]], tuple[str, dict[str, str], list[dict[str, Any]], list[tuple[str, int]]]]


@dataclass(frozen=True)
class Family:
    """One task family: ``build(params)`` gives (goal text, required objects and their
    start locations, goal predicates, reference steps [(action, stage)]). ``choices`` are the
    plan-relevant params (the first value of each is its default); a task's composition is
    the family with these params."""

    name: str
    phase: int
    choices: dict[str, tuple[Any, ...]]
    build: Build
    keywords: tuple[str, ...] = ()  # a goal mentioning one of these words is this family


def _prop(name: str, obj: str, prop: str, value: Any = True) -> dict[str, Any]:
    return {"name": name, "check": "prop", "args": [obj, prop, value]}


def _at(name: str, obj: str, loc: str) -> dict[str, Any]:
    return {"name": name, "check": "at", "args": [obj, loc]}


def _prep(dest: str) -> str:
    return "in" if dest in _CONTAINERS else "on"


def _open(*locs: str) -> list[tuple[str, int]]:
    """Open each closed store among ``locs`` first (stage 0), once each."""
    return [(f"open the {loc}", 0) for loc in dict.fromkeys(locs) if loc in CLOSED]


def _simple(goal: str, preds: list[dict[str, Any]], steps: list[tuple[str, int]], objs=None) -> Build:
    return lambda p: (goal, dict(objs or {}), preds, steps)


def _pick_up(p):
    it, loc = p["item"], p["item_loc"]
    return (f"Pick up the {it} from the {loc}", {it: loc},
            [{"name": f"holding_{it}", "check": "holding", "args": [it]}], _open(loc) + [(f"pick up the {it}", 1)])


def _put_on_plate(p):
    it, loc, d = p["item"], p["item_loc"], p["dest"]
    return (f"Put the {it} from the {loc} {_prep(d)} the {d}", {it: loc, d: "counter"},
            [_at(f"{it}_at_{d}", it, d)], _open(loc) + [(f"put the {it} {_prep(d)} the {d}", 1)])


def _treat(verb: str, done: str, tools: tuple[str, ...] = ()) -> Build:
    """``<Verb> the <item> from the <loc>`` (``wash``/``washed``, ``slice``/``sliced``), with
    ``tools`` on the counter."""

    def build(p):
        it, loc = p["item"], p["item_loc"]
        return (f"{verb.capitalize()} the {it} from the {loc}", {it: loc, **dict.fromkeys(tools, "counter")},
                [_prop(f"{it}_{done}", it, done)], _open(loc) + [(f"{verb} the {it}", 1)])

    return build


def _treat_and_place(verb: str, done: str, tools: tuple[str, ...] = ()) -> Build:
    """:func:`_treat`, then put the item in or on ``dest``."""

    def build(p):
        it, loc, d = p["item"], p["item_loc"], p["dest"]
        return (
            f"{verb.capitalize()} the {it} from the {loc} and put it {_prep(d)} the {d}",
            {it: loc, **dict.fromkeys(tools, "counter"), d: "counter"},
            [_prop(f"{it}_{done}", it, done), _at(f"{it}_at_{d}", it, d)],
            _open(loc) + [(f"{verb} the {it}", 1), (f"put the {it} {_prep(d)} the {d}", 2)],
        )

    return build


def _crack_and_whisk(p):
    loc, d = p["item_loc"], p["dest"]
    return (
        f"Crack the egg from the {loc} into the {d} and whisk it",
        {EGG: loc, d: "counter", "whisk": "counter"},
        [_prop("egg_cracked", EGG, "cracked"), _at(f"egg_in_{d}", EGG, d), _prop("egg_whisked", EGG, "whisked")],
        _open(loc) + [(f"crack the egg into the {d}", 1), ("whisk the egg", 2)],
    )


def _wash_and_slice(p):
    it, loc = p["item"], p["item_loc"]
    return (
        f"Wash and slice the {it} from the {loc}",
        {it: loc, "knife": "counter"},
        [_prop(f"{it}_washed", it, "washed"), _prop(f"{it}_sliced", it, "sliced")],
        _open(loc) + [(f"wash the {it}", 1), (f"slice the {it}", 2)],
    )


def _omelette(p):
    loc, d = p["item_loc"], p["dest"]
    return (
        f"Cook an omelette with the egg from the {loc} and serve it on the {d}",
        {EGG: loc, "bowl": "counter", "whisk": "counter", "pan": "counter", d: "counter"},
        [
            _prop("egg_cracked", EGG, "cracked"),
            _prop("egg_whisked", EGG, "whisked"),
            _prop("egg_cooked", EGG, "cooked"),
            _at(f"omelette_on_{d}", EGG, d),
        ],
        _open(loc)
        + [
            ("crack the egg into the bowl", 1),
            ("whisk the egg", 2),
            ("put the pan on the stove", 1),
            ("turn on the stove", 2),
            ("pour the egg into the pan", 3),
            ("cook the egg", 4),
            (f"put the egg on the {d}", 5),
        ],
    )


def _salad(p):
    a, al, b, bl = p["item"], p["item_loc"], p["item2"], p["item2_loc"]
    steps = []
    for x in (a, b):
        steps += [(f"wash the {x}", 1), (f"slice the {x}", 2), (f"put the {x} in the bowl", 3)]
    return (
        f"Make a salad of the {a} from the {al} and the {b} from the {bl}",
        {a: al, b: bl, "knife": "counter", "bowl": "counter"},
        [_prop(f"{x}_{s}", x, s) for x in (a, b) for s in ("washed", "sliced")]
        + [_at(f"{x}_in_bowl", x, "bowl") for x in (a, b)],
        _open(al, bl) + steps,
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


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("turn_on_stove", 1, {}, _simple("Turn on the stove", [_prop("stove_on", "stove", "on")],
                                               [("turn on the stove", 1)])),
        Family("open_fridge", 1, {}, _simple("Open the fridge", [_prop("fridge_open", "fridge", "open")],
                                             [("open the fridge", 1)])),
        Family("open_cupboard", 1, {}, _simple("Open the cupboard", [_prop("cupboard_open", "cupboard", "open")],
                                               [("open the cupboard", 1)])),
        Family("fill_kettle", 1, {}, _simple("Fill the kettle", [_prop("kettle_filled", "kettle", "filled")],
                                             [("fill the kettle", 1)], {"kettle": "counter"})),
        Family("pick_up", 1, {"item": FOOD + TOOLS, "item_loc": LOCS}, _pick_up),
        Family("put_on_plate", 1, {"item": FOOD + ("cup",), "item_loc": LOCS, "dest": DESTS}, _put_on_plate),
        Family("wash", 1, {"item": WASHABLE, "item_loc": LOCS}, _treat("wash", "washed")),
        Family("slice", 1, {"item": SLICEABLE, "item_loc": LOCS}, _treat("slice", "sliced", ("knife",))),
        Family("crack_and_whisk", 2, {"item_loc": LOCS, "dest": ("bowl", "pan")}, _crack_and_whisk),
        Family("slice_and_plate", 2, {"item": SLICEABLE, "item_loc": LOCS, "dest": DESTS},
               _treat_and_place("slice", "sliced", ("knife",))),
        Family("wash_and_slice", 2, {"item": WASHABLE, "item_loc": LOCS}, _wash_and_slice),
        Family("wash_and_place", 2, {"item": WASHABLE, "item_loc": LOCS, "dest": DESTS},
               _treat_and_place("wash", "washed")),
        Family("boil_water", 2, {}, _simple(
            "Boil water in the kettle", [_prop("kettle_filled", "kettle", "filled"),
                                         _prop("water_boiled", "kettle", "boiled")],
            [("fill the kettle", 1), ("put the kettle on the stove", 2), ("turn on the stove", 2),
             ("boil the kettle", 3)], {"kettle": "counter"})),
        Family("omelette", 3, {"item_loc": LOCS, "dest": ("plate", "tray")}, _omelette,
               keywords=("omelette", "omelet", "omelettes", "omelets")),
        Family("salad", 3, {"item": WASHABLE, "item_loc": LOCS, "item2": WASHABLE[1:] + WASHABLE[:1],
                            "item2_loc": LOCS}, _salad, keywords=("salad",)),
        Family("tea", 3, {}, _tea, keywords=("tea",)),
    ]
}

# Goal texts written differently from the templates above (same task): the paraphrased
# held-out set. {src}/{src2} is where the item starts, worded as "out of the refrigerator".
PARAPHRASES: dict[str, str] = {
    "pick_up": "Get hold of the {item} that is sitting {src}",
    "put_on_plate": "Take the {item} {src} and set it {prep} the {dest}",
    "wash": "Give the {item} {src} a good rinse",
    "slice": "Cut up the {item} that you find {src}",
    "crack_and_whisk": "Break the egg {src} into the {dest}, then beat it",
    "slice_and_plate": "Chop the {item} {src} and transfer the pieces {prep} the {dest}",
    "wash_and_slice": "Rinse the {item} {src}, then chop it",
    "wash_and_place": "Clean the {item} {src} and then move it {prep} the {dest}",
    "omelette": "Using the egg {src}, fry an omelet and plate it on the {dest}",
    "salad": "Prepare a salad with the {item} {src} and the {item2} {src2}",
}
_SRC = {"counter": "on the worktop", "fridge": "in the refrigerator", "cupboard": "in the cabinet"}


def _normalize_params(family: Family, params: dict[str, Any]) -> dict[str, Any]:
    p = dict(params)
    for k, allowed in family.choices.items():  # a missing plan param takes its default
        p.setdefault(k, allowed[0])
    if "item" in p and p["item"] not in FOOD:  # only food is stored in the fridge or cupboard
        p["item_loc"] = "counter"
    if "item2" in p and str(p["item2"]) < str(p["item"]):  # a salad of a and b is a salad of b and a
        p["item"], p["item2"], p["item_loc"], p["item2_loc"] = p["item2"], p["item"], p["item2_loc"], p["item_loc"]
    p["distractors"] = sorted(set(p.get("distractors", [])))
    p["layout"] = int(p.get("layout", 0))
    return {k: p[k] for k in sorted(p)}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def composition_of(family: str, params: dict[str, Any]) -> dict[str, Any]:
    """The plan-relevant part of a variation: ``{"family": ..., <choice>: value, ...}``."""
    fam = FAMILIES[family]
    p = _normalize_params(fam, params)
    return {"family": family, **{k: p[k] for k in sorted(fam.choices)}}


@functools.lru_cache(maxsize=None)
def compositions(family: str) -> tuple[tuple[tuple[str, Any], ...], ...]:
    """Every distinct composition of ``family`` (as sorted ``(param, value)`` tuples)."""
    fam = FAMILIES[family]
    combos: list[dict[str, Any]] = [{}]
    for k in sorted(fam.choices):
        combos = [dict(c, **{k: v}) for c in combos for v in fam.choices[k]]
    out: dict[str, tuple[tuple[str, Any], ...]] = {}
    for c in combos:
        if "item2" in c and c["item2"] == c["item"]:
            continue
        comp = composition_of(family, c)
        comp.pop("family")
        out.setdefault(_hash(comp), tuple(sorted(comp.items())))
    return tuple(sorted(out.values()))


def _plan_of(family: str, params: dict[str, Any]) -> list[str]:
    fam = FAMILIES[family]
    steps = fam.build(_normalize_params(fam, params))[3]
    return [a for a, _ in sorted(steps, key=lambda r: r[1])]


def split_of(family: str, params: dict[str, Any]) -> str:
    """'heldout' for about HELDOUT_PERCENT % of the compositions of a family, else 'train'.

    The hash is taken over the composition's reference plan (which names every plan-relevant
    param): compositions with the same plan (a salad whose two items sit in the same store,
    either way round) always share a split, so no held-out reference plan occurs in training.
    A family with one composition is always 'train'.
    """
    if len(compositions(family)) <= 1:
        return "train"
    return "heldout" if int(_hash(_plan_of(family, params))[:8], 16) % 100 < HELDOUT_PERCENT else "train"


def build_task(family_name: str, params: dict[str, Any], goal: str | None = None, source: str = "generator") -> Task:
    """The task of one family and variation (deterministic: same inputs, same task and id)."""
    if family_name not in FAMILIES:
        raise ValueError(f"unknown sandbox task family {family_name!r}; known: {sorted(FAMILIES)}")
    fam = FAMILIES[family_name]
    params = _normalize_params(fam, params)
    for k, allowed in fam.choices.items():
        if params.get(k) not in allowed:
            raise ValueError(f"family {family_name}: param {k}={params.get(k)!r} not in {list(allowed)}")
    if "item2" in params and params["item2"] == params["item"]:
        raise ValueError(f"family {family_name}: param item2={params['item2']!r} must differ from item")
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
    key = _hash([family_name, params])
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


def paraphrase_goal(task: Task) -> str:
    """The task's goal worded as in :data:`PARAPHRASES` (not as the generator's template)."""
    spec = task.world_spec or {}
    fam = spec.get("family")
    if fam not in PARAPHRASES:
        raise ValueError(f"task {task.id!r}: family {fam!r} has no paraphrase (known: {sorted(PARAPHRASES)})")
    p = spec["params"]
    return PARAPHRASES[fam].format(
        item=p.get("item", EGG), item2=p.get("item2", ""), dest=p.get("dest", ""), prep=_prep(p.get("dest", "")),
        src=_SRC[p.get("item_loc", "counter")], src2=_SRC[p.get("item2_loc", "counter")],
    )


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
        if "item2" in params and params["item2"] == params["item"]:
            params["item2"] = rng.choice([x for x in fam.choices["item2"] if x != params["item"]])
        return self._decorate(fam, params, rng)

    def _decorate(self, fam: Family, params: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        """Add plan-irrelevant variation: distractor objects and a layout."""
        used = set(fam.build(_normalize_params(fam, params))[1])
        pool = [o for o in PORTABLES if o not in used]
        params = dict(params, distractors=rng.sample(pool, rng.randint(0, min(MAX_DISTRACTORS, len(pool)))))
        params["layout"] = rng.randrange(LAYOUTS)
        return _normalize_params(fam, params)

    def _check(self, phase: int, split: str) -> None:
        if phase not in (1, 2, 3):
            raise ValueError(f"phase must be 1, 2 or 3, got {phase!r}")
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")

    def sample(
        self,
        phase: int,
        split: str = "train",
        index: int | None = None,
        rng: random.Random | None = None,
        family: str | None = None,
    ) -> Task:
        """One task of ``phase`` in ``split``: from ``rng`` if given, else from (seed, index)."""
        self._check(phase, split)
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
        raise ValueError(f"no {split} composition found for phase {phase}, family {family!r}")

    def split_tasks(self, phase: int, split: str) -> list[Task]:
        """One task per composition of ``phase`` in ``split`` (all of them, in a fixed order;
        distractors and layout drawn from the seed)."""
        self._check(phase, split)
        out = []
        for name in self.families(phase):
            for comp in compositions(name):
                params = dict(comp)
                if split_of(name, params) != split:
                    continue
                rng = random.Random(f"{self.seed}:{name}:{_hash(params)}")
                out.append(build_task(name, self._decorate(FAMILIES[name], params, rng)))
        return out

    def heldout_tasks(self, phase: int, n: int) -> list[Task]:
        """``n`` held-out tasks of ``phase``, each a distinct composition (fewer when the phase
        has fewer held-out compositions); deterministic for the seed."""
        tasks = self.split_tasks(phase, "heldout")
        random.Random(f"{self.seed}:heldout:{phase}").shuffle(tasks)
        return tasks[: max(0, int(n))]

    def paraphrased_tasks(self, phase: int, n: int) -> list[Task]:
        """The same tasks as :meth:`heldout_tasks` with their goals paraphrased (see :data:`PARAPHRASES`)."""
        return [t.model_copy(update={"goal": paraphrase_goal(t)}) for t in self.heldout_tasks(phase, n)]

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
                if ps.roles.get("dest") and ps.verb in ("put", "crack"):
                    sig.add((f"{ps.verb}->", ps.roles["dest"]))
        return sig

    @functools.lru_cache(maxsize=4096)
    def _family_signature(self, name: str, combo: tuple[tuple[str, Any], ...]) -> frozenset[tuple[str, str]]:
        fam = FAMILIES[name]
        return frozenset(self._signature(fam.build(_normalize_params(fam, dict(combo)))[0]))

    def _mentioned_locs(self, text: str) -> list[str]:
        """Stores named in ``text`` after "from" / "in" / "out of" (in order)."""
        toks = normalize(text)
        out = []
        for i, tok in enumerate(toks):
            for loc in LOCS:
                names = {loc, *(s for s in self.rules.objects[loc].synonyms if " " not in s)}
                if tok in names and i > 0 and toks[i - 1] in ("the", "from", "of", "in") and \
                        {"from", "of", "in"} & set(toks[max(0, i - 3):i]):
                    out.append(loc)
        return out

    def match_goal(self, text: str, split: str = "train") -> Task | None:
        """Map a free-text goal (e.g. from an LLM curriculum) to a task of ``split``, or None.

        A phase-3 family matches when the goal names its dish ("omelette", "salad", "tea");
        otherwise the goal's clauses are parsed as actions and must name exactly the actions
        of one family composition (e.g. "Switch on the burner" -> turn_on_stove). A store
        named after "from"/"in" fixes where the item starts. The returned task keeps the
        proposed goal text. A goal whose composition is held out maps to nothing for
        ``split="train"``: the curriculum never trains on a held-out composition.
        """
        if not isinstance(text, str) or not text.strip():
            return None
        toks = set(normalize(text))
        rng = random.Random(f"{self.seed}:match:{' '.join(normalize(text))}")
        hits = [f for f in FAMILIES.values() if f.keywords and toks & set(f.keywords)]
        candidates: list[tuple[Family, dict[str, Any]]] = []
        if len(hits) == 1:
            named = [x for x in WASHABLE if x in toks]
            fixed = {"item": named[0], "item2": named[1]} if hits[0].name == "salad" and len(named) == 2 else {}
            candidates = [(hits[0], fixed)]
        elif not hits:
            sig = self._signature(text)
            if not sig:
                return None
            for fam in FAMILIES.values():
                if fam.keywords:
                    continue
                seen: set[tuple[tuple[str, Any], ...]] = set()
                for comp in compositions(fam.name):
                    combo = tuple((k, v) for k, v in comp if k != "item_loc")
                    if combo not in seen:
                        seen.add(combo)
                        if self._family_signature(fam.name, comp) == sig:
                            candidates.append((fam, dict(combo)))
        if len(candidates) != 1:
            return None
        fam, fixed = candidates[0]
        locs = self._mentioned_locs(text)
        if "item_loc" in fam.choices and "item2" not in fam.choices and len(locs) == 1:
            fixed = dict(fixed, item_loc=locs[0])
        for _ in range(200):
            params = self._random_params(fam, rng, fixed)
            if split_of(fam.name, params) == split:
                return build_task(fam.name, params, goal=text.strip()[:2000], source="llm")
        return None
