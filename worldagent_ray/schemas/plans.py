"""Tasks, plans, world rollouts and the critic's verdicts: one episode's parts."""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .text import (
    MAX_ACTION_CHARS,
    MAX_GOAL_CHARS,
    SCORE_DIMENSIONS,
    JsonRejection,
    _Message,
    clean_text,
    load_json,
)

# --------------------------------------------------------------------------- tasks


class Phase(int, Enum):
    """Curriculum phase (seed 000): 1 atomic, 2 composite, 3 multi-stage."""

    ATOMIC = 1
    COMPOSITE = 2
    MULTI_STAGE = 3


class Task(_Message):
    """A goal for the Action agent.

    ``world_spec`` is opaque to everything but the world that made the task (the sandbox
    stores its family, variation seed and goal predicates there); a free-text task from an
    LLM curriculum has ``world_spec=None`` and is judged by the critic alone.
    """

    id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:\-]+$")
    goal: str = Field(min_length=1, max_length=MAX_GOAL_CHARS)
    phase: int = Field(ge=1, le=3)
    reference_image: str | None = Field(
        default=None, description="Path or URI of an image that conditions the plan and the video."
    )
    split: Literal["train", "heldout"] = "train"
    source: Literal["generator", "llm", "user"] = "generator"
    world_spec: dict[str, Any] | None = None

    @field_validator("goal")
    @classmethod
    def _goal_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError(f"goal must contain non-whitespace text, got {v!r}")
        return clean_text(v.strip())


# --------------------------------------------------------------------------- plans


class PlanStep(_Message):
    """One step of a plan: ``{"step": 1, "action": "Crack two eggs into a bowl"}``."""

    step: int = Field(ge=1)
    action: str = Field(min_length=1, max_length=MAX_ACTION_CHARS)

    @field_validator("action")
    @classmethod
    def _clean(cls, v: str) -> str:
        return clean_text(v)


class Plan(_Message):
    """An ordered multi-step plan written by the Action agent."""

    steps: list[PlanStep] = Field(default_factory=list)

    @model_validator(mode="after")
    def _steps_numbered_in_order(self) -> "Plan":
        for i, s in enumerate(self.steps):
            if s.step != i + 1:
                raise ValueError(
                    f"steps[{i}].step must be {i + 1} (steps are numbered 1..n in order), got {s.step}"
                )
        return self

    @classmethod
    def from_actions(cls, actions: list[str]) -> "Plan":
        return cls(steps=[PlanStep(step=i + 1, action=a) for i, a in enumerate(actions)])

    @property
    def actions(self) -> list[str]:
        return [s.action for s in self.steps]

    def as_text(self) -> str:
        return "\n".join(f"{s.step}. {s.action}" for s in self.steps)

    @classmethod
    def decoding_schema(
        cls, max_steps: int = 12, vocabulary: list[str] | None = None, max_action_chars: int = MAX_ACTION_CHARS
    ) -> dict[str, Any]:
        """JSON schema for constrained decoding of a plan.

        ``vocabulary`` (the world's admissible action strings) turns ``action`` into an
        enum, so that a small model can only write actions the world understands; otherwise
        an action is a string of 1 to ``max_action_chars`` characters (at most
        ``MAX_ACTION_CHARS``). Step numbers lie in ``[1, max_steps]`` but are not
        constrained to be consecutive here (JSON schema cannot say so);
        :func:`parse_plan_json` renumbers them.
        """
        if not 1 <= max_action_chars <= MAX_ACTION_CHARS:
            raise ValueError(f"max_action_chars={max_action_chars} must be in [1, {MAX_ACTION_CHARS}]")
        action: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": max_action_chars}
        if vocabulary:
            action = {"type": "string", "enum": sorted(set(vocabulary))}
        return {
            "type": "object",
            "properties": {
                "steps": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": max_steps,
                    "items": {
                        "type": "object",
                        "properties": {"step": {"type": "integer", "minimum": 1, "maximum": max_steps},
                                       "action": action},
                        "required": ["step", "action"],
                        "additionalProperties": False,
                    },
                }
            },
            "required": ["steps"],
            "additionalProperties": False,
        }


class PlanParseError(ValueError):
    """Model output that is not a plan; ``reason`` says why, ``text`` is the raw output."""

    def __init__(self, reason: str, text: str):
        super().__init__(f"{reason}: {text[:200]!r}")
        self.reason = reason
        self.text = text


def parse_plan_json(text: str, max_steps: int | None = None) -> Plan:
    """Parse model output (JSON) into a Plan. The output is data: it is only parsed, never run.

    Accepts ``{"steps": [...]}`` or a bare list of steps; steps may be objects with an
    ``action`` or plain strings. Steps are renumbered 1..n in the order given; actions longer
    than ``MAX_ACTION_CHARS`` are cut. Total: any input gives a Plan or raises
    :class:`PlanParseError` naming the problem (never another exception).
    """
    raw = text if isinstance(text, str) else repr(text)
    try:
        data = load_json(text)
    except JsonRejection as e:
        raise PlanParseError(e.reason, raw) from None
    if isinstance(data, dict):
        if "steps" not in data:
            raise PlanParseError(f"JSON object has no 'steps' field (keys: {sorted(data)[:5]})", raw)
        data = data["steps"]
    if not isinstance(data, list):
        raise PlanParseError(f"'steps' must be a list, got {type(data).__name__}", raw)
    if max_steps is not None and len(data) > max_steps:
        raise PlanParseError(f"plan has {len(data)} steps, more than max_steps={max_steps}", raw)
    actions: list[str] = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            action = item
        elif isinstance(item, dict) and isinstance(item.get("action"), str):
            action = item["action"]
        else:
            raise PlanParseError(f"steps[{i}] has no string 'action': {_short(item)}", raw)
        action = action.strip()
        if not action:
            raise PlanParseError(f"steps[{i}].action is empty", raw)
        actions.append(action[:MAX_ACTION_CHARS])
    if not actions:
        raise PlanParseError("plan has no steps", raw)
    return Plan.from_actions(actions)


