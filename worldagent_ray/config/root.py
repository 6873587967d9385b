"""Config of placement and the run, and the root of the tree (with its whole-tree checks)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from .base import _Section
from .services import (
    AgentsConfig,
    CriticTrainingConfig,
    EngineConfig,
    MemoryConfig,
    WorldConfig,
)
from .training import ExportConfig, LearnerConfig, PlannerConfig, TrainingConfig

# --------------------------------------------------------------------------- resources


class AutoscalingConfig(_Section):
    """Serve autoscaling of one part."""

    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas.")
    max_replicas: int = Field(default=1, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(default=4.0, gt=0, description="Requests per replica Serve aims for.")

    @model_validator(mode="after")
    def _order(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class PartResources(_Section):
    """Placement of one part: what each replica (or worker) reserves, and how many there are."""

    num_cpus: float = Field(default=1.0, ge=0.0, description="CPUs per replica.")
    num_gpus: float = Field(default=0.0, ge=0.0, description="GPUs per replica.")
    custom: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources per replica, e.g. {video_node: 0.01} to pin replicas to the "
        "nodes that declare that resource.",
    )
    replicas: int = Field(default=1, ge=1, description="Replicas (when not autoscaling).")
    autoscaling: AutoscalingConfig | None = Field(default=None, description="Serve autoscaling; overrides replicas.")
    max_ongoing_requests: int = Field(default=32, ge=1, description="Requests one replica serves at once.")


def _part(num_cpus: float, **kw: Any) -> Any:
    return lambda: PartResources(num_cpus=num_cpus, **kw)


class ResourcesConfig(_Section):
    """Placement per part. Engines are keyed by engine name, the rest by part name."""

    engines: dict[str, PartResources] = Field(
        default_factory=dict, description="Per engine name (a key of `engines`)."
    )
    action: PartResources = Field(default_factory=_part(0.1, max_ongoing_requests=64),
                                  description="The Action deployment (light: the engine does the work).")
    curriculum: PartResources = Field(default_factory=_part(0.1), description="The Curriculum deployment.")
    world: PartResources = Field(default_factory=_part(0.5), description="World-model replicas.")
    critic: PartResources = Field(default_factory=_part(0.25), description="Critic replicas.")
    memory: PartResources = Field(default_factory=_part(0.25), description="The memory actor.")
    learner: PartResources = Field(default_factory=_part(1.0), description="Each learner worker.")
    planner: PartResources = Field(default_factory=_part(0.1), description="The planner deployment (light: it waits on the others).")
    ray_address: str | None = Field(default=None, description="None: join RAY_ADDRESS or start a local Ray.")
    ray_num_cpus: int | None = Field(default=None, ge=1, description="For a locally started Ray only.")

    @model_validator(mode="after")
    def _actors_do_not_scale(self) -> "ResourcesConfig":
        for part, hint in (("memory", "one memory actor owns the table"),
                           ("learner", "set learner.num_workers for data-parallel workers")):
            res = getattr(self, part)
            if res.autoscaling is not None or res.replicas != 1:
                raise ValueError(f"resources.{part} takes no replicas or autoscaling ({hint})")
        return self


# --------------------------------------------------------------------------- run


class StageLimits(_Section):
    """Concurrency of one pipeline stage."""

    workers: int = Field(ge=1, description="Groups this stage works on at once.")
    queue: int = Field(ge=1, description="Groups waiting before this stage; a full queue pushes back.")


class PipelineConfig(_Section):
    """The driver's stages, each a pool of workers on a bounded queue."""

    action: StageLimits = Field(default_factory=lambda: StageLimits(workers=2, queue=2), description="Action stage.")
    world: StageLimits = Field(default_factory=lambda: StageLimits(workers=8, queue=8), description="World stage.")
    critic: StageLimits = Field(default_factory=lambda: StageLimits(workers=8, queue=8), description="Critic stage.")


