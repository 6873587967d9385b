"""``Critic``: combines the configured scorers into one :class:`~worldagent_ray.schemas.Verdict`.

* ``verifiable`` gives the five scores from the world's ground truth (when it has one);
* ``vlm_judge`` gives them from sampled frames (any world);
* ``text_judge`` writes the state caption from the ground truth's state description, or in
  ``verdict`` mode also gives the five scores from the scene description;
* ``reward_model`` gives one calibrated reward in [0, 1] from a frozen learned reward model.

Scores: when several dimension scorers (verifiable, VLM, text judge in verdict mode) score a
rollout, each dimension is their mean. Reward: the ``reward_weights`` mean of the five scores
(missing dimensions weigh 0) is the ``scores`` source; with the reward model on, the reward
is the ``scorer_weights`` mean of the sources that scored the rollout. Success needs every
source that scored to agree: ``goal_achievement >= success_min_goal`` (scores), the reward
model's reward ``>= reward_model_success_threshold``, and the combined reward ``>=
success_min_reward``. A rollout scored only by the reward model keeps zero dimension scores
(it gives no per-dimension judgement; the notes say so).

A rollout with an error (or a missing plan) gets a failed verdict with the reason in
``notes``. :meth:`Critic.score_batch` never raises: a failure while judging one rollout
becomes its failed verdict, and every caption is sanitised and length-capped (a degenerate
one is replaced by the world's description, see :mod:`.captions`). Pure core: no Ray.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from ..config import CriticConfig
from ..engines.base import InferenceEngine
from ..schemas import SCORE_DIMENSIONS, Plan, Rollout, Scores, Task, Verdict
from .captions import MAX_CAPTION_CHARS, cap_length, sanitize_text
from .reward_model import HFRewardModel, RewardModel, RewardModelScorer
from .text_judge import TextJudge
from .verifiable import VerifiableScorer
from .vlm_judge import VLMJudge

Item = tuple[Task, "Plan | None", Rollout]


class _ScorerFailed:
    """Marks a scorer whose whole batched call failed (its note explains)."""

    def __init__(self, note: str):
        self.note = note


def reward_of(scores: Scores, weights: Mapping[str, float]) -> float:
    """Weighted mean of the scores (weights of absent dimensions count as 0)."""
    d = scores.as_dict()
    total = sum(weights.get(k, 0.0) for k in SCORE_DIMENSIONS)
    r = sum(weights.get(k, 0.0) * d[k] for k in SCORE_DIMENSIONS) / total
    return min(1.0, max(0.0, r))


def _clean_notes(notes: Sequence[str]) -> list[str]:
    return [cap_length(sanitize_text(n), 500) for n in notes]


def failed_verdict(reason: str, scorer: str = "none") -> Verdict:
    clean = cap_length(sanitize_text(reason), MAX_CAPTION_CHARS) or "failed"
    return Verdict(state_caption=clean, success=False, scores=Scores.zeros(), reward=0.0,
                   scorer=scorer, notes=_clean_notes([reason]))


def _mean(all_scores: Sequence[Scores]) -> Scores:
    ds = [s.as_dict() for s in all_scores]
    return Scores(**{k: sum(d[k] for d in ds) / len(ds) for k in SCORE_DIMENSIONS})


class Critic:
    """Judge rollouts.

    Args:
        cfg (`CriticConfig`): scorers, weights, success rule, judge engine name.
        engines (`dict[str, InferenceEngine]`, *optional*): engines by name; the judges use
            ``engines[cfg.engine]``. Without it, the judges fall back (caption = state
            description; no judge scores) and say so in the notes.
        reward_model (`RewardModel`, *optional*): the frozen reward model of the
            ``reward_model`` scorer (e.g. a Serve handle adapter); default: loaded in process
            from ``cfg.reward_model``.
    """

    def __init__(self, cfg: CriticConfig, engines: Mapping[str, InferenceEngine] | None = None,
                 reward_model: RewardModel | None = None):
        self.cfg = cfg
        engine = (engines or {}).get(cfg.engine)
        self.verifiable = VerifiableScorer() if "verifiable" in cfg.scorers else None
        self.text_judge = TextJudge(engine, cfg) if "text_judge" in cfg.scorers else None
        self.vlm_judge = VLMJudge(engine, cfg) if "vlm_judge" in cfg.scorers else None
        self.reward_model: RewardModelScorer | None = None
        if "reward_model" in cfg.scorers:
            if reward_model is None:
                reward_model = HFRewardModel(str(cfg.reward_model), max_length=cfg.reward_model_max_length)
            self.reward_model = RewardModelScorer(reward_model, cfg)

    def score(self, task: Task, plan: Plan | None, rollout: Rollout) -> Verdict:
        return self.score_batch([(task, plan, rollout)])[0]

    def score_batch(self, items: Sequence[Item]) -> list[Verdict]:
        """One verdict per ``(task, plan, rollout)``, in order; each scorer makes one batched
        call. Never raises: whatever goes wrong for a rollout becomes its failed verdict."""
        items = list(items)
        verdicts: list[Verdict | None] = [None] * len(items)
        live: list[int] = []
        for k, item in enumerate(items):
            try:
                task, plan, r = item
                if r.error:
                    verdicts[k] = failed_verdict(f"rollout error: {r.error}")
                elif plan is None:
                    verdicts[k] = failed_verdict("no plan to judge")
                else:
                    live.append(k)
            except Exception as e:  # a malformed item must not take the batch down
                verdicts[k] = failed_verdict(f"critic: cannot judge this item ({type(e).__name__}: {str(e)[:200]})")
        extra: dict[str, dict[int, object]] = {}
        for name, fn in self._batch_scorers():
            try:
                ks = [k for k in live if name in ("vlm_judge", "reward_model") or items[k][2].ground_truth is not None]
                if ks:
                    extra[name] = dict(zip(ks, fn([items[k] for k in ks])))
            except Exception as e:  # documented never to raise: the other scorers still count
                note = f"{name}: failed ({type(e).__name__}: {str(e)[:200]})"
                extra[name] = {k: _ScorerFailed(note) for k in live}
        for k in live:
            try:
                verdicts[k] = self._combine(items[k], {n: d.get(k) for n, d in extra.items()})
            except Exception as e:
                verdicts[k] = failed_verdict(f"critic: failed to combine scores ({type(e).__name__}: {str(e)[:200]})")
        return [v if v is not None else failed_verdict("critic: no verdict") for v in verdicts]

    def _batch_scorers(self):
        if self.vlm_judge is not None:
            yield "vlm_judge", self.vlm_judge.judge_batch
        if self.text_judge is not None:
            fn = self.text_judge.judge_batch if self.text_judge.scores else self.text_judge.caption_batch
            yield "text_judge", lambda its: fn([(t, p, r.ground_truth) for t, p, r in its])
        if self.reward_model is not None:
            yield "reward_model", self.reward_model.score_batch

    def _combine(self, item: Item, judged: Mapping[str, object]) -> Verdict:
        task, plan, r = item
        notes: list[str] = []
        used: list[str] = []
        dim_scores: list[Scores] = []
        gt = r.ground_truth
        if self.verifiable:
            if gt is not None:
                s, n = self.verifiable.score(gt)
                dim_scores.append(s)
                notes += n
                used.append("verifiable")
            else:
                notes.append("verifiable: the world recorded no ground truth for this rollout")
        cap = ""
        rm_reward: float | None = None
        for name in ("vlm_judge", "text_judge", "reward_model"):
            out = judged.get(name)
            if out is None:
                continue
            if isinstance(out, _ScorerFailed):
                notes.append(out.note)
                continue
            if name == "reward_model":
                rm_reward, n = out  # type: ignore[misc]
                notes += n
                if rm_reward is not None:
                    used.append(name)
            elif len(out) == 3:  # type: ignore[arg-type]
                j_scores, j_cap, n = out  # type: ignore[misc]
                notes += n
                if j_scores is not None:
                    dim_scores.append(j_scores)
                    used.append(name)
                cap = cap or j_cap
            else:  # a caption-only text judge
                t_cap, n = out  # type: ignore[misc]
                notes += n
                cap = t_cap or cap
                used.append(name)
        if not cap and gt is not None:
            cap = gt.state_description
        cap = cap_length(sanitize_text(cap), self.cfg.caption_max_chars)
        scorer = "+".join(used) or "none"
        if not dim_scores and rm_reward is None:
            notes.append("no scorer could score this rollout; scores are 0")
            return Verdict(state_caption=cap or "unscored", success=False, scores=Scores.zeros(), reward=0.0,
                           scorer=scorer, notes=_clean_notes(notes))
        sources: dict[str, float] = {}
        success = True
        scores = Scores.zeros()
        if dim_scores:
            scores = dim_scores[0] if len(dim_scores) == 1 else _mean(dim_scores)
            sources["scores"] = reward_of(scores, self.cfg.reward_weights)
            success = scores.goal_achievement >= self.cfg.success_min_goal
        else:
            notes.append("reward_model: gives a reward only; the five scores are 0")
        if rm_reward is not None:
            sources["reward_model"] = rm_reward
            success = success and rm_reward >= self.cfg.reward_model_success_threshold
        w = {k: self.cfg.scorer_weights.get(k, 0.0) for k in sources}
        if sum(w.values()) <= 0:
            w = {k: 1.0 for k in sources}
        reward = min(1.0, max(0.0, sum(w[k] * v for k, v in sources.items()) / sum(w.values())))
        success = success and reward >= self.cfg.success_min_reward
        return Verdict(state_caption=cap or "no caption", success=bool(success), scores=scores, reward=reward,
                       scorer=scorer, notes=_clean_notes(notes))