def _short(value: Any, limit: int = 80) -> str:
    """A bounded repr (never recurses deeply: the JSON depth is already capped)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- world


class StepStatus(str, Enum):
    EXECUTED = "executed"
    PRECONDITION_FAILED = "precondition_failed"
    NOT_UNDERSTOOD = "not_understood"
    SKIPPED = "skipped"  # beyond the world's step limit


class StepOutcome(_Message):
    """Ground truth for one plan step, as recorded by a world that can check it."""

    index: int = Field(ge=0)
    text: str
    status: StepStatus
    verb: str | None = None
    args: list[str] = Field(default_factory=list)
    reason: str | None = None
    # Why a step failed: "object" (unknown/absent object or one the verb cannot act on),
    # "physics" (a state precondition: hand full, fridge closed, egg not cracked...),
    # "parse" (no action recognised), "limit" (beyond the world's step limit).
    category: Literal["object", "physics", "parse", "limit"] | None = None


class GroundTruth(_Message):
    """What a verifiable world knows about a rollout (the sandbox fills it; Wan cannot)."""

    steps: list[StepOutcome] = Field(default_factory=list)
    final_state: dict[str, Any] = Field(default_factory=dict)
    goal_predicates: dict[str, bool] = Field(default_factory=dict)
    state_description: str = ""
    # Indices of goal-relevant steps in plan order, and the same indices in the order the
    # task's dependencies expect (the sandbox: understood steps matching a reference step,
    # stably sorted by the reference step's stage); the verifiable critic compares the two
    # to judge temporal consistency.
    relevant_step_order: list[int] = Field(default_factory=list)
    expected_step_order: list[int] = Field(default_factory=list)

    @property
    def goal_achieved(self) -> bool:
        return bool(self.goal_predicates) and all(self.goal_predicates.values())

class StepFrames(_Message):
    """Frames ``[start, stop)`` of a rollout's video showing plan step ``step`` (``frame_uri``: its last frame)."""

    step: int = Field(ge=1)
    action: str = Field(max_length=MAX_ACTION_CHARS)
    start: int = Field(ge=0)
    stop: int = Field(ge=0)
    frame_uri: str | None = None

    @model_validator(mode="after")
    def _ordered(self) -> "StepFrames":
        if self.stop < self.start:
            raise ValueError(f"stop ({self.stop}) must be >= start ({self.start})")
        return self


class Rollout(_Message):
    """One plan turned into a video by a world model."""

    task_id: str
    plan_index: int = Field(ge=0)
    video_uri: str | None = None
    gif_uri: str | None = None
    frame_uris: list[str] = Field(default_factory=list, description="Frames sampled for the critic.")
    num_frames: int = Field(default=0, ge=0)
    ground_truth: GroundTruth | None = None
    world: str = "unknown"
    seed: int | None = None
    latency_s: float = Field(default=0.0, ge=0.0)
    error: str | None = Field(default=None, description="Set when the world could not render this plan.")
    step_frames: list[StepFrames] = Field(
        default_factory=list, description="Frame range of each rendered plan step (worlds that render per step)."
    )


# --------------------------------------------------------------------------- critic


class Scores(_Message):
    """The five critic dimensions of seed 000, each in [0, 1]."""

    action_following: float = Field(ge=0.0, le=1.0)
    temporal_consistency: float = Field(ge=0.0, le=1.0)
    object_interaction: float = Field(ge=0.0, le=1.0)
    goal_achievement: float = Field(ge=0.0, le=1.0)
    physics: float = Field(ge=0.0, le=1.0)

    def as_dict(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in SCORE_DIMENSIONS}

    @classmethod
    def zeros(cls) -> "Scores":
        return cls(**{k: 0.0 for k in SCORE_DIMENSIONS})


class Verdict(_Message):
    """The critic's judgement of one rollout."""

    state_caption: str = Field(max_length=2_000)
    success: bool
    scores: Scores
    reward: float = Field(ge=0.0, le=1.0)
    scorer: str = "unknown"
    notes: list[str] = Field(default_factory=list)

    @classmethod
    def decoding_schema(cls, max_caption_chars: int = 400) -> dict[str, Any]:
        """JSON schema a judge model is constrained to (reward and success are derived
        by the critic from the scores and config, so a judge only writes these); the caption
        has 1 to ``max_caption_chars`` characters (``CriticConfig.caption_max_chars``)."""
        if max_caption_chars < 1:
            raise ValueError(f"max_caption_chars={max_caption_chars} must be at least 1")
        score = {"type": "number", "minimum": 0, "maximum": 1}
        return {
            "type": "object",
            "properties": {
                "state_caption": {"type": "string", "minLength": 1, "maxLength": max_caption_chars},
                "success": {"type": "boolean"},
                "scores": {
                    "type": "object",
                    "properties": {k: score for k in SCORE_DIMENSIONS},
                    "required": list(SCORE_DIMENSIONS),
                    "additionalProperties": False,
                },
            },
            "required": ["state_caption", "success", "scores"],
            "additionalProperties": False,
        }
