"""An LLM without vision writes the state caption from the world's state description.

The engine's output is data: it is parsed as JSON and only its ``state_caption`` string is
kept. When the engine fails or writes something unusable, the world's own state description
becomes the caption and a note says why.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from ..config import CriticConfig
from ..engines.base import InferenceEngine
from ..schemas import GroundTruth, Plan, SamplingParams, Task

CAPTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"state_caption": {"type": "string", "minLength": 1, "maxLength": 300}},
    "required": ["state_caption"],
    "additionalProperties": False,
}
MAX_CAPTION = 2_000

SYSTEM = (
    "You watch a kitchen robot. In one or two sentences, describe the final state of the scene "
    "and whether the goal was reached. Answer only with JSON: {\"state_caption\": \"...\"}."
)


def caption_prompt(task: Task, plan: Plan | None, gt: GroundTruth) -> list[dict[str, Any]]:
    steps = plan.as_text() if plan is not None else "(no plan)"
    user = f"Goal: {task.goal}\nPlan:\n{steps}\nFinal state: {gt.state_description}"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def parse_caption(text: str) -> str:
    """The caption in ``text`` (JSON with a non-empty ``state_caption``); ValueError otherwise."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    cap = data.get("state_caption") if isinstance(data, dict) else None
    if not isinstance(cap, str) or not cap.strip():
        raise ValueError("no non-empty 'state_caption' string")
    return cap.strip()[:MAX_CAPTION]


class TextJudge:
    """Captions rollouts with a text-only engine, batching all prompts into one call."""

    name = "text_judge"

    def __init__(self, engine: InferenceEngine | None, cfg: CriticConfig):
        self.engine = engine
        self.cfg = cfg

    def caption_batch(
        self, items: Sequence[tuple[Task, Plan | None, GroundTruth]]
    ) -> list[tuple[str, list[str]]]:
        """One ``(caption, notes)`` per item; never raises."""
        fallback = [(gt.state_description[:MAX_CAPTION], []) for _, _, gt in items]
        if not items:
            return []
        if self.engine is None:
            return [(c, ["text_judge: no engine; caption is the world's state description"]) for c, _ in fallback]
        params = SamplingParams(temperature=0.0, max_tokens=self.cfg.max_tokens, n=1, seed=0, logprobs=False)
        try:
            outs = self.engine.generate([caption_prompt(t, p, gt) for t, p, gt in items], params,
                                        json_schema=CAPTION_SCHEMA)
        except Exception as e:  # an engine failure must not lose the verdicts
            msg = f"text_judge: engine failed ({type(e).__name__}: {str(e)[:200]}); caption is the world's state description"
            return [(c, [msg]) for c, _ in fallback]
        result = []
        for (cap, _), out in zip(fallback, list(outs) + [[]] * (len(items) - len(outs))):
            comp = out[0] if out else None
            try:
                if comp is None:
                    raise ValueError("no completion returned")
                if comp.finish_reason == "error":
                    raise ValueError(f"engine could not produce valid JSON ({len(comp.rejected)} rejected attempts)")
                result.append((parse_caption(comp.text), []))
            except ValueError as e:
                result.append((cap, [f"text_judge: {e}; caption is the world's state description"]))
        return result
