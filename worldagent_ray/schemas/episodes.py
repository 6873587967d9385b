"""Engine and agent calls, episodes and their ledger rows, curriculum state, scored groups and learner steps."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from .plans import Plan, Rollout, Task, Verdict
from .text import _Message

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
