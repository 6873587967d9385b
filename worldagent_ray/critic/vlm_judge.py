"""A vision-language judge: sampled frames + goal + plan -> the five scores and a caption.

The engine is constrained to :meth:`~worldagent_ray.schemas.Verdict.decoding_schema`; its
output is data (parsed by the total :func:`~worldagent_ray.critic.parsing.parse_judgement`,
never run). Malformed output gives zero scores and a note; a degenerate caption (a loop,
leaked prompt text) is dropped with a note (the critic then uses the world's description).
"""

from __future__ import annotations

from typing import Any, Sequence

from ..config import CriticConfig
from ..engines.base import InferenceEngine
from ..schemas import Plan, Rollout, SamplingParams, Scores, Task, Verdict
from ..world.media import sample_indices
from .captions import ground_caption
from .parsing import JudgeParseError, parse_judgement

__all__ = ["SYSTEM", "VLMJudge", "judge_messages", "parse_judgement"]

SYSTEM = (
    "You are a strict judge of robot videos. Given frames of a video, the goal and the plan, "
    "rate from 0 to 1: action_following (the video follows the plan's steps), "
    "temporal_consistency (steps happen in a sensible order), object_interaction (objects are "
    "handled plausibly), goal_achievement (the goal is reached), physics (nothing impossible "
    "happens). Describe the final state in state_caption. Answer only with JSON."
)


def judge_messages(task: Task, plan: Plan | None, frames: Sequence[str]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image", "image": f} for f in frames]
    steps = plan.as_text() if plan is not None else "(no plan)"
    parts.append({"type": "text", "text": f"Goal: {task.goal}\nPlan:\n{steps}\nJudge the video."})
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": parts}]


class VLMJudge:
    """Judges rollouts from their sampled frames with a vision-language engine."""

    name = "vlm_judge"

    def __init__(self, engine: InferenceEngine | None, cfg: CriticConfig):
        self.engine = engine
        self.cfg = cfg

    def frames_for(self, rollout: Rollout) -> list[str]:
        uris = rollout.frame_uris
        return [uris[i] for i in sample_indices(len(uris), self.cfg.num_frames)]

    def judge_batch(
        self, items: Sequence[tuple[Task, Plan | None, Rollout]]
    ) -> list[tuple[Scores | None, str, list[str]]]:
        """One ``(scores or None, caption, notes)`` per item; never raises. ``None`` scores
        mean the judge could not look (no engine, no frames); malformed output gives zeros."""
        out: list[tuple[Scores | None, str, list[str]]] = [(None, "", []) for _ in items]
        if self.engine is None:
            return [(None, "", ["vlm_judge: no engine"]) for _ in items]
        todo = []
        for k, (task, plan, r) in enumerate(items):
            frames = self.frames_for(r)
            if frames:
                todo.append((k, judge_messages(task, plan, frames)))
            else:
                out[k] = (None, "", ["vlm_judge: the rollout has no frames to judge"])
        if not todo:
            return out
        params = SamplingParams(temperature=0.0, max_tokens=self.cfg.max_tokens, n=1, seed=0, logprobs=False)
        try:
            gens = self.engine.generate([m for _, m in todo], params, json_schema=Verdict.decoding_schema())
        except Exception as e:
            for k, _ in todo:
                out[k] = (Scores.zeros(), "", [f"vlm_judge: engine failed ({type(e).__name__}: {str(e)[:200]}); scores 0"])
            return out
        for (k, _), g in zip(todo, list(gens) + [[]] * (len(todo) - len(gens))):
            try:
                if not g:
                    raise JudgeParseError("no completion returned")
                if g[0].finish_reason == "error":
                    raise JudgeParseError("engine could not produce valid JSON")
                scores, cap = parse_judgement(g[0].text, self.cfg.caption_max_chars)
                cap, notes = ground_caption(cap, "", self.cfg.caption_max_chars, source="vlm_judge") if cap else ("", [])
                out[k] = (scores, cap, notes)
            except JudgeParseError as e:
                out[k] = (Scores.zeros(), "", [f"vlm_judge: malformed output ({e}); scores 0"])
        return out
