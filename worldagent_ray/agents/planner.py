"""Planning by imagination: search over plans in the world model, judged by the frozen Critic.

Pure core (no Ray). The planner draws candidate plans from the policy (the Action agent over an
engine), *imagines* each one with the world model (renders it to a video and, where the world
can, its ground truth), scores the imagined rollout with the frozen Critic, and returns the best
plan with its predicted video, its verdict and a trace of the search. Its three collaborators are
small protocols (:class:`PlanProposer`, :class:`Imagination`, :class:`Judge`), so the same search
runs in-process (the benchmark) and behind Serve handles (``runtime/planner_deployment.py``).

The budget unit is the **world-model call** (one plan rendered). With ``N`` candidates per round
and ``K`` rounds:

- ``single``: one policy sample, imagined once (the baseline);
- ``best_of_n``: ``N*K`` policy samples in one round, the best by the critic;
- ``cem``: ``K`` rounds of ``N``: the cross-entropy method, described below.

A plan that was already imagined is never imagined again (its verdict is reused, ``cached=True``),
so ``best_of_n`` and ``cem`` both spend *at most* ``N*K`` world calls; the trace counts exactly
what each spent.

The CEM sampling distribution for an LLM policy
-----------------------------------------------
An LLM policy has no parameters the search can refit cheaply, so the CE distribution lives next
to it. A plan is an ordered sequence of action strings; as in the CE method for ordered
combinatorial problems (Rubinstein's CE for the travelling salesman refits a *transition matrix*
to the elite tours), the distribution is a first-order Markov chain over actions,
``P(a_{t+1} | a_t)`` with ``START`` and ``STOP`` states, plus a position-free unigram used as the
back-off for a state no fitted plan visited (as an n-gram model backs off). A chain captures the
dependencies that matter in a kitchen ("open the fridge" -> "pick up the egg") without tying an
action to a position, which a per-step categorical would do.

- Round 0 draws ``N`` plans from the policy and fits ``P_0`` to all of them: an estimate of the
  policy's own distribution (the CE "initial parameter").
- Each later round ``k`` refits to the elites and smooths: ``P_k = s * P_elite + (1 - s) * P_{k-1}``.
  The elites are the best ``ceil(elite_fraction * N)`` plans imagined *so far*, successes first,
  then by critic reward (CE with elitism): since a plan is never imagined twice, a round holds
  only new plans, and refitting to that round alone would let the chain drift away from the best
  plans it already found.
- Draws mix in an exploration floor: ``(1 - eps) * P_k(.|a) + eps * Uniform(actions + STOP)``,
  where the actions are the world's admissible vocabulary (or, for a free-text world, every
  action seen so far), so no admissible action ever gets probability 0; and each fitted row is
  interpolated with the unigram, ``(1 - b) * P(.|a) + b * P(.)`` (Jelinek-Mercer smoothing,
  ``backoff``), so actions of different elites recombine ("wash the lettuce" from one elite,
  then "slice the lettuce" from another).
- ``policy_fraction`` of each refit round comes from the policy itself, prompted with the best
  imagined plans so far as in-context exemplars (the policy's distribution conditioned on the
  elites); the rest comes from the chain, redrawn up to ``MAX_DRAWS`` times per slot to find a
  plan not yet imagined.

The search stops early at the first success (``stop_on_success``), when the time budget is
spent before a round starts, or when a round finds no new plan at all (converged).
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from ..config import ActionConfig, PlannerConfig
from ..schemas import (
    ActionRequest,
    MemoryHit,
    Plan,
    PlanCandidate,
    PlanResult,
    Rollout,
    SearchIteration,
    Task,
    Verdict,
)

START = "<start>"
STOP = "<stop>"
MAX_DRAWS = 20
"""Chain draws per slot while looking for a plan not yet imagined."""
MAX_POLICY_BATCH = 64
"""Most samples one policy call asks for (``ActionConfig.group_size`` allows 64)."""


# --------------------------------------------------------------------------- protocols


class PlanProposer(Protocol):
    def propose(self, task: Task, n: int, exemplars: Sequence[MemoryHit], vocabulary: list[str] | None,
                seed: int) -> list[Plan | None]:
        """``n`` plans for ``task`` (``None`` for a sample that was not a plan)."""
        ...


class Imagination(Protocol):
    def imagine(self, task: Task, plans: Sequence[Plan], seeds: Sequence[int]) -> list[Rollout]:
        """One rollout per plan (world errors are recorded in ``Rollout.error``)."""
        ...


class Judge(Protocol):
    def judge(self, items: Sequence[tuple[Task, Plan, Rollout]]) -> list[Verdict]:
        """One verdict per ``(task, plan, rollout)``."""
        ...


# --------------------------------------------------------------------------- adapters over the pure cores


class ActionProposer:
    """Plans from the Action agent over an engine; exemplars go into its prompt as memory hits."""

    def __init__(self, cfg: ActionConfig, engine, attach_image: bool | None = None):
        self.cfg = cfg
        self.engine = engine
        self.attach_image = attach_image

    def propose(self, task: Task, n: int, exemplars: Sequence[MemoryHit], vocabulary: list[str] | None,
                seed: int) -> list[Plan | None]:
        from .action import ActionAgent

        out: list[Plan | None] = []
        chunk = 0
        while len(out) < n:
            g = min(MAX_POLICY_BATCH, n - len(out))
            cfg = self.cfg.model_copy(update={
                "group_size": g, "use_memory": bool(exemplars),
                "memory_top_k": min(32, max(self.cfg.memory_top_k, len(exemplars))),
            })
            agent = ActionAgent(cfg, self.engine, self.attach_image)
            req = ActionRequest(task=task, memory=list(exemplars), vocabulary=vocabulary, seed=seed + chunk)
            [samples] = agent.act([req])
            out.extend(s.plan for s in samples[:g])
            if len(samples) < g:  # an engine that returned fewer samples: count the missing as invalid
                out.extend([None] * (g - len(samples)))
            chunk += 1
        return out


class WorldImagination:
    """Imagines with an in-process :class:`~worldagent_ray.world.base.WorldModel`."""

    def __init__(self, world, out_dir: str):
        self.world = world
        self.out_dir = out_dir

    def imagine(self, task: Task, plans: Sequence[Plan], seeds: Sequence[int]) -> list[Rollout]:
        return self.world.render(task, list(plans), self.out_dir, task.reference_image, list(seeds))


class CriticJudge:
    """Judges with an in-process :class:`~worldagent_ray.critic.Critic`."""

    def __init__(self, critic):
        self.critic = critic

    def judge(self, items: Sequence[tuple[Task, Plan, Rollout]]) -> list[Verdict]:
        return self.critic.score_batch(list(items))


# --------------------------------------------------------------------------- the CE distribution


def _normalise(counts: dict[str, float]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: v / total for k, v in sorted(counts.items())} if total > 0 else {}


@dataclass
class MarkovPlanModel:
    """A first-order Markov chain over action strings with ``START``/``STOP`` (see module doc).

    ``rows[state]`` is ``P(next | state)``; ``unigram`` is the back-off for unvisited states.
    ``explore`` and ``support`` (the actions the floor spreads over) apply when drawing only, so
    fitting and smoothing act on the unfloored chain.
    """

    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    unigram: dict[str, float] = field(default_factory=dict)
    max_steps: int = 8
    explore: float = 0.0
    support: tuple[str, ...] = ()
    backoff: float = 0.0

    @classmethod
    def fit(cls, plans: Sequence[Sequence[str]], max_steps: int) -> "MarkovPlanModel":
        """Maximum-likelihood chain of ``plans`` (each cut to ``max_steps``)."""
        rows: dict[str, dict[str, float]] = {}
        uni: dict[str, float] = {}
        for plan in plans:
            prev = START
            for a in list(plan)[:max_steps]:
                rows.setdefault(prev, {})[a] = rows.get(prev, {}).get(a, 0.0) + 1.0
                uni[a] = uni.get(a, 0.0) + 1.0
                prev = a
            rows.setdefault(prev, {})[STOP] = rows.get(prev, {}).get(STOP, 0.0) + 1.0
            uni[STOP] = uni.get(STOP, 0.0) + 1.0
        return cls({s: _normalise(r) for s, r in sorted(rows.items())}, _normalise(uni), max_steps)

    def row(self, state: str) -> dict[str, float]:
        """``P(. | state)``, backing off to the unigram for a state with no row."""
        return self.rows.get(state) or self.unigram

    def mix(self, other: "MarkovPlanModel", weight: float) -> "MarkovPlanModel":
        """``weight * self + (1 - weight) * other``, row by row (each side backing off as needed)."""
        def blend(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
            if not a:
                return dict(b)
            if not b:
                return dict(a)
            keys = sorted(set(a) | set(b))
            return {k: weight * a.get(k, 0.0) + (1.0 - weight) * b.get(k, 0.0) for k in keys}

        states = sorted(set(self.rows) | set(other.rows))
        rows = {s: blend(self.row(s), other.row(s)) for s in states}
        return MarkovPlanModel(rows, blend(self.unigram, other.unigram), self.max_steps, self.explore, self.support,
                               self.backoff)

    def with_exploration(self, explore: float, support: Sequence[str], backoff: float = 0.0) -> "MarkovPlanModel":
        """The same chain, drawn with an ``explore`` floor over ``support`` and ``backoff`` weight on the unigram."""
        return MarkovPlanModel(self.rows, self.unigram, self.max_steps, explore, tuple(sorted(set(support))), backoff)

    def draw_row(self, state: str) -> dict[str, float]:
        """``(1 - backoff) * P(.|state) + backoff * unigram`` (interpolated smoothing, before the floor)."""
        row = self.row(state)
        if self.backoff <= 0 or state not in self.rows:
            return dict(row)
        keys = set(row) | set(self.unigram)
        return {k: (1 - self.backoff) * row.get(k, 0.0) + self.backoff * self.unigram.get(k, 0.0) for k in keys}

    def _draw_dist(self, state: str, first: bool) -> list[tuple[str, float]]:
        base = self.draw_row(state)
        support = list(self.support) + [STOP]
        eps = self.explore if base else 1.0  # nothing fitted yet: uniform over the support
        probs: dict[str, float] = {k: (1.0 - eps) * p for k, p in base.items()}
        if support and eps > 0:
            for k in support:
                probs[k] = probs.get(k, 0.0) + eps / len(support)
        if first:  # a plan has at least one step
            probs.pop(STOP, None)
        return [(k, p) for k, p in sorted(probs.items()) if p > 0]

    def sample(self, rng: random.Random) -> list[str]:
        """One plan: walk from START until STOP or ``max_steps`` actions ([] if nothing to draw)."""
        out: list[str] = []
        state = START
        while len(out) < self.max_steps:
            dist = self._draw_dist(state, first=not out)
            if not dist:
                break
            r = rng.random() * sum(p for _, p in dist)
            nxt = dist[-1][0]
            for k, p in dist:
                r -= p
                if r <= 0:
                    nxt = k
                    break
            if nxt == STOP:
                break
            out.append(nxt)
            state = nxt
        return out

    def entropy(self) -> float:
        """Mean entropy (nats) of the fitted rows (0 for an empty chain)."""
        if not self.rows:
            return 0.0
        ent = [-sum(p * math.log(p) for p in r.values() if p > 0) for r in self.rows.values()]
        return sum(ent) / len(ent)


# --------------------------------------------------------------------------- search


@dataclass
class Budget:
    method: str
    num_candidates: int
    iterations: int
    time_budget_s: float


def resolve_budget(cfg: PlannerConfig, method: str | None = None, num_candidates: int | None = None,
                   iterations: int | None = None) -> Budget:
    """The request's budget: the config's, optionally lowered (never raised) by the request.

    Raises:
        ValueError: a requested budget above the configured one, naming the field and the limit.
    """
    for name, asked, limit in (("num_candidates", num_candidates, cfg.num_candidates),
                               ("iterations", iterations, cfg.iterations)):
        if asked is not None and not 1 <= asked <= limit:
            raise ValueError(f"{name}={asked} is outside 1..{limit} (planner.{name} is the most a request may ask)")
    m = method or cfg.method
    if m not in ("single", "best_of_n", "cem"):
        raise ValueError(f"method must be 'single', 'best_of_n' or 'cem', got {m!r}")
    return Budget(m, num_candidates or cfg.num_candidates, iterations or cfg.iterations, cfg.time_budget_s)


def derive_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:4], "big") & 0x7FFFFFFF


def _key(actions: Sequence[str]) -> tuple[str, ...]:
    return tuple(a.strip() for a in actions)


def _rank(c: PlanCandidate) -> tuple[int, float]:
    return (int(c.success), c.reward)


@dataclass
class _State:
    seen: dict[tuple[str, ...], PlanCandidate] = field(default_factory=dict)
    outcomes: dict[tuple[str, ...], tuple[Rollout, Verdict | None]] = field(default_factory=dict)
    best: PlanCandidate | None = None
    world_calls: int = 0
    policy_samples: int = 0


class Planner:
    """Searches in imagination (see the module doc for the three methods and the CEM distribution).

    Args:
        cfg (`PlannerConfig`): budgets (N, K, time), CEM parameters, default method and seed.
        proposer, imagination, judge: the policy, the world model and the frozen critic.
        max_steps (`int`): longest plan the chain draws (``agents.action.max_steps``).
        clock: seconds, monotonic (a test may pass a fake to exercise the time budget).
    """

    def __init__(self, cfg: PlannerConfig, proposer: PlanProposer, imagination: Imagination, judge: Judge,
                 max_steps: int = 8, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.proposer = proposer
        self.imagination = imagination
        self.judge = judge
        self.max_steps = max_steps
        self.clock = clock

    def plan(self, task: Task, vocabulary: list[str] | None = None, *, method: str | None = None,
             num_candidates: int | None = None, iterations: int | None = None,
             seed: int | None = None) -> PlanResult:
        """Search for the best plan for ``task`` within the budget; see :class:`PlanResult`."""
        budget = resolve_budget(self.cfg, method, num_candidates, iterations)
        seed = self.cfg.seed if seed is None else seed
        t0 = self.clock()
        st = _State()
        trace: list[SearchIteration] = []
        n = budget.num_candidates
        first_n = 1 if budget.method == "single" else (n * budget.iterations if budget.method == "best_of_n" else n)
        plans, invalid = self._from_policy(task, first_n, [], vocabulary, derive_seed(seed, "policy", 0), st)
        cands = self._evaluate(task, [(p, "policy") for p in plans], 0, seed, st)
        trace.append(self._record(0, cands, st, invalid, first_n, None, None, t0))
        stopped = "budget"
        if budget.method == "cem":
            stopped = self._cem(task, vocabulary, budget, seed, st, trace, cands, t0)
        if st.best is None:
            stopped = "no_plan"
        rollout, verdict = st.outcomes.get(_key(st.best.plan.actions), (None, None)) if st.best else (None, None)
        return PlanResult(task=task, method=budget.method, best=st.best, rollout=rollout, verdict=verdict,
                          trace=trace, world_calls=st.world_calls, policy_samples=st.policy_samples,
                          elapsed_s=max(0.0, self.clock() - t0), stopped=stopped)

    # ------------------------------------------------------------------ CEM

    def _cem(self, task: Task, vocabulary: list[str] | None, budget: Budget, seed: int, st: _State,
             trace: list[SearchIteration], population: list[PlanCandidate], t0: float) -> str:
        cfg, n = self.cfg, budget.num_candidates
        model = MarkovPlanModel.fit([c.plan.actions for c in population if c.error is None], self.max_steps)
        for k in range(1, budget.iterations):
            if cfg.stop_on_success and st.best is not None and st.best.success:
                return "success"
            if self.clock() - t0 >= budget.time_budget_s:
                return "time"
            elites = self._elites(list(st.seen.values()), n)
            if elites:
                model = MarkovPlanModel.fit([c.plan.actions for c in elites], self.max_steps).mix(model, cfg.smoothing)
            support = vocabulary if vocabulary else sorted({a for key in st.seen for a in key})
            drawer = model.with_exploration(cfg.exploration, support, cfg.backoff)
            n_policy = round(cfg.policy_fraction * n)
            plans: list[tuple[Plan, str]] = []
            invalid = 0
            if n_policy:
                exemplars = self._exemplars(task, st)
                got, invalid = self._from_policy(task, n_policy, exemplars, vocabulary,
                                                 derive_seed(seed, "policy", k), st)
                plans += [(p, "policy") for p in got]
            plans += [(p, "cem") for p in self._from_chain(drawer, n - n_policy, plans, st,
                                                            random.Random(derive_seed(seed, "chain", k)))]
            population = self._evaluate(task, plans, k, seed, st)
            threshold = min((c.reward for c in elites), default=None)
            trace.append(self._record(k, population, st, invalid, n_policy, threshold, drawer.entropy(), t0))
            if population and all(c.cached for c in population):
                return "converged"
        if cfg.stop_on_success and st.best is not None and st.best.success:
            return "success"
        return "budget"

    def _elites(self, population: Sequence[PlanCandidate], n: int) -> list[PlanCandidate]:
        valid = [c for c in population if c.error is None]
        if not valid:
            return []
        k = max(1, math.ceil(self.cfg.elite_fraction * n))
        return sorted(valid, key=_rank, reverse=True)[:k]

    def _exemplars(self, task: Task, st: _State) -> list[MemoryHit]:
        ranked = sorted((c for c in st.seen.values() if c.error is None), key=_rank, reverse=True)
        return [
            MemoryHit(episode_id=f"imagined-{i}", goal=task.goal, phase=task.phase, plan=c.plan.actions,
                      success=c.success, reward=c.reward, score=c.reward,
                      feedback="imagined; " + ", ".join(f"{k}={v:.2f}" for k, v in (c.scores.as_dict() if c.scores else {}).items()))
            for i, c in enumerate(ranked[: self.cfg.exemplars])
        ]

    def _from_chain(self, drawer: MarkovPlanModel, m: int, taken: Sequence[tuple[Plan, str]], st: _State,
                    rng: random.Random) -> list[Plan]:
        """``m`` plans from the chain, new ones where ``MAX_DRAWS`` tries per slot find them."""
        out: list[Plan] = []
        used = {_key(p.actions) for p, _ in taken}
        for _ in range(m):
            fallback = None
            for _ in range(MAX_DRAWS):
                actions = drawer.sample(rng)
                if not actions:
                    continue
                key = _key(actions)
                fallback = fallback or actions
                if key not in st.seen and key not in used:
                    break
            else:
                actions = fallback
            if actions:
                used.add(_key(actions))
                out.append(Plan.from_actions(actions))
        return out

    # ------------------------------------------------------------------ shared

    def _from_policy(self, task: Task, n: int, exemplars: list[MemoryHit], vocabulary: list[str] | None,
                     seed: int, st: _State) -> tuple[list[Plan], int]:
        plans = self.proposer.propose(task, n, exemplars, vocabulary, seed)
        st.policy_samples += len(plans)
        valid = [p for p in plans if isinstance(p, Plan) and p.steps and len(p.steps) <= self.max_steps]
        return valid, len(plans) - len(valid)

    def _evaluate(self, task: Task, plans: Sequence[tuple[Plan, str]], iteration: int, seed: int,
                  st: _State) -> list[PlanCandidate]:
        """Imagine and judge the plans not seen before (one world call each); reuse the rest."""
        fresh: list[tuple[int, Plan, str]] = []
        out: list[PlanCandidate | None] = [None] * len(plans)
        pending: set[tuple[str, ...]] = set()
        for i, (plan, source) in enumerate(plans):
            key = _key(plan.actions)
            if key in st.seen:
                out[i] = st.seen[key].model_copy(update={"source": source, "iteration": iteration, "cached": True})
            elif key in pending:  # the same plan twice in one round: imagine it once
                fresh.append((i, plan, source))
            else:
                pending.add(key)
                fresh.append((i, plan, source))
        firsts: dict[tuple[str, ...], tuple[int, Plan, str]] = {}
        for item in fresh:
            firsts.setdefault(_key(item[1].actions), item)
        todo = list(firsts.values())
        if todo:
            seeds = [derive_seed(seed, "world", *_key(p.actions)) for _, p, _ in todo]
            st.world_calls += len(todo)
            rollouts, verdicts = self._imagine_and_judge(task, [p for _, p, _ in todo], seeds)
            for (i, plan, source), r, v in zip(todo, rollouts, verdicts):
                cand = PlanCandidate(
                    plan=plan, source=source, iteration=iteration,  # type: ignore[arg-type]
                    reward=v.reward if v else 0.0, success=bool(v and v.success and not r.error),
                    scores=v.scores if v else None, video_uri=r.video_uri,
                    error=r.error or (None if v else "the critic returned no verdict"),
                )
                key = _key(plan.actions)
                st.seen[key] = cand
                st.outcomes[key] = (r, v)
                out[i] = cand
                if cand.error is None and (st.best is None or _rank(cand) > _rank(st.best)):
                    st.best = cand
        for i, (plan, source) in enumerate(plans):  # repeats within this round
            if out[i] is None:
                out[i] = st.seen[_key(plan.actions)].model_copy(update={"source": source, "cached": True})
        return [c for c in out if c is not None]

    def _imagine_and_judge(self, task: Task, plans: list[Plan], seeds: list[int]
                           ) -> tuple[list[Rollout], list[Verdict | None]]:
        """Never raises: a failed world or critic call fails its candidates, with the reason."""
        try:
            rollouts = list(self.imagination.imagine(task, plans, seeds))
            if len(rollouts) != len(plans):
                raise RuntimeError(f"the world returned {len(rollouts)} rollouts for {len(plans)} plans")
        except Exception as e:
            msg = f"imagination failed: {type(e).__name__}: {e}"[:2000]
            return [Rollout(task_id=task.id, plan_index=i, error=msg) for i in range(len(plans))], [None] * len(plans)
        try:
            verdicts: list[Verdict | None] = list(self.judge.judge([(task, p, r) for p, r in zip(plans, rollouts)]))
            if len(verdicts) != len(plans):
                raise RuntimeError(f"the critic returned {len(verdicts)} verdicts for {len(plans)} rollouts")
        except Exception as e:
            msg = f"critic failed: {type(e).__name__}: {e}"[:2000]
            return [r.model_copy(update={"error": r.error or msg}) for r in rollouts], [None] * len(plans)
        return rollouts, verdicts

    def _record(self, k: int, cands: list[PlanCandidate], st: _State, invalid: int, policy_n: int,
                threshold: float | None, entropy: float | None, t0: float) -> SearchIteration:
        return SearchIteration(
            iteration=k, candidates=cands, world_calls=sum(1 for c in cands if not c.cached),
            policy_samples=policy_n, invalid=invalid, elite_threshold=threshold, entropy=entropy,
            elapsed_s=max(0.0, self.clock() - t0),
        )
