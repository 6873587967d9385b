"""A judge without vision: it reads the world's scene description instead of frames.

Two modes (``CriticConfig.text_judge_mode``):

* ``caption``: the engine writes only the state caption (JSON ``{"state_caption": ...}``)
  from the goal, the plan and the final scene;
* ``verdict``: the engine answers like the VLM judge (the five scores, ``success`` and a
  caption, :meth:`~worldagent_ray.schemas.Verdict.decoding_schema`) from the goal, the plan
  and :func:`observation_text` (what a camera would show: the final scene and the status bar
  of step outcomes, without the world's goal bookkeeping). This is the prompt format the
  critic SFT data and the reward model use (:func:`verdict_messages`).

The engine's output is data: it is parsed (:mod:`.parsing`), never run. Every caption goes
through :func:`~worldagent_ray.critic.captions.ground_caption`; an unusable one becomes the
world's own state description, and a note says why.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..config import CriticConfig
from ..engines.base import InferenceEngine
from ..schemas import GroundTruth, Plan, SamplingParams, Scores, StepStatus, Task, Verdict
from .captions import MAX_CAPTION_CHARS, cap_length, ground_caption, sanitize_text
from .parsing import JudgeParseError, parse_caption

__all__ = ["CAPTION_SCHEMA", "MAX_CAPTION", "TextJudge", "caption_prompt", "observation_text", "parse_caption",
           "scene_text", "verdict_messages"]

CAPTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"state_caption": {"type": "string", "minLength": 1, "maxLength": 300}},
    "required": ["state_caption"],
    "additionalProperties": False,
}
MAX_CAPTION = MAX_CAPTION_CHARS

SYSTEM = (
    "You watch a kitchen robot. In one or two sentences, describe the final state of the scene "
    "and whether the goal was reached. Answer only with JSON: {\"state_caption\": \"...\"}."
)

VERDICT_SYSTEM = (
    "You are a strict judge of a kitchen robot. Given the goal, the plan, the final scene and the "
    "outcome of each step, rate from 0 to 1: action_following (the steps were carried out), "
    "temporal_consistency (steps happen in a sensible order), object_interaction (objects are "
    "handled plausibly), goal_achievement (the goal is reached), physics (nothing impossible is "
    "attempted). Say whether the goal was reached in success, and describe the final scene in "
    "state_caption. Answer only with JSON."
)

_STATUS_WORDS = {
    StepStatus.EXECUTED: "done",
    StepStatus.PRECONDITION_FAILED: "failed",
    StepStatus.NOT_UNDERSTOOD: "not understood",
    StepStatus.SKIPPED: "skipped",
}


def scene_text(gt: GroundTruth) -> str:
    """The world's scene description without its goal bookkeeping ("Goal conditions met: ...")."""
    text = gt.state_description
    k = text.find(" Goal conditions met:")
    return (text[:k] if k >= 0 else text).strip()


def observation_text(gt: GroundTruth) -> str:
    """What a text judge sees of a rollout: the final scene and the status bar of step
    outcomes (the sandbox draws one coloured cell per step into every frame)."""
    bar = ", ".join(f"{s.index + 1} {_STATUS_WORDS[s.status]}" for s in gt.steps) or "none"
    return f"Final scene: {scene_text(gt)}\nStep outcomes: {bar}"


def caption_prompt(task: Task, plan: Plan | None, gt: GroundTruth) -> list[dict[str, Any]]:
    steps = plan.as_text() if plan is not None else "(no plan)"
    user = f"Goal: {task.goal}\nPlan:\n{steps}\nFinal state: {gt.state_description}"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def verdict_messages(task: Task, plan: Plan | None, observation: str) -> list[dict[str, Any]]:
    """The judge conversation (system + user) for the verdict mode, the critic SFT data and the
    reward model: the goal, the numbered plan and the observation text."""
    steps = plan.as_text() if plan is not None else "(no plan)"
    user = f"Goal: {task.goal}\nPlan:\n{steps}\n{observation}\nJudge the episode."
    return [{"role": "system", "content": VERDICT_SYSTEM}, {"role": "user", "content": user}]