class RunConfig(_Section):
    """One run of the loop: where it writes, how long it runs, and its failure handling."""

    name: str = Field(default="evolve", pattern=r"^[A-Za-z0-9_.\-]+$", description="Prefix of the run folder.")
    root: str = Field(default="runs", description="Run folders are created under this path or URI.")
    seed: int = Field(default=0, description="Seed of the run (sampling seeds derive from it).")
    iterations: int = Field(default=6, ge=1, description="Curriculum proposals (rounds) in a run.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="Stage concurrency.")
    stage_timeout_s: float = Field(default=600.0, gt=0, description="Timeout of one Action, World, Critic or Curriculum call.")
    memory_timeout_s: float = Field(default=60.0, gt=0, description="Timeout of one memory or learner call.")
    max_retries: int = Field(default=3, ge=0, description="Retries of a failed call before its group fails.")
    retry_backoff_s: float = Field(
        default=2.0, ge=0, description="First retry delay; it doubles per retry (capped at 30 s)."
    )
    max_attempts: int = Field(
        default=2, ge=1, description="Attempts per episode: --resume retries failed episodes until this many."
    )
    watchdog_timeouts: int = Field(
        default=3, ge=1,
        description="End the run (resumable) when no stage finishes a call for this many stage timeouts.",
    )
    lookahead_rounds: int = Field(
        default=2, ge=1, description="Rounds in flight at once: later rounds wait, so the curriculum sees outcomes."
    )
    deploy_timeout_s: float = Field(
        default=1800.0, gt=0,
        description="Bound of the wait for the Serve applications to be RUNNING (model downloads included); "
                    "an application whose replicas cannot start (DEPLOY_FAILED) is reported at once.",
    )
    report: bool = Field(default=True, description="Write report.html at the end.")



class Config(_Section):
    """The root of the config tree."""

    profile: str = Field(default="custom", description="Name of the profile this tree came from.")
    engines: dict[str, EngineConfig] = Field(
        default_factory=lambda: {"policy": EngineConfig(), "judge": EngineConfig()},
        description="Inference engines by name; agents refer to them by name.",
    )
    agents: AgentsConfig = Field(default_factory=AgentsConfig, description="Action, Critic and Curriculum.")
    world: WorldConfig = Field(default_factory=WorldConfig, description="The world model.")
    memory: MemoryConfig = Field(default_factory=MemoryConfig, description="World memory.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="The GRPO learner.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Offline SFT / DPO of the Action policy.")
    planner: PlannerConfig = Field(default_factory=PlannerConfig, description="Planning by imagination.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="The video-action dataset export.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Placement of every part.")
    run: RunConfig = Field(default_factory=RunConfig, description="The run.")
    critic_training: CriticTrainingConfig = Field(default_factory=CriticTrainingConfig, description="Critic training.")

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        a = self.agents
        for part, name in (
            ("agents.action.engine", a.action.engine),
            ("agents.critic.engine", a.critic.engine),
            ("agents.curriculum.engine", a.curriculum.engine),
        ):
            if name not in self.engines:
                raise ValueError(f"{part} names engine {name!r}; defined engines: {sorted(self.engines)}")
        unknown = sorted(set(self.resources.engines) - set(self.engines))
        if unknown:
            raise ValueError(f"resources.engines has {unknown}, which are not engines; defined: {sorted(self.engines)}")
        for part, tokens, engine in (
            ("agents.action.max_tokens", a.action.max_tokens, a.action.engine),
            ("agents.critic.max_tokens", a.critic.max_tokens, a.critic.engine),
        ):
            limit = self.engines[engine].max_model_len
            if tokens >= limit:
                raise ValueError(
                    f"{part} ({tokens}) must be below engines.{engine}.max_model_len ({limit}), "
                    "leaving room for the prompt"
                )
        if "vlm_judge" in a.critic.scorers:
            limit = self.engines[a.critic.engine].limit_mm_per_prompt.get("image")
            need = a.critic.num_frames + (1 if self.world.reference_scene else 0)
            if limit is not None and limit < need:
                raise ValueError(
                    f"engines.{a.critic.engine}.limit_mm_per_prompt.image ({limit}) is below the images a VLM "
                    f"judge sends: agents.critic.num_frames ({a.critic.num_frames})"
                    + (" + 1 reference image (world.reference_scene)" if self.world.reference_scene else "")
                )
        if self.learner.sync_method == "collective" and self.learner.backend == "nccl" and not self.learner.use_gpu:
            raise ValueError("learner.sync_method=collective with backend=nccl needs learner.use_gpu=true")
        if self.learner.backend == "nccl" and not self.learner.use_gpu:
            raise ValueError("learner.backend=nccl needs learner.use_gpu=true (use gloo on CPU)")
        return self


def used_engines(cfg: Config) -> list[str]:
    """The engines a run starts: the Action policy's, the critic's when a judge scorer is on,
    the curriculum's when it proposes with an LLM (each once, in that order)."""
    a = cfg.agents
    names = [a.action.engine]
    if any(s in ("text_judge", "vlm_judge") for s in a.critic.scorers):
        names.append(a.critic.engine)
    if a.curriculum.use_llm:
        names.append(a.curriculum.engine)
    return list(dict.fromkeys(names))
