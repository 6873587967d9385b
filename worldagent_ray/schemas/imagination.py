"""Planning by imagination (agents/planner.py), step-wise worlds and the video-action dataset."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .plans import Plan, Rollout, Scores, Task, Verdict
from .text import MAX_GOAL_CHARS, _Message

# --------------------------------------------------------------------------- imagination
# Planning by imagination (agents/planner.py), step-wise worlds (world/stepwise.py), datasets/video_action.py.
Method = Literal["single", "best_of_n", "cem"]




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
