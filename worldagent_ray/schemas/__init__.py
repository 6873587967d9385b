"""Typed messages exchanged between every part of WorldAgent-Ray.

This package is the one place of message types (split into modules by topic; import every
name from ``worldagent_ray.schemas``). Every value that crosses a process boundary
(driver <-> Serve deployment, memory actor, buffer, learner) is one of these pydantic v2
models, so a malformed value fails loudly at the boundary with an error that names the
field and the offending value (pydantic's ``ValidationError`` prints both).

The flow of one episode::

    Task --(Action agent)--> Plan --(World model)--> Rollout --(Critic)--> Verdict
         \\_____________________ Episode (kept by memory and the learner) ____________/
"""

from __future__ import annotations

from .text import (  # noqa: F401
    SCORE_DIMENSIONS,
    MAX_GOAL_CHARS,
    MAX_ACTION_CHARS,
    MAX_JSON_CHARS,
    MAX_JSON_DEPTH,
    clean_text,
    JsonRejection,
    load_json,
)
from .plans import (  # noqa: F401
    Phase,
    Task,
    PlanStep,
    Plan,
    PlanParseError,
    parse_plan_json,
    StepStatus,
    StepOutcome,
    GroundTruth,
    StepFrames,
    Rollout,
    Scores,
    Verdict,
)
from .episodes import (  # noqa: F401
    SamplingParams,
    Completion,
    PlanSample,
    ActionRequest,
    Outcome,
    Proposal,
    episode_id,
    Episode,
    EpisodeSummary,
    EpisodeRow,
    EventRow,
    RoundRow,
    MemoryHit,
    CurriculumState,
    ScoredGroup,
    LearnerStep,
)
from .imagination import (  # noqa: F401
    Method,
    PlanRequest,
    PlanCandidate,
    SearchIteration,
    PlanResult,
)

__all__ = [
    "SCORE_DIMENSIONS",
    "MAX_GOAL_CHARS",
    "MAX_ACTION_CHARS",
    "MAX_JSON_CHARS",
    "MAX_JSON_DEPTH",
    "clean_text",
    "JsonRejection",
    "load_json",
    "Phase",
    "Task",
    "PlanStep",
    "Plan",
    "PlanParseError",
    "parse_plan_json",
    "StepStatus",
    "StepOutcome",
    "GroundTruth",
    "StepFrames",
    "Rollout",
    "Scores",
    "Verdict",
    "SamplingParams",
    "Completion",
    "PlanSample",
    "ActionRequest",
    "Outcome",
    "Proposal",
    "episode_id",
    "Episode",
    "EpisodeSummary",
    "EpisodeRow",
    "EventRow",
    "RoundRow",
    "MemoryHit",
    "CurriculumState",
    "ScoredGroup",
    "LearnerStep",
    "Method",
    "PlanRequest",
    "PlanCandidate",
    "SearchIteration",
    "PlanResult",
]