Judged = tuple["Scores | None", str, list[str]]


class TextJudge:
    """Captions (or fully judges) rollouts with a text-only engine, one batched call per batch."""

    name = "text_judge"

    def __init__(self, engine: InferenceEngine | None, cfg: CriticConfig):
        self.engine = engine
        self.cfg = cfg

    @property
    def scores(self) -> bool:
        """Whether this judge scores (``verdict`` mode) or only captions."""
        return self.cfg.text_judge_mode == "verdict"

    def _generate(self, prompts: list[Any], schema: dict[str, Any]) -> tuple[list[Any], str | None]:
        params = SamplingParams(temperature=0.0, max_tokens=self.cfg.max_tokens, n=1, seed=0, logprobs=False)
        try:
            outs = list(self.engine.generate(prompts, params, json_schema=schema))  # type: ignore[union-attr]
        except Exception as e:  # an engine failure must not lose the verdicts
            return [], f"engine failed ({type(e).__name__}: {str(e)[:200]})"
        return outs + [[]] * (len(prompts) - len(outs)), None

    @staticmethod
    def _text(out: Any) -> str:
        comp = out[0] if out else None
        if comp is None:
            raise JudgeParseError("no completion returned")
        if comp.finish_reason == "error":
            raise JudgeParseError(f"engine could not produce valid JSON ({len(comp.rejected)} rejected attempts)")
        return comp.text

    def _ask(self, items: Sequence[tuple[Task, Plan | None, GroundTruth]], prompts: Callable[[], list[Any]],
             schema: dict[str, Any]) -> tuple[list[str], list[Any], str | None]:
        """The fallback caption of each item (the world's state description, capped), and the
        engine's outputs for ``prompts()`` or why there are none (no engine, or it failed)."""
        fallback = [cap_length(sanitize_text(gt.state_description), self.cfg.caption_max_chars) for _, _, gt in items]
        if self.engine is None:
            return fallback, [], "no engine"
        outs, why = self._generate(prompts(), schema)
        return fallback, outs, why

    def caption_batch(self, items: Sequence[tuple[Task, Plan | None, GroundTruth]]) -> list[tuple[str, list[str]]]:
        """One ``(caption, notes)`` per item (``caption`` mode); never raises."""
        limit = self.cfg.caption_max_chars
        if not items:
            return []
        fallback, outs, why = self._ask(items, lambda: [caption_prompt(t, p, gt) for t, p, gt in items],
                                        CAPTION_SCHEMA)
        if why is not None:
            return [(fb, [f"text_judge: {why}; caption is the world's state description"]) for fb in fallback]
        result = []
        for fb, out in zip(fallback, outs):
            try:
                result.append(ground_caption(parse_caption(self._text(out), limit), fb, limit, source="text_judge"))
            except JudgeParseError as e:
                result.append((fb, [f"text_judge: {e}; caption is the world's state description"]))
        return result

    def judge_batch(self, items: Sequence[tuple[Task, Plan | None, GroundTruth]]) -> list[Judged]:
        """One ``(scores or None, caption, notes)`` per item (``verdict`` mode); never raises.
        ``None`` scores: no engine, or the engine failed; malformed output gives zero scores."""
        from .parsing import parse_judgement

        limit = self.cfg.caption_max_chars
        if not items:
            return []
        fallback, outs, why = self._ask(items, lambda: [verdict_messages(t, p, observation_text(gt))
                                                        for t, p, gt in items], Verdict.decoding_schema(limit))
        if why is not None:
            return [(None, fb, [f"text_judge: {why}; no scores"]) for fb in fallback]
        result: list[Judged] = []
        for fb, out in zip(fallback, outs):
            try:
                scores, cap = parse_judgement(self._text(out), limit)
                cap, notes = ground_caption(cap, fb, limit, source="text_judge")
                result.append((scores, cap, notes))
            except JudgeParseError as e:
                result.append((Scores.zeros(), fb, [f"text_judge: malformed output ({e}); scores 0"]))
        return result
