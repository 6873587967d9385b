"""The Curriculum agent's pure core: phase promotion/demotion and task proposal.

The curriculum is stateless as a service: its :class:`~worldagent_ray.schemas.CurriculumState`
travels in and out of every call, and the driver persists it in the run folder, so a replica
restart or a resumed run loses nothing.

Proposal order:
1. if an LLM engine is configured, ask it for new goals from the history (recent goals,
   captions, rewards, success per phase), constrained to JSON;
2. validate each proposed goal against the world's task space where the world has one (the
   sandbox), or accept it as free text where it does not;
3. drop goals already mastered (memory says success rate >= ``mastered_threshold``);
4. top up from the world's task generator when the LLM's proposals are unusable, and record
   that it did (``state.fallbacks``).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Protocol, Sequence

from ..config import CurriculumConfig
from ..engines.base import EngineError, InferenceEngine
from ..schemas import (MAX_GOAL_CHARS, CurriculumState, JsonRejection, Outcome, Proposal, SamplingParams, Task,
                       load_json)

PHASE_NAMES = {1: "atomic", 2: "composite", 3: "multi-stage"}

# Free-text fallback goals for worlds without a task space (e.g. a video model), per phase.
FREE_TEXT_GOALS = {
    1: ["Turn on the stove", "Open the fridge", "Pick up the cup", "Put the apple in the bowl"],
    2: ["Crack an egg into the bowl and whisk it", "Slice the tomato and put it on the plate",
        "Fill the kettle and turn it on"],
    3: ["Cook an omelette and serve it on a plate", "Make a salad and serve it in a bowl",
        "Boil water and pour a cup of tea"],
}


class TaskSpace(Protocol):
    """What a world with a task space offers the curriculum (the sandbox implements it)."""

    def sample(self, phase: int, split: str = "train", index: int | None = None) -> Task: ...

    def match_goal(self, text: str) -> Task | None: ...


def update_phase(cfg: CurriculumConfig, state: CurriculumState, outcomes: Sequence[Outcome]) -> CurriculumState:
    """Record outcomes and apply the promotion rule.

    Rule: over the last ``cfg.window`` outcomes of the *current stay* in the current phase (only
    once there are that many), a success rate >= ``promote_threshold`` promotes to the next phase
    (up to ``max_phase``); a rate < ``demote_threshold`` demotes (down to 1). Each change is
    appended to ``state.promotions`` and the new phase starts with an empty stay. Outcomes of
    other phases (still in flight when the phase changed) go to the history only. The stay is
    kept to the last ``cfg.window`` outcomes, so the rule never reads a stale window.
    """
    st = state.model_copy(deep=True)
    for o in outcomes:
        st.history.setdefault(o.phase, []).append(bool(o.success))
        st.history[o.phase] = st.history[o.phase][-4 * cfg.window:]
        if o.phase == st.phase:
            st.stay = (st.stay + [bool(o.success)])[-cfg.window:]
        if len(st.stay) < cfg.window:
            continue
        rate = sum(st.stay) / cfg.window
        new = st.phase
        if rate >= cfg.promote_threshold and st.phase < cfg.max_phase:
            new = st.phase + 1
        elif rate < cfg.demote_threshold and st.phase > 1:
            new = st.phase - 1
        if new != st.phase:
            st.promotions.append({
                "from": st.phase, "to": new, "success_rate": round(rate, 4),
                "window": cfg.window, "at": {p: len(h) for p, h in st.history.items()},
            })
            st.phase = new
            st.stay = []
    return st


def _stable_index(*parts: Any) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12], 16)


def build_proposal_messages(state: CurriculumState, recent: Sequence[Outcome], n: int) -> list[dict[str, str]]:
    lines = []
    for o in list(recent)[-8:]:
        mark = "success" if o.success else "failure"
        lines.append(f"- phase {o.phase}: {o.goal} -> {mark}, reward {o.reward:.2f}; {o.caption[:100]}")
    rates = []
    for p, hist in sorted(state.history.items()):
        if hist:
            rates.append(f"phase {p} ({PHASE_NAMES.get(int(p), p)}): {sum(hist)}/{len(hist)} succeeded")
    user = (
        f"You design practice tasks for a kitchen robot. Current phase: {state.phase} "
        f"({PHASE_NAMES[state.phase]}).\n"
        + ("Success so far: " + "; ".join(rates) + "\n" if rates else "")
        + ("Recent attempts:\n" + "\n".join(lines) + "\n" if lines else "")
        + f"Propose {n} new {PHASE_NAMES[state.phase]} kitchen goals, each one short imperative sentence. "
        'Answer as JSON: {"goals": ["...", "..."]}'
    )
    return [{"role": "system", "content": "You are a curriculum designer."}, {"role": "user", "content": user}]


def parse_goals(text: str, n: int) -> tuple[list[str], str | None]:
    """The goals of an LLM proposal, or ``([], reason)``. Total: never raises."""
    try:
        data = load_json(text)
    except JsonRejection as e:
        return [], f"unparseable proposal ({e.reason})"
    goals = data.get("goals") if isinstance(data, dict) else None
    if not isinstance(goals, list):
        return [], "proposal has no 'goals' list"
    out = [g.strip()[:MAX_GOAL_CHARS] for g in goals[: 4 * n] if isinstance(g, str) and g.strip()]
    return out, None if out else "proposal has no usable goal"


def goals_schema(n: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "goals": {
                "type": "array", "minItems": 1, "maxItems": n,
                "items": {"type": "string", "minLength": 3, "maxLength": 160},
            }
        },
        "required": ["goals"],
        "additionalProperties": False,
    }


class CurriculumAgent:
    """Proposes the next tasks. ``engine`` may be None (rule + generator only)."""

    def __init__(self, cfg: CurriculumConfig, task_space: TaskSpace | None, engine: InferenceEngine | None):
        self.cfg = cfg
        self.task_space = task_space
        self.engine = engine if cfg.use_llm else None

    def initial_state(self) -> CurriculumState:
        return CurriculumState(phase=self.cfg.start_phase)

    def _llm_goals(self, state: CurriculumState, recent: Sequence[Outcome], n: int, seed: int) -> tuple[list[str], str | None]:
        assert self.engine is not None
        try:
            [comps] = self.engine.generate(
                [build_proposal_messages(state, recent, n)],
                SamplingParams(temperature=0.9, max_tokens=48 * n + 16, n=1, seed=seed),
                json_schema=goals_schema(n),
            )
        except EngineError as e:
            return [], f"engine error: {e}"
        c = comps[0]
        if c.finish_reason == "error":
            return [], "no valid JSON after retries"
        return parse_goals(c.text, n)

    def propose(
        self,
        state: CurriculumState,
        recent: Sequence[Outcome] = (),
        mastered: set[str] | frozenset[str] = frozenset(),
        n: int | None = None,
        round_index: int = 0,
    ) -> Proposal:
        n = n or self.cfg.tasks_per_proposal
        st = state.model_copy(deep=True)
        seed = _stable_index(self.cfg.seed, round_index)
        tasks: list[Task] = []
        sources: list[str] = []
        notes: list[str] = []
        mastered_l = {m.lower() for m in mastered}

        if self.engine is not None:
            goals, err = self._llm_goals(st, recent, n, seed)
            if err:
                notes.append(f"llm proposal unusable: {err}")
            for g in goals:
                if len(tasks) >= n:
                    break
                task = self._validate_goal(g, st.phase, round_index, len(tasks))
                if task is None:
                    notes.append(f"rejected llm goal {g[:60]!r}: not in the world's task space for phase {st.phase}")
                    continue
                if task.goal.lower() in mastered_l:
                    notes.append(f"skipped mastered goal {task.goal!r}")
                    continue
                tasks.append(task)
                sources.append("llm")

        missing = n - len(tasks)
        if missing > 0:
            if self.engine is not None:
                st.fallbacks += 1
            rng = random.Random(seed)
            tries = 0
            while len(tasks) < n and tries < 50 * n:
                tries += 1
                task = self._generate(st.phase, rng.randrange(1 << 30), round_index, len(tasks))
                if task.goal.lower() in mastered_l and tries < 10 * n:
                    continue  # prefer unmastered goals, but never stall
                tasks.append(task)
                sources.append("generator" if self.task_space is not None else "free_text")
        st.proposed += len(tasks)
        return Proposal(tasks=tasks, state=st, sources=sources, notes=notes)

    def _validate_goal(self, goal: str, phase: int, round_index: int, slot: int) -> Task | None:
        if self.task_space is None:
            tid = f"free-{_stable_index(goal) % 10**10:010d}"
            try:
                return Task(id=tid, goal=goal[:300], phase=phase, source="llm")
            except ValueError:  # pydantic ValidationError: e.g. a goal of only whitespace
                return None
        task = self.task_space.match_goal(goal)
        if task is None or task.phase != phase:
            return None
        return task.model_copy(update={"source": "llm"})

    def _generate(self, phase: int, index: int, round_index: int, slot: int) -> Task:
        if self.task_space is not None:
            return self.task_space.sample(phase, "train", index)
        goals = FREE_TEXT_GOALS[phase]
        goal = goals[index % len(goals)]
        return Task(id=f"free-{_stable_index(goal) % 10**10:010d}", goal=goal, phase=phase, source="generator")
