"""The Action agent's pure core: prompt construction, G samples per task, plan parsing.

Input (seed 000): goal + reference image + retrieved memory context (+ the world's admissible
action vocabulary when it offers one). Output: G :class:`PlanSample` per task, each holding the
parsed :class:`Plan` (or the reason it could not be parsed) and the token ids and log-probs the
learner needs. Model output is data: it is parsed as JSON, never executed.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from ..config import ActionConfig
from ..engines.base import InferenceEngine
from ..schemas import (
    ActionRequest,
    Completion,
    MemoryHit,
    Plan,
    PlanParseError,
    PlanSample,
    SamplingParams,
    parse_plan_json,
)

MAX_VOCAB_IN_PROMPT = 40


def order_memory(hits: Sequence[MemoryHit], k: int) -> list[MemoryHit]:
    """Top-k hits, successful ones first, then by reward, then by retrieval score."""
    ranked = sorted(hits, key=lambda h: (not h.success, -h.reward, -h.score))
    return ranked[:k]


def format_memory(hits: Sequence[MemoryHit]) -> str:
    lines = []
    for h in hits:
        tag = "SUCCESS" if h.success else "FAILED"
        plan = "; ".join(h.plan) if h.plan else "(no plan)"
        line = f"- [{tag}, reward {h.reward:.2f}] goal: {h.goal} | plan: {plan}"
        if h.feedback:
            line += f" | critic: {h.feedback}"
        lines.append(line)
    return "\n".join(lines)


def build_messages(
    cfg: ActionConfig,
    req: ActionRequest,
    attach_image: bool = False,
) -> list[dict[str, Any]]:
    """Chat messages for one task. The JSON shape is shown once; constrained decoding does the rest."""
    parts = [f"Goal: {req.task.goal}"]
    if req.vocabulary:
        vocab = req.vocabulary[:MAX_VOCAB_IN_PROMPT]
        parts.append("Allowed actions (use them verbatim):\n" + "\n".join(f"- {a}" for a in vocab))
    hits = order_memory(req.memory, cfg.memory_top_k) if cfg.use_memory else []
    if hits:
        parts.append("Past attempts at similar goals (learn from them):\n" + format_memory(hits))
    example = json.dumps({"steps": [{"step": 1, "action": "..."}, {"step": 2, "action": "..."}]})
    parts.append(f"Write at most {cfg.max_steps} steps as JSON like {example}")
    text = "\n\n".join(parts)
    user: Any = text
    if attach_image and req.task.reference_image:
        user = [{"type": "image", "image": req.task.reference_image}, {"type": "text", "text": text}]
    return [{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": user}]


def parse_sample(completion: Completion, max_steps: int) -> tuple[Plan | None, str | None]:
    """Parse one completion into a plan, or return the reason it is not one."""
    if completion.finish_reason == "error":
        reasons = "; ".join(r.get("reason", "?") for r in completion.rejected[-2:]) or "engine error"
        return None, f"no valid JSON after retries: {reasons}"
    try:
        return parse_plan_json(completion.text, max_steps=max_steps), None
    except PlanParseError as e:
        why = e.reason
        if completion.finish_reason == "length":
            why += " (output cut at max_tokens)"
        return None, why


class ActionAgent:
    """Writes G plans per task with an inference engine (local or a Serve handle adapter)."""

    def __init__(self, cfg: ActionConfig, engine: InferenceEngine, attach_image: bool | None = None):
        self.cfg = cfg
        self.engine = engine
        if attach_image is None:
            attach_image = "vl" in engine.model_name.lower()
        self.attach_image = attach_image

    def sampling_params(self, seed: int | None) -> SamplingParams:
        return SamplingParams(
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            max_tokens=self.cfg.max_tokens,
            n=self.cfg.group_size,
            seed=seed,
        )

    def schema_for(self, req: ActionRequest) -> dict[str, Any]:
        vocab = req.vocabulary if (self.cfg.constrain_to_vocabulary and req.vocabulary) else None
        return Plan.decoding_schema(max_steps=self.cfg.max_steps, vocabulary=vocab,
                                    max_action_chars=self.cfg.max_action_chars)

    def act(self, requests: Sequence[ActionRequest]) -> list[list[PlanSample]]:
        """G samples for each request. Requests with the same schema share one engine call."""
        out: list[list[PlanSample] | None] = [None] * len(requests)
        # Grouped by the schema's canonical text, but decoded with the schema itself: its property order
        # ("step" before "action", as the prompt's example and the SFT targets write it) is the order the
        # engine's grammar imposes.
        by_schema: dict[str, tuple[dict[str, Any], list[int]]] = {}
        for i, r in enumerate(requests):
            schema = self.schema_for(r)
            by_schema.setdefault(json.dumps(schema, sort_keys=True), (schema, []))[1].append(i)
        for schema, idxs in by_schema.values():
            # One seed per call: engines derive per-sample streams from it.
            seed = requests[idxs[0]].seed
            convs = [build_messages(self.cfg, requests[i], self.attach_image) for i in idxs]
            results = self.engine.generate(convs, self.sampling_params(seed), json_schema=schema)
            for i, conv, comps in zip(idxs, convs, results):
                prompt = conv[-1]["content"] if isinstance(conv[-1]["content"], str) else str(conv[-1]["content"])
                hit_ids = [h.episode_id for h in order_memory(requests[i].memory, self.cfg.memory_top_k)]
                samples = []
                for c in comps:
                    plan, err = parse_sample(c, self.cfg.max_steps)
                    samples.append(
                        PlanSample(plan=plan, completion=c, error=err, prompt=prompt, retrieved_ids=hit_ids)
                    )
                out[i] = samples
        return [o or [] for o in out]
