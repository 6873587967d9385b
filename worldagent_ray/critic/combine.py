"""``Critic``: combines the configured scorers into one :class:`~worldagent_ray.schemas.Verdict`.

* ``verifiable`` gives the five scores from the world's ground truth (when it has one);
* ``vlm_judge`` gives them from sampled frames (any world);
* ``text_judge`` writes the state caption from the ground truth's state description.

When both verifiable and VLM scores exist, each dimension is their mean. The reward is the
weighted mean of the five scores with ``CriticConfig.reward_weights`` (missing dimensions
weigh 0); ``success`` is ``goal_achievement >= success_min_goal and reward >=
success_min_reward`` and needs at least one scorer to have scored. A rollout with an error
(or a missing plan) gets a failed verdict with the reason in ``notes``. Pure core: no Ray.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from ..config import CriticConfig
from ..engines.base import InferenceEngine
from ..schemas import SCORE_DIMENSIONS, Plan, Rollout, Scores, Task, Verdict
from .text_judge import MAX_CAPTION, TextJudge
from .verifiable import VerifiableScorer
from .vlm_judge import VLMJudge

Item = tuple[Task, "Plan | None", Rollout]


def reward_of(scores: Scores, weights: Mapping[str, float]) -> float:
    """Weighted mean of the scores (weights of absent dimensions count as 0)."""
    d = scores.as_dict()
    total = sum(weights.get(k, 0.0) for k in SCORE_DIMENSIONS)
    r = sum(weights.get(k, 0.0) * d[k] for k in SCORE_DIMENSIONS) / total
    return min(1.0, max(0.0, r))


def failed_verdict(reason: str, scorer: str = "none") -> Verdict:
    return Verdict(state_caption=reason[:MAX_CAPTION], success=False, scores=Scores.zeros(), reward=0.0,
                   scorer=scorer, notes=[reason])


def _mean(a: Scores, b: Scores) -> Scores:
    da, db = a.as_dict(), b.as_dict()
    return Scores(**{k: (da[k] + db[k]) / 2 for k in SCORE_DIMENSIONS})


class Critic:
    """Judge rollouts.

    Args:
        cfg (`CriticConfig`): scorers, reward weights, success rule, judge engine name.
        engines (`dict[str, InferenceEngine]`, *optional*): engines by name; the judges use
            ``engines[cfg.engine]``. Without it, the judges fall back (caption = state
            description; no VLM scores) and say so in the notes.
    """

    def __init__(self, cfg: CriticConfig, engines: Mapping[str, InferenceEngine] | None = None):
        self.cfg = cfg
        engine = (engines or {}).get(cfg.engine)
        self.verifiable = VerifiableScorer() if "verifiable" in cfg.scorers else None
        self.text_judge = TextJudge(engine, cfg) if "text_judge" in cfg.scorers else None
        self.vlm_judge = VLMJudge(engine, cfg) if "vlm_judge" in cfg.scorers else None

    def score(self, task: Task, plan: Plan | None, rollout: Rollout) -> Verdict:
        return self.score_batch([(task, plan, rollout)])[0]

    def score_batch(self, items: Sequence[Item]) -> list[Verdict]:
        """One verdict per ``(task, plan, rollout)``; the judges each make one batched call."""
        items = list(items)
        verdicts: list[Verdict | None] = [None] * len(items)
        live: list[int] = []
        for k, (task, plan, r) in enumerate(items):
            if r.error:
                verdicts[k] = failed_verdict(f"rollout error: {r.error}")
            elif plan is None:
                verdicts[k] = failed_verdict("no plan to judge")
            else:
                live.append(k)
        vlm = {}
        if self.vlm_judge and live:
            vlm = dict(zip(live, self.vlm_judge.judge_batch([items[k] for k in live])))
        captions = {}
        with_gt = [k for k in live if items[k][2].ground_truth is not None]
        if self.text_judge and with_gt:
            captions = dict(zip(with_gt, self.text_judge.caption_batch(
                [(items[k][0], items[k][1], items[k][2].ground_truth) for k in with_gt])))
        for k in live:
            verdicts[k] = self._combine(items[k], vlm.get(k), captions.get(k))
        return [v for v in verdicts if v is not None]

    def _combine(self, item: Item, vlm, caption) -> Verdict:
        task, plan, r = item
        notes: list[str] = []
        used: list[str] = []
        scores: Scores | None = None
        gt = r.ground_truth
        if self.verifiable:
            if gt is not None:
                scores, n = self.verifiable.score(gt)
                notes += n
                used.append("verifiable")
            else:
                notes.append("verifiable: the world recorded no ground truth for this rollout")
        cap = ""
        if vlm is not None:
            v_scores, v_cap, v_notes = vlm
            notes += v_notes
            if v_scores is not None:
                scores = v_scores if scores is None else _mean(scores, v_scores)
                used.append("vlm_judge")
            cap = v_cap or cap
        if caption is not None:
            t_cap, t_notes = caption
            notes += t_notes
            cap = t_cap or cap
            used.append("text_judge")
        if not cap and gt is not None:
            cap = gt.state_description[:MAX_CAPTION]
        if scores is None:
            notes.append("no scorer could score this rollout; scores are 0")
            return Verdict(state_caption=cap or "unscored", success=False, scores=Scores.zeros(), reward=0.0,
                           scorer="+".join(used) or "none", notes=notes)
        reward = reward_of(scores, self.cfg.reward_weights)
        success = scores.goal_achievement >= self.cfg.success_min_goal and reward >= self.cfg.success_min_reward
        return Verdict(state_caption=cap or "no caption", success=bool(success), scores=scores, reward=reward,
                       scorer="+".join(used), notes=notes)
