"""Typed messages exchanged between every part of WorldAgent-Ray.

This is the one module of message types. Every value that crosses a process boundary
(driver <-> Serve deployment, memory actor, buffer, learner) is one of these pydantic v2
models, so a malformed value fails loudly at the boundary with an error that names the
field and the offending value (pydantic's ``ValidationError`` prints both).

The flow of one episode::

    Task --(Action agent)--> Plan --(World model)--> Rollout --(Critic)--> Verdict
         \\_____________________ Episode (kept by memory and the learner) ____________/
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCORE_DIMENSIONS: tuple[str, ...] = (
    "action_following",
    "temporal_consistency",
    "object_interaction",
    "goal_achievement",
    "physics",
)
"""The critic's five dimensions, in the order of seed 000."""

MAX_GOAL_CHARS = 2_000
MAX_ACTION_CHARS = 500
MAX_JSON_CHARS = 65_536
"""Model output longer than this is rejected before it is parsed as JSON."""
MAX_JSON_DEPTH = 64
"""JSON nested deeper than this is rejected (the parser never recurses into it)."""


def clean_text(text: str) -> str:
    """``text`` with every unpaired UTF-16 surrogate (e.g. from a ``"\\ud83c"`` JSON escape in model
    output) replaced by U+FFFD, so it can always be encoded as UTF-8 and stored. Valid text is
    returned unchanged."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class JsonRejection(ValueError):
    """Text that is not an acceptable JSON document; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _depth_exceeds(text: str, limit: int) -> bool:
    """True if brackets outside strings nest deeper than ``limit`` (a linear scan, no recursion)."""
    depth, in_str, esc = 0, False, False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def load_json(text: Any, max_chars: int = MAX_JSON_CHARS, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse model output as JSON, totally: the value, or :class:`JsonRejection` naming why.

    Never raises anything else, whatever the input: non-strings, oversized text, nesting deeper
    than ``max_depth``, integers too long to convert, NaN/Infinity, and invalid JSON are all
    rejections. Strings in the value have unpaired surrogates replaced (:func:`clean_text`).
    """
    if not isinstance(text, str):
        raise JsonRejection(f"expected text, got {type(text).__name__}")
    if len(text) > max_chars:
        raise JsonRejection(f"output has {len(text)} characters, more than the limit {max_chars}")
    if _depth_exceeds(text, max_depth):
        raise JsonRejection(f"JSON nests deeper than {max_depth} levels")

    def _no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise JsonRejection(f"not valid JSON ({e.msg} at char {e.pos})") from None
    except (ValueError, RecursionError, OverflowError, MemoryError) as e:  # huge ints, NaN, depth
        raise JsonRejection(f"unacceptable JSON: {type(e).__name__}: {str(e)[:120]}") from None
    return _clean_strings(value)


def _clean_strings(value: Any) -> Any:
    """A copy of a parsed JSON value with every string cleaned (depth is bounded by the caller)."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [_clean_strings(x) for x in value]
    if isinstance(value, dict):
        return {clean_text(k): _clean_strings(x) for k, x in value.items()}
    return value


class _Message(BaseModel):
    """Base: strict about unknown fields, validates on assignment, JSON round-trips."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


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
        cls, max_steps: int = 12, vocabulary: list[str] | None = None
    ) -> dict[str, Any]:
        """JSON schema for constrained decoding of a plan.

        ``vocabulary`` (the world's admissible action strings) turns ``action`` into an
        enum, so that a small model can only write actions the world understands.
        Step numbers are not constrained to be consecutive here (JSON schema cannot say
        so); :func:`parse_plan_json` renumbers them.
        """
        action: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": MAX_ACTION_CHARS}
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
                        "properties": {"step": {"type": "integer", "minimum": 1}, "action": action},
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
    step_frames: list["StepFrames"] = Field(
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
    def decoding_schema(cls) -> dict[str, Any]:
        """JSON schema a judge model is constrained to (reward and success are derived
        by the critic from the scores and config, so a judge only writes these)."""
        score = {"type": "number", "minimum": 0, "maximum": 1}
        return {
            "type": "object",
            "properties": {
                "state_caption": {"type": "string", "minLength": 1, "maxLength": 400},
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


# --------------------------------------------------------------------------- engines


class SamplingParams(_Message):
    """Sampling parameters shared by every engine backend."""

    temperature: float = Field(default=1.0, ge=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    max_tokens: int = Field(default=128, ge=1, le=32_768)
    n: int = Field(default=1, ge=1, le=256)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    logprobs: bool = True


class Completion(_Message):
    """One sampled completion, identical in shape for every engine backend."""

    text: str
    token_ids: list[int]
    logprobs: list[float] = Field(description="Log-prob of each sampled token under the sampling policy.")
    finish_reason: Literal["stop", "length", "error", "abort"] = "stop"
    prompt_token_ids: list[int] = Field(default_factory=list)
    weights_version: int = 0
    # For the transformers fallback's JSON enforcement: every rejected attempt and why.
    rejected: list[dict[str, str]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _aligned(self) -> "Completion":
        if self.logprobs and len(self.logprobs) != len(self.token_ids):
            raise ValueError(
                f"logprobs has {len(self.logprobs)} entries but token_ids has {len(self.token_ids)}"
            )
        return self


class PlanSample(_Message):
    """One of the G samples the Action agent draws for a task: the parsed plan (or why not)
    plus what the learner needs (token ids and the sampling policy's log-probs)."""

    plan: Plan | None
    completion: Completion
    error: str | None = None
    prompt: str = ""
    retrieved_ids: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _plan_or_error(self) -> "PlanSample":
        if self.plan is None and not self.error:
            raise ValueError("error must say why when plan is None")
        return self


# --------------------------------------------------------------------------- agent calls


class ActionRequest(_Message):
    """Everything the Action agent needs for one task."""

    task: Task
    memory: list["MemoryHit"] = Field(default_factory=list, description="Retrieved episodes for the prompt.")
    vocabulary: list[str] | None = Field(default=None, description="The world's admissible actions, if it has any.")
    seed: int | None = Field(default=None, description="Sampling seed of the task's G samples.")


class Outcome(_Message):
    """One finished episode as the Curriculum sees it."""

    phase: int = Field(ge=1, le=3)
    success: bool
    goal: str = ""
    reward: float = 0.0
    caption: str = ""


class Proposal(_Message):
    """The Curriculum's answer: the next tasks, its new state, and where each task came from."""

    tasks: list[Task]
    state: "CurriculumState"
    sources: list[Literal["llm", "generator", "free_text"]] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


# --------------------------------------------------------------------------- episodes


def episode_id(run_id: str, task_id: str, sample_index: int) -> str:
    """Deterministic episode id: the same run, task and sample always give the same id,
    so writes are idempotent and a resumed run can tell what it already has."""
    if sample_index < 0:
        raise ValueError(f"sample_index must be >= 0, got {sample_index}")
    h = hashlib.sha256(f"{run_id}\x1f{task_id}\x1f{sample_index}".encode()).hexdigest()
    return f"ep-{h[:24]}"


class Episode(_Message):
    """Everything memory and the learner keep about one (task, sample)."""

    id: str
    run_id: str = Field(min_length=1)
    task: Task
    sample_index: int = Field(ge=0)
    group_id: str = Field(description="Episodes of one task share a group (GRPO).")
    status: Literal["ok", "failed"] = "ok"
    failure_reason: str | None = None
    round: int = Field(default=0, ge=0, description="Curriculum round that proposed the task.")
    attempt: int = Field(default=1, ge=1, description="1 for the first try; resume retries failed episodes.")
    plan: Plan | None = None
    plan_error: str | None = Field(default=None, description="Why the sample has no plan (unparseable output).")
    raw_output: str = ""
    rollout: Rollout | None = None
    verdict: Verdict | None = None
    policy_version: int = Field(default=0, ge=0)
    prompt: str = ""
    prompt_token_ids: list[int] = Field(default_factory=list)
    completion_token_ids: list[int] = Field(default_factory=list)
    completion_logprobs: list[float] = Field(default_factory=list)
    retrieved_ids: list[str] = Field(default_factory=list)
    created_at: float = 0.0

    @model_validator(mode="after")
    def _id_matches(self) -> "Episode":
        expected = episode_id(self.run_id, self.task.id, self.sample_index)
        if self.id != expected:
            raise ValueError(
                f"id {self.id!r} does not match run_id/task.id/sample_index (expected {expected!r})"
            )
        if self.status == "failed" and not self.failure_reason:
            raise ValueError("failure_reason must be set when status is 'failed'")
        return self

    @classmethod
    def new(cls, run_id: str, task: Task, sample_index: int, **kw: Any) -> "Episode":
        return cls(
            id=episode_id(run_id, task.id, sample_index),
            run_id=run_id,
            task=task,
            sample_index=sample_index,
            group_id=kw.pop("group_id", f"{run_id}:{task.id}"),
            **kw,
        )

    @property
    def reward(self) -> float:
        return self.verdict.reward if self.verdict else 0.0

    @property
    def success(self) -> bool:
        return bool(self.verdict and self.verdict.success)

    def summary(self) -> "EpisodeSummary":
        """The one flat view of this episode (ledger rows, memory columns, benchmarks)."""
        v, r = self.verdict, self.rollout
        return EpisodeSummary(
            id=self.id, run_id=self.run_id, task_id=self.task.id, group_id=self.group_id,
            sample=self.sample_index, round=self.round, attempt=self.attempt, goal=self.task.goal,
            phase=self.task.phase, split=self.task.split, status=self.status, failure=self.failure_reason,
            success=self.success, reward=round(self.reward, 4),
            scores=v.scores.as_dict() if v else None, caption=v.state_caption if v else "",
            notes=(v.notes if v else [])[:5], plan=self.plan.actions if self.plan else None,
            plan_error=self.plan_error, gif=r.gif_uri if r else None, video=r.video_uri if r else None,
            policy_version=self.policy_version, created_at=self.created_at,
        )


class EpisodeSummary(_Message):
    """The flat view of one :class:`Episode`: what the ledger (``metrics.jsonl``) records per
    episode, what memory keeps as columns, and what benchmarks tabulate. Built only by
    :meth:`Episode.summary`."""

    id: str
    run_id: str
    task_id: str
    group_id: str
    sample: int = Field(ge=0)
    round: int = Field(ge=0)
    attempt: int = Field(ge=1)
    goal: str
    phase: int = Field(ge=1, le=3)
    split: str
    status: Literal["ok", "failed"]
    failure: str | None = None
    success: bool
    reward: float
    scores: dict[str, float] | None = None
    caption: str = ""
    notes: list[str] = Field(default_factory=list)
    plan: list[str] | None = None
    plan_error: str | None = None
    gif: str | None = None
    video: str | None = None
    policy_version: int = Field(ge=0)
    created_at: float = 0.0


class EpisodeRow(EpisodeSummary):
    """One episode line of the ledger: the summary plus what the driver measured."""

    kind: Literal["episode"] = "episode"
    t: float = Field(description="Wall time the row was written.")
    latency_s: float = Field(default=0.0, ge=0.0, description="Seconds from dispatch to commit.")
    memory_hits: int = Field(default=0, ge=0, description="Episodes retrieved for the prompt.")


class EventRow(_Message):
    """One event line of the ledger (resume, phase change, failures the run survived, ...)."""

    model_config = ConfigDict(extra="allow")
    kind: Literal["event"] = "event"
    t: float
    event: str


class RoundRow(_Message):
    """One line of ``tasks.jsonl``: a whole round's tasks, written before any is dispatched
    (one line, so a round is recorded entirely or not at all)."""

    kind: Literal["round"] = "round"
    round: int = Field(ge=0)
    tasks: list[Task]
    sources: list[str]
    t: float = 0.0

    @model_validator(mode="after")
    def _aligned(self) -> "RoundRow":
        if len(self.sources) != len(self.tasks):
            raise ValueError(f"sources has {len(self.sources)} entries for {len(self.tasks)} tasks")
        return self


class MemoryHit(_Message):
    """One retrieved episode, summarised for the Action agent's prompt."""

    episode_id: str
    goal: str
    phase: int
    plan: list[str]
    success: bool
    reward: float
    caption: str = ""
    feedback: str = ""
    score: float = 0.0


class CurriculumState(_Message):
    """What the curriculum persists: its phase, the outcomes of the current stay in that phase
    (what the promotion rule reads), recent outcomes per phase (for prompts and reports), and
    every phase change."""

    phase: int = Field(default=1, ge=1, le=3)
    stay: list[bool] = Field(default_factory=list, description="Outcomes of this phase since entering it.")
    history: dict[int, list[bool]] = Field(default_factory=dict)
    promotions: list[dict[str, Any]] = Field(default_factory=list)
    fallbacks: int = 0
    proposed: int = 0


# --------------------------------------------------------------------------- learner


class ScoredGroup(_Message):
    """The G reward-scored completions of one task: one GRPO group, as the buffer stores it.

    ``prompt_token_ids`` is either one prompt shared by every sample (``list[int]``) or one
    prompt per sample (``list[list[int]]``). ``rollout_logprobs[i][t]`` is the sampling
    engine's log-prob of ``completion_token_ids[i][t]``. ``policy_version`` is the weights
    version that generated the group (the oldest one if samples straddle a weight update).
    ``reference_image`` is set when the prompt token ids hold image placeholder tokens.
    """

    group_id: str = Field(min_length=1)
    task_id: str = Field(min_length=1)
    policy_version: int = Field(ge=0)
    prompt_token_ids: list[int] | list[list[int]]
    completion_token_ids: list[list[int]] = Field(min_length=1)
    rollout_logprobs: list[list[float]]
    rewards: list[float]
    episode_ids: list[str]
    reference_image: str | None = Field(
        default=None,
        description="Path or URI of the image the prompt showed (vision-language policies): the learner "
        "re-creates the image inputs from it to recompute the log-probs.",
    )

    @model_validator(mode="after")
    def _aligned(self) -> "ScoredGroup":
        n = len(self.completion_token_ids)
        for name in ("rollout_logprobs", "rewards", "episode_ids"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, expected {n} (one per completion)")
        if self.prompt_token_ids and isinstance(self.prompt_token_ids[0], list) and len(self.prompt_token_ids) != n:
            raise ValueError(f"prompt_token_ids has {len(self.prompt_token_ids)} per-sample prompts, expected {n}")
        for i, (ids, lps) in enumerate(zip(self.completion_token_ids, self.rollout_logprobs)):
            if len(ids) != len(lps):
                raise ValueError(
                    f"rollout_logprobs[{i}] has {len(lps)} entries but completion_token_ids[{i}] has {len(ids)}"
                )
        for i, r in enumerate(self.rewards):
            if r != r or r in (float("inf"), float("-inf")):
                raise ValueError(f"rewards[{i}] must be finite, got {r}")
        return self

    @property
    def num_samples(self) -> int:
        return len(self.completion_token_ids)

    def prompt_for(self, i: int) -> list[int]:
        """The prompt token ids of sample ``i`` (the shared prompt or its own)."""
        p = self.prompt_token_ids
        return list(p[i]) if p and isinstance(p[0], list) else list(p)  # type: ignore[arg-type]

    def reward_stats(self) -> dict[str, float]:
        """``mean``, ``std`` (population), ``min``, ``max`` of the rewards."""
        r = self.rewards
        mean = sum(r) / len(r)
        std = (sum((x - mean) ** 2 for x in r) / len(r)) ** 0.5
        return {"mean": mean, "std": std, "min": min(r), "max": max(r)}


ActionRequest.model_rebuild()
Proposal.model_rebuild()



# --------------------------------------------------------------------------- imagination
# Planning by imagination (agents/planner.py), step-wise worlds (world/stepwise.py), datasets/video_action.py.
Method = Literal["single", "best_of_n", "cem"]


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


class PlanRequest(_Message):
    """A goal (or a full task) to plan for; an optional reference image as a URI or base64 bytes.
    ``num_candidates`` / ``iterations`` may lower, never raise, the configured budgets."""

    goal: str | None = Field(default=None, max_length=MAX_GOAL_CHARS)
    task: Task | None = None
    phase: int = Field(default=1, ge=1, le=3)
    reference_image: str | None = None
    reference_image_b64: str | None = None
    method: Method | None = None
    num_candidates: int | None = Field(default=None, ge=1)
    iterations: int | None = Field(default=None, ge=1)
    seed: int | None = None

    @model_validator(mode="after")
    def _one_each(self) -> "PlanRequest":
        if (self.goal is None or not self.goal.strip()) == (self.task is None):
            raise ValueError("give exactly one of 'goal' (non-empty text) or 'task'")
        if self.reference_image is not None and self.reference_image_b64 is not None:
            raise ValueError("give at most one of 'reference_image' and 'reference_image_b64'")
        return self


class PlanCandidate(_Message):
    """One imagined plan and the frozen critic's judgement (``cached``: a repeat, no world call)."""

    plan: Plan
    source: Literal["policy", "cem"]
    iteration: int = Field(ge=0)
    reward: float = Field(default=0.0, ge=0.0, le=1.0)
    success: bool = False
    scores: Scores | None = None
    video_uri: str | None = None
    error: str | None = None
    cached: bool = False


class SearchIteration(_Message):
    """One search round: candidates, world calls and policy samples spent, elite threshold, refit entropy."""

    iteration: int = Field(ge=0)
    candidates: list[PlanCandidate] = Field(default_factory=list)
    world_calls: int = Field(default=0, ge=0)
    policy_samples: int = Field(default=0, ge=0)
    invalid: int = Field(default=0, ge=0)
    elite_threshold: float | None = None
    entropy: float | None = None
    elapsed_s: float = Field(default=0.0, ge=0.0)


class PlanResult(_Message):
    """The planner's answer: best plan, its imagined rollout and verdict, and the search trace."""

    task: Task
    method: Method
    best: PlanCandidate | None = None
    rollout: Rollout | None = None
    verdict: Verdict | None = None
    trace: list[SearchIteration] = Field(default_factory=list)
    world_calls: int = Field(default=0, ge=0)
    policy_samples: int = Field(default=0, ge=0)
    elapsed_s: float = Field(default=0.0, ge=0.0)
    stopped: Literal["budget", "time", "success", "converged", "no_plan"] = "budget"


Rollout.model_rebuild()


# --------------------------------------------------------------------------- dashboard and report


class LearnerStep(_Message):
    """What the learner reports of one optimizer step, as the run's ledger keeps it
    (a ``kind: "learner"`` line of ``metrics.jsonl``; the report draws the learning curve
    from these). Built from the metrics dict the learner reports with :meth:`from_metrics`."""

    kind: Literal["learner"] = "learner"
    t: float = Field(description="Wall-clock time of the step (seconds since the epoch).")
    step: int = Field(ge=0, description="Optimizer steps taken so far.")
    policy_version: int = Field(ge=0, description="Policy version after the step.")
    loss: float | None = None
    reward_mean: float | None = None
    kl: float | None = Field(default=None, description="k3 KL to the reference (only when beta > 0).")
    grad_norm: float | None = None
    staleness_mean: float | None = None
    idle_frac: float | None = Field(default=None, ge=0.0, le=1.0)

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any], t: float) -> "LearnerStep":
        """Keep the fields of this model that ``metrics`` has (other keys are ignored).

        Raises:
            pydantic.ValidationError: ``step`` or ``policy_version`` missing, or a value of
                the wrong type (the error names the field and the value).
        """
        fields = set(cls.model_fields) - {"kind", "t"}
        kept = {k: metrics[k] for k in fields if metrics.get(k) is not None}
        for k in ("step", "policy_version"):  # reported as floats by the learner
            if isinstance(kept.get(k), float) and kept[k].is_integer():
                kept[k] = int(kept[k])
        return cls(t=t, **kept)
