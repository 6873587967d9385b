"""The planner's search (pure): the CE distribution, CEM refits, budgets, caching, failures, trace."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from worldagent_ray.agents.planner import (
    START,
    STOP,
    CriticJudge,
    MarkovPlanModel,
    Planner,
    WorldImagination,
    resolve_budget,
)
from worldagent_ray.config import CriticConfig, PlannerConfig, SandboxConfig
from worldagent_ray.schemas import Plan, Rollout, Scores, Task, Verdict

TARGET = ["open the fridge", "pick up the egg", "close the fridge"]
VOCAB = sorted(TARGET + ["turn on the stove", "wash the tomato", "pick up the cup", "put the cup on the table"])
TASK = Task(id="t-plan", goal="Take the egg out of the fridge", phase=2)


class FakePolicy:
    """A weak policy, seeded; records its calls. Plans of 1..``max_len`` actions drawn from ``actions``,
    or (``repertoire``) its few fixed plans in a seeded shuffled cycle, like an LLM that gets pieces right."""

    def __init__(self, actions=("turn on the stove", "pick up the cup", "wash the tomato", "open the fridge"),
                 fixed: list[str] | None = None, invalid_every: int = 0, max_len: int = 3,
                 repertoire: list[list[str]] | None = None):
        self.actions = list(actions)
        self.fixed = fixed
        self.invalid_every = invalid_every
        self.max_len = max_len
        self.repertoire = repertoire
        self.calls: list[dict] = []

    def propose(self, task, n, exemplars, vocabulary, seed):
        self.calls.append({"n": n, "exemplars": list(exemplars), "seed": seed})
        rng = random.Random(seed)
        out = []
        for i in range(n):
            if self.invalid_every and i % self.invalid_every == 0:
                out.append(None)
            elif self.fixed is not None:
                out.append(Plan.from_actions(self.fixed))
            elif self.repertoire is not None:
                if i % len(self.repertoire) == 0:
                    cycle = rng.sample(self.repertoire, len(self.repertoire))
                out.append(Plan.from_actions(cycle[i % len(self.repertoire)]))
            else:
                out.append(Plan.from_actions([rng.choice(self.actions) for _ in range(rng.randint(1, self.max_len))]))
        return out


def _reward(actions: list[str]) -> float:
    """Like goal predicates: the share of TARGET done in order (longest common subsequence), minus
    0.1 per extra step."""
    m, n = len(actions), len(TARGET)
    lcs = [[0] * (n + 1) for _ in range(m + 1)]
    for i in range(m):
        for j in range(n):
            lcs[i + 1][j + 1] = lcs[i][j] + 1 if actions[i] == TARGET[j] else max(lcs[i][j + 1], lcs[i + 1][j])
    return max(0.0, lcs[m][n] / n - 0.1 * max(0, m - n))


# A policy that writes right pieces, at most two steps long: it can never write TARGET.
PAIRS = FakePolicy(repertoire=[TARGET[:2], TARGET[1:], ["turn on the stove", "pick up the cup"],
                               ["open the fridge", "turn on the stove"], ["pick up the cup", "close the fridge"]])


class FakeWorld:
    def __init__(self, fail: bool = False):
        self.calls: list[list[tuple[str, ...]]] = []
        self.fail = fail

    def imagine(self, task, plans, seeds):
        assert len(plans) == len(seeds)
        self.calls.append([tuple(p.actions) for p in plans])
        if self.fail:
            raise TimeoutError("world replica did not answer")
        return [Rollout(task_id=task.id, plan_index=i, video_uri=f"mem://{i}.mp4", seed=s, world="fake")
                for i, (p, s) in enumerate(zip(plans, seeds))]


class FakeJudge:
    def judge(self, items):
        out = []
        for _, plan, _ in items:
            r = _reward(plan.actions)
            out.append(Verdict(state_caption="x", success=r == 1.0, reward=r, scorer="fake",
                               scores=Scores(**{k: r for k in Scores.model_fields})))
        return out


def _planner(policy=None, world=None, **cfg):
    base = dict(num_candidates=6, iterations=4, seed=3)
    base.update(cfg)
    return Planner(PlannerConfig(**base), policy or FakePolicy(), world or FakeWorld(), FakeJudge(), max_steps=4)


# --------------------------------------------------------------------------- the chain


def test_fit_is_the_maximum_likelihood_chain():
    m = MarkovPlanModel.fit([["a", "b"], ["a", "c"], ["b"]], max_steps=4)
    assert m.rows[START] == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    assert m.rows["a"] == pytest.approx({"b": 0.5, "c": 0.5})
    assert m.rows["b"] == pytest.approx({STOP: 1.0})
    assert m.unigram == pytest.approx({"a": 2 / 8, "b": 2 / 8, "c": 1 / 8, STOP: 3 / 8})
    assert m.row("never-seen") == m.unigram  # back-off


def test_mix_is_rowwise_convex_and_backs_off():
    a = MarkovPlanModel.fit([["x"]], 4)
    b = MarkovPlanModel.fit([["y", "x"]], 4)
    m = a.mix(b, 0.75)
    assert m.rows[START] == pytest.approx({"x": 0.75, "y": 0.25})
    # "y" has no row in `a`: a's unigram stands in for it
    assert m.rows["y"] == pytest.approx({"x": 0.75 * 0.5 + 0.25, STOP: 0.75 * 0.5})
    for row in m.rows.values():
        assert sum(row.values()) == pytest.approx(1.0)


@settings(derandomize=True, max_examples=60)
@given(plans=hs.lists(hs.lists(hs.sampled_from(VOCAB), min_size=1, max_size=6), min_size=0, max_size=6),
       explore=hs.floats(0.0, 1.0), seed=hs.integers(0, 2**31 - 1), max_steps=hs.integers(1, 5))
def test_draws_are_nonempty_bounded_and_inside_the_support(plans, explore, seed, max_steps):
    m = MarkovPlanModel.fit(plans, max_steps).with_exploration(explore, VOCAB)
    rng = random.Random(seed)
    for _ in range(5):
        p = m.sample(rng)
        assert 1 <= len(p) <= max_steps
        assert set(p) <= set(VOCAB)
    assert m.entropy() >= 0.0


def test_exploration_floor_reaches_every_admissible_action():
    m = MarkovPlanModel.fit([["open the fridge"]], 1).with_exploration(0.5, VOCAB)
    rng = random.Random(0)
    firsts = {tuple(m.sample(rng)) for _ in range(600)}
    assert {(a,) for a in VOCAB} == firsts
    # without the floor, only the fitted action is ever drawn
    assert {tuple(MarkovPlanModel.fit([["open the fridge"]], 1).sample(rng)) for _ in range(50)} == {("open the fridge",)}


# --------------------------------------------------------------------------- search


def test_cem_recombines_elites_and_beats_best_of_n_at_equal_world_calls():
    cem_world, bon_world = FakeWorld(), FakeWorld()
    n, k = 8, 6
    cem = _planner(policy=PAIRS, world=cem_world, policy_fraction=0.0, num_candidates=n,
                   iterations=k).plan(TASK, VOCAB, method="cem", seed=0)
    bon = _planner(policy=PAIRS, world=bon_world, num_candidates=n, iterations=k).plan(TASK, VOCAB, method="best_of_n")
    # equal budget: both spend at most N*K world calls, counted exactly
    assert bon.world_calls == len(set(itertools.chain(*bon_world.calls))) <= n * k
    assert cem.world_calls == sum(len(c) for c in cem_world.calls) <= n * k
    assert len(bon.trace) == 1 and bon.policy_samples == n * k
    # two-step plans cannot reach the goal; the refit chain joins "open->pick" and "pick->close"
    assert bon.best.reward == pytest.approx(2 / 3) and not bon.best.success
    assert cem.best.success and cem.best.plan.actions == TARGET and cem.stopped == "success"
    assert cem.best.source == "cem" and cem.rollout.video_uri == cem.best.video_uri and cem.verdict.success
    # refit rounds carry the elite threshold and the chain's entropy; round 0 came from the policy
    assert cem.trace[0].entropy is None and all(c.source == "policy" for c in cem.trace[0].candidates)
    assert all(t.entropy is not None and t.elite_threshold is not None for t in cem.trace[1:])
    assert [t.iteration for t in cem.trace] == list(range(len(cem.trace)))


def test_cem_finds_the_recombination_for_most_seeds():
    """Not luck: the chain puts real mass on TARGET once the two elite pairs are fitted."""
    wins = sum(_planner(policy=PAIRS, policy_fraction=0.0, num_candidates=8, iterations=6, seed=s)
               .plan(TASK, VOCAB).best.success for s in range(10))
    assert wins >= 8


def test_elites_are_the_best_plans_so_far_and_the_chain_moves_towards_them():
    res = _planner(policy=PAIRS, policy_fraction=0.0, stop_on_success=False, num_candidates=8,
                   iterations=3, seed=1).plan(TASK, VOCAB)
    best0 = sorted((c.reward for c in res.trace[0].candidates if not c.cached), reverse=True)
    assert res.trace[1].elite_threshold == best0[3]  # ceil(0.5 * 8) = 4 elites after round 0
    def mean(t):
        return sum(c.reward for c in t.candidates) / len(t.candidates)
    assert mean(res.trace[1]) > mean(res.trace[0])


def test_policy_fraction_prompts_the_policy_with_the_best_plans_so_far():
    policy = FakePolicy()
    res = _planner(policy=policy, policy_fraction=0.5, exemplars=2, stop_on_success=False).plan(TASK, VOCAB)
    assert [c["n"] for c in policy.calls] == [6, 3, 3, 3]
    assert policy.calls[0]["exemplars"] == []
    seen = [c for t in res.trace for c in t.candidates if not c.cached]
    for k, call in enumerate(policy.calls[1:], start=1):
        ex = call["exemplars"]
        assert len(ex) == 2 and ex[0].reward >= ex[1].reward
        before = [c for c in seen if c.iteration < k]
        assert ex[0].reward == max(c.reward for c in before)
    assert res.policy_samples == 15 and res.stopped == "budget"
    assert {c.source for t in res.trace[1:] for c in t.candidates} == {"policy", "cem"}


def test_repeated_plans_are_imagined_once():
    world = FakeWorld()
    res = _planner(policy=FakePolicy(fixed=["pick up the cup"]), world=world).plan(TASK, VOCAB, method="best_of_n")
    assert world.calls == [[("pick up the cup",)]] and res.world_calls == 1
    cands = res.trace[0].candidates
    assert len(cands) == 24 and sum(not c.cached for c in cands) == 1
    assert {c.reward for c in cands} == {0.0}


def test_single_draws_one_sample_and_invalid_samples_are_counted():
    res = _planner().plan(TASK, VOCAB, method="single")
    assert res.world_calls == 1 and res.policy_samples == 1 and len(res.trace) == 1
    bad = _planner(policy=FakePolicy(invalid_every=1)).plan(TASK, VOCAB, method="best_of_n")
    assert bad.best is None and bad.stopped == "no_plan" and bad.trace[0].invalid == 24 and bad.world_calls == 0
    # CEM falls back to the chain (uniform over the vocabulary) when the policy writes no plan
    cem = _planner(policy=FakePolicy(invalid_every=1), exploration=0.2, iterations=8).plan(TASK, VOCAB)
    assert cem.best is not None and cem.world_calls > 0


def test_budgets_come_from_config_and_requests_may_only_lower_them():
    cfg = PlannerConfig(num_candidates=4, iterations=2)
    b = resolve_budget(cfg, "best_of_n", 2, None)
    assert (b.method, b.num_candidates, b.iterations) == ("best_of_n", 2, 2)
    with pytest.raises(ValueError, match=r"num_candidates=5 is outside 1..4"):
        resolve_budget(cfg, None, 5, None)
    with pytest.raises(ValueError, match=r"iterations=3 is outside 1..2"):
        resolve_budget(cfg, None, None, 3)
    with pytest.raises(ValueError, match="method"):
        resolve_budget(cfg, "beam")


def test_time_budget_stops_before_a_new_round():
    ticks = itertools.count(0.0, 10.0)
    planner = Planner(PlannerConfig(num_candidates=3, iterations=5, time_budget_s=15.0), FakePolicy(), FakeWorld(),
                      FakeJudge(), max_steps=4, clock=lambda: next(ticks))
    res = planner.plan(TASK, VOCAB)
    assert res.stopped == "time" and 1 <= len(res.trace) < 5
    assert res.world_calls <= 3 * len(res.trace)


def test_a_failing_world_fails_its_candidates_not_the_search():
    res = _planner(world=FakeWorld(fail=True)).plan(TASK, VOCAB, method="cem")
    assert res.best is None and res.stopped == "no_plan"
    errs = [c.error for t in res.trace for c in t.candidates]
    assert errs and all("imagination failed: TimeoutError" in e for e in errs)


def test_search_is_deterministic_in_the_seed():
    a = _planner(stop_on_success=False).plan(TASK, VOCAB, seed=11)
    b = _planner(stop_on_success=False).plan(TASK, VOCAB, seed=11)
    assert [c.plan for t in a.trace for c in t.candidates] == [c.plan for t in b.trace for c in t.candidates]
    assert a.best == b.best


# --------------------------------------------------------------------------- on the sandbox


def test_cem_on_the_sandbox_solves_a_heldout_task_a_weak_policy_cannot(tmp_path):
    from worldagent_ray.critic import Critic
    from worldagent_ray.world.sandbox import SandboxTaskGenerator, SandboxWorld, reference_plan

    world = SandboxWorld(SandboxConfig(write_gif=False, image_size=32, frames_per_step=1), critic_frames=1)
    task = next(t for t in SandboxTaskGenerator(seed=5).heldout_tasks(2, 40)
                if t.world_spec["family"] == "crack_and_whisk" and len(reference_plan(t).actions) == 3)
    assert task.split == "heldout"
    vocab = world.admissible_actions(task)
    ref = reference_plan(task).actions  # open the fridge, crack the egg into the bowl, whisk the egg
    other = [a for a in vocab if a not in ref]
    # the policy writes right pieces, never the whole three-step recipe
    policy = FakePolicy(repertoire=[ref[:2], ref[1:], other[:2], [ref[0], other[2]], [other[3], ref[2]]])
    critic = Critic(CriticConfig(scorers=["verifiable"]))
    mk = lambda: Planner(PlannerConfig(num_candidates=8, iterations=6, seed=1, policy_fraction=0.0),  # noqa: E731
                         policy, WorldImagination(world, str(tmp_path)), CriticJudge(critic), max_steps=6)
    bon = mk().plan(task, vocab, method="best_of_n")
    cem = mk().plan(task, vocab, method="cem")
    assert not bon.best.success and bon.world_calls <= 48
    assert cem.best.success and cem.verdict.success and cem.rollout.ground_truth.goal_achieved
    assert cem.world_calls <= 48 and cem.rollout.video_uri.endswith(".mp4")
    assert math.isclose(cem.best.reward, cem.verdict.reward)
