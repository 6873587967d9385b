"""Scores from a verifiable world's ground truth alone (no model).

Let ``n`` be the number of plan steps and ``a`` the number of *attempted* steps (those not
skipped for being beyond the world's step limit). Each dimension is in [0, 1]; an empty plan
scores 0 on every dimension.
"""

from __future__ import annotations

from ..schemas import GroundTruth, Scores, StepStatus


def action_following(gt: GroundTruth) -> float:
    """Executed steps / all steps (skipped, failed and not-understood steps count against)."""
    n = len(gt.steps)
    return sum(s.status == StepStatus.EXECUTED for s in gt.steps) / n if n else 0.0


def _attempted(gt: GroundTruth) -> int:
    return sum(s.status != StepStatus.SKIPPED for s in gt.steps)


def object_interaction(gt: GroundTruth) -> float:
    """Fraction of attempted steps that name a recognised action on objects that exist in the
    scene and that the action can act on: 1 − (steps failed with category ``object`` or
    ``parse``) / attempted steps."""
    a = _attempted(gt)
    bad = sum(s.status != StepStatus.SKIPPED and s.category in ("object", "parse") for s in gt.steps)
    return 1.0 - bad / a if a else 0.0


def physics(gt: GroundTruth) -> float:
    """1 − (attempted steps that violated a physical precondition, category ``physics``: the
    hand already full, a closed fridge, an uncracked egg...) / attempted steps."""
    a = _attempted(gt)
    bad = sum(s.status == StepStatus.PRECONDITION_FAILED and s.category != "object" for s in gt.steps)
    return 1.0 - bad / a if a else 0.0


def goal_achievement(gt: GroundTruth) -> float:
    """Fraction of the task's goal predicates that hold in the final state (0 with none)."""
    g = gt.goal_predicates
    return sum(bool(v) for v in g.values()) / len(g) if g else 0.0


def temporal_consistency(gt: GroundTruth) -> float:
    """Fraction of ordered pairs of goal-relevant steps whose plan order agrees with the
    expected (dependency) order.

    ``relevant_step_order`` lists the relevant step indices in plan order and
    ``expected_step_order`` the same indices in the order the task's recipe expects. For every
    pair ``(i, j)`` with ``i`` before ``j`` in the plan, the pair is consistent when ``i`` is
    also before ``j`` in the expected order. One relevant step scores 1; none scores 0 (a
    plan that does nothing relevant shows no sensible order).
    """
    rel, exp = gt.relevant_step_order, gt.expected_step_order
    if not rel:
        return 0.0
    if len(rel) == 1:
        return 1.0
    pos = {idx: k for k, idx in enumerate(exp)}
    if set(pos) != set(rel):
        return 0.0
    pairs = good = 0
    for x in range(len(rel)):
        for y in range(x + 1, len(rel)):
            pairs += 1
            good += pos[rel[x]] < pos[rel[y]]
    return good / pairs


class VerifiableScorer:
    """The five dimensions computed from :class:`~worldagent_ray.schemas.GroundTruth`."""

    name = "verifiable"

    def score(self, gt: GroundTruth) -> tuple[Scores, list[str]]:
        notes: list[str] = []
        if not gt.steps:
            notes.append("verifiable: empty plan, every dimension scores 0")
        if not gt.goal_predicates:
            notes.append("verifiable: the world has no goal predicates for this task; goal_achievement=0")
        scores = Scores(
            action_following=action_following(gt),
            temporal_consistency=temporal_consistency(gt),
            object_interaction=object_interaction(gt),
            goal_achievement=goal_achievement(gt),
            physics=physics(gt),
        )
        failed = [s for s in gt.steps if s.status in (StepStatus.PRECONDITION_FAILED, StepStatus.NOT_UNDERSTOOD)]
        for s in failed[:3]:
            notes.append(f"step {s.index + 1} {s.status.value}: {s.reason}")
        if len(failed) > 3:
            notes.append(f"... and {len(failed) - 3} more failed steps")
        return scores, notes
