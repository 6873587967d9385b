"""One pydantic config tree for the whole system, loaded from YAML.

Precedence, lowest to highest:

1. the profile YAML (``local-cpu``, ``gpu-cluster``, or any path);
2. environment variables ``WORLDAGENT__SECTION__FIELD=value`` (double underscores nest);
3. command-line overrides ``section.field=value`` (values parsed as YAML scalars).

Every section forbids unknown fields, and ``Literal`` fields list their allowed values,
so a typo fails with an error that names the field and what it accepts::

    ConfigError: configs/x.yaml: world.backend: Input should be 'sandbox' or 'diffusers'
    (got 'sandbx')
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .schemas import SCORE_DIMENSIONS

PROFILE_DIR = Path(__file__).parent / "configs"
ENV_PREFIX = "WORLDAGENT__"


class ConfigError(ValueError):
    """A config that does not validate; the message names each bad field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- engines


class EngineConfig(_Section):
    """An inference engine. Agents name an engine; agents with the same frozen model share one."""

    backend: Literal["vllm", "transformers", "auto"] = "auto"
    model: str = Field(
        default="smollm2-135m-instruct",
        description="A builtin name (see worldagent_ray.models), a local folder, or a hub id.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int = Field(default=2048, ge=64)
    seed: int = 0
    # vLLM
    gpu_memory_utilization: float = Field(default=0.85, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(default=1, ge=1)
    enforce_eager: bool = True
    kv_cache_gib: float = Field(default=1.0, gt=0.0, description="vLLM-CPU KV cache (GiB).")
    max_num_seqs: int = Field(default=32, ge=1)
    limit_mm_per_prompt: dict[str, int] = Field(default_factory=dict)
    # transformers fallback
    max_json_retries: int = Field(default=3, ge=0, le=20)
    batch_size: int = Field(default=16, ge=1)
    startup_timeout_s: float = Field(default=600.0, gt=0)


# --------------------------------------------------------------------------- agents


class ActionConfig(_Section):
    engine: str = "policy"
    group_size: int = Field(default=4, ge=1, le=64, description="G plans per task.")
    max_steps: int = Field(default=8, ge=1, le=64)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(default=192, ge=16)
    use_memory: bool = True
    memory_top_k: int = Field(default=3, ge=0, le=32)
    constrain_to_vocabulary: bool = True
    system_prompt: str = (
        "You are a household robot planner. Write a short step-by-step plan that achieves the goal. "
        "Answer only with JSON."
    )


class CriticConfig(_Section):
    scorers: list[Literal["verifiable", "text_judge", "vlm_judge"]] = Field(
        default_factory=lambda: ["verifiable", "text_judge"]
    )
    engine: str = "judge"
    reward_weights: dict[str, float] = Field(
        default_factory=lambda: {
            "action_following": 0.15,
            "temporal_consistency": 0.15,
            "object_interaction": 0.1,
            "goal_achievement": 0.5,
            "physics": 0.1,
        }
    )
    success_min_goal: float = Field(default=1.0, ge=0.0, le=1.0)
    success_min_reward: float = Field(default=0.0, ge=0.0, le=1.0)
    num_frames: int = Field(default=4, ge=1, le=64, description="Frames sampled for a VLM judge.")
    max_tokens: int = Field(default=160, ge=16)

    @model_validator(mode="after")
    def _weights(self) -> "CriticConfig":
        bad = set(self.reward_weights) - set(SCORE_DIMENSIONS)
        if bad:
            raise ValueError(
                f"reward_weights has unknown dimension(s) {sorted(bad)}; allowed: {list(SCORE_DIMENSIONS)}"
            )
        if any(w < 0 for w in self.reward_weights.values()):
            raise ValueError(f"reward_weights must be >= 0, got {self.reward_weights}")
        if sum(self.reward_weights.values()) <= 0:
            raise ValueError("reward_weights must sum to a positive number")
        return self


class CurriculumConfig(_Section):
    engine: str = "judge"
    use_llm: bool = True
    start_phase: int = Field(default=1, ge=1, le=3)
    max_phase: int = Field(default=3, ge=1, le=3)
    window: int = Field(default=16, ge=1, description="Episodes per phase the rule looks at.")
    promote_threshold: float = Field(default=0.7, ge=0.0, le=1.0)
    demote_threshold: float = Field(default=0.1, ge=0.0, le=1.0)
    mastered_threshold: float = Field(default=0.9, ge=0.0, le=1.0)
    tasks_per_proposal: int = Field(default=2, ge=1, le=64)
    seed: int = 0

    @model_validator(mode="after")
    def _order(self) -> "CurriculumConfig":
        if self.demote_threshold >= self.promote_threshold:
            raise ValueError(
                f"demote_threshold ({self.demote_threshold}) must be below promote_threshold "
                f"({self.promote_threshold})"
            )
        if self.start_phase > self.max_phase:
            raise ValueError(f"start_phase ({self.start_phase}) exceeds max_phase ({self.max_phase})")
        return self


class AgentsConfig(_Section):
    action: ActionConfig = Field(default_factory=ActionConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)


# --------------------------------------------------------------------------- world


class SandboxConfig(_Section):
    image_size: int = Field(default=128, ge=32, le=1024)
    frames_per_step: int = Field(default=4, ge=1, le=32)
    fps: int = Field(default=8, ge=1, le=60)
    max_steps: int = Field(default=32, ge=1, description="Steps beyond this are recorded as skipped.")
    write_mp4: bool = True
    write_gif: bool = True
    sample_frames: int = Field(default=4, ge=1, le=64, description="PNG frames written for the critic.")
    max_reference_pixels: int = Field(default=4096 * 4096, ge=1, description="Reference images above this are rejected.")


class DiffusersConfig(_Section):
    pipeline: Literal["WanPipeline", "WanImageToVideoPipeline", "auto"] = "auto"
    model: str = Field(default="tiny-wan-t2v", description="Builtin tiny pipeline, folder, or hub id.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    num_inference_steps: int = Field(default=4, ge=1, le=200)
    height: int = Field(default=64, ge=16)
    width: int = Field(default=64, ge=16)
    num_frames: int = Field(default=9, ge=1)
    guidance_scale: float = Field(default=1.0, ge=0.0)
    fps: int = Field(default=8, ge=1)
    max_reference_pixels: int = Field(default=4096 * 4096, ge=1)
    prompt_template: str = "A first-person video of a robot in a kitchen. Goal: {goal}. Steps: {steps}."
    step_joiner: str = ", then "
    enable_cpu_offload: bool = False
    max_videos_per_call: int = Field(
        default=8, ge=1, description="Largest number of videos in one pipeline call (bounds GPU memory)."
    )
    sample_frames: int = Field(default=4, ge=1, le=64, description="PNG frames written per video for the critic.")

    @model_validator(mode="after")
    def _shape(self) -> "DiffusersConfig":
        if self.height % 16 or self.width % 16:
            raise ValueError(f"height and width must be divisible by 16, got {self.height}x{self.width}")
        if (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames must be 4k+1 (e.g. 9, 17, 81), got {self.num_frames}")
        return self


class WorldConfig(_Section):
    backend: Literal["sandbox", "diffusers"] = "sandbox"
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    diffusers: DiffusersConfig = Field(default_factory=DiffusersConfig)
    max_batch_size: int = Field(default=8, ge=1)
    batch_wait_timeout_s: float = Field(default=0.05, ge=0.0)


# --------------------------------------------------------------------------- memory


class MemoryConfig(_Section):
    enabled: bool = True
    uri: str | None = Field(default=None, description="LanceDB URI; default: <run_dir>/memory.")
    table: str = "episodes"
    embedder: str = Field(default="minilm", description="'minilm' (packaged) or a path / hub id.")
    top_k: int = Field(default=3, ge=0, le=64)
    query_type: Literal["vector", "fts", "hybrid"] = "vector"
    optimize_every: int = Field(default=64, ge=1, description="Optimize/compact after this many writes.")


# --------------------------------------------------------------------------- learner


class LearnerConfig(_Section):
    enabled: bool = False
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    epsilon_low: float = Field(default=0.2, ge=0.0)
    epsilon_high: float = Field(default=0.28, ge=0.0)
    beta: float = Field(default=0.0, ge=0.0, description="KL (k3) coefficient; 0 disables the reference.")
    is_correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = (
        "token_truncate"
    )
    is_cap: float = Field(default=3.0, gt=0.0)
    off_policy_delta: float | None = Field(default=None, description="Mask sequences with KL above this.")
    max_staleness: int = Field(default=2, ge=0)
    stale_policy: Literal["drop", "correct"] = "correct"
    drop_zero_variance: bool = True
    buffer_max_groups: int = Field(default=64, ge=1)
    groups_per_step: int = Field(default=2, ge=1)
    lr: float = Field(default=1e-5, gt=0.0)
    lr_warmup_steps: int = Field(default=0, ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    max_steps: int = Field(default=1000, ge=1)
    grad_clip: float = Field(default=1.0, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    gradient_checkpointing: bool = Field(
        default=True, description="Recompute activations in backward: far less memory for ~30% more compute.")
    lora: bool = False
    lora_rank: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    sync_every: int = Field(default=1, ge=1, description="Push weights every k optimizer steps.")
    sync_method: Literal["object_store", "nccl"] = "object_store"
    sync_timeout_s: float = Field(default=120.0, gt=0.0)
    checkpoint_every: int = Field(default=10, ge=1)
    num_workers: int = Field(default=1, ge=1)
    backend: Literal["gloo", "nccl"] = "gloo"
    use_gpu: bool = False
    max_failures: int = Field(default=2, ge=0)
    seed: int = 0


# --------------------------------------------------------------------------- resources


class AutoscalingConfig(_Section):
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=4.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class PartResources(_Section):
    num_cpus: float = Field(default=1.0, ge=0.0)
    num_gpus: float = Field(default=0.0, ge=0.0)
    replicas: int = Field(default=1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    max_ongoing_requests: int = Field(default=32, ge=1)


class ResourcesConfig(_Section):
    """Placement per part. Engines are keyed by engine name, the rest by part name."""

    engines: dict[str, PartResources] = Field(default_factory=dict)
    world: PartResources = Field(default_factory=lambda: PartResources(num_cpus=0.5))
    critic: PartResources = Field(default_factory=lambda: PartResources(num_cpus=0.25))
    memory: PartResources = Field(default_factory=lambda: PartResources(num_cpus=0.25))
    learner: PartResources = Field(default_factory=lambda: PartResources(num_cpus=1.0))
    ray_address: str | None = Field(default=None, description="None: join RAY_ADDRESS or start a local Ray.")
    ray_num_cpus: int | None = Field(default=None, ge=1, description="For a locally started Ray only.")


# --------------------------------------------------------------------------- run


class RunConfig(_Section):
    name: str = Field(default="evolve", pattern=r"^[A-Za-z0-9_.\-]+$")
    root: str = Field(default="runs", description="Run folders are created under this path or URI.")
    seed: int = 0
    iterations: int = Field(default=6, ge=1, description="Curriculum proposals (rounds) in a run.")
    max_inflight: dict[str, int] = Field(
        default_factory=lambda: {"action": 2, "world": 8, "critic": 8, "memory": 16}
    )
    stage_timeout_s: float = Field(default=600.0, gt=0)
    max_retries: int = Field(default=1, ge=0)
    report: bool = True


class Config(_Section):
    """The root of the config tree."""

    profile: str = "custom"
    engines: dict[str, EngineConfig] = Field(
        default_factory=lambda: {"policy": EngineConfig(), "judge": EngineConfig()}
    )
    agents: AgentsConfig = Field(default_factory=AgentsConfig)
    world: WorldConfig = Field(default_factory=WorldConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _engines_exist(self) -> "Config":
        for part, name in (
            ("agents.action.engine", self.agents.action.engine),
            ("agents.critic.engine", self.agents.critic.engine),
            ("agents.curriculum.engine", self.agents.curriculum.engine),
        ):
            if name not in self.engines:
                raise ValueError(f"{part} names engine {name!r}; defined engines: {sorted(self.engines)}")
        return self


# --------------------------------------------------------------------------- loading


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _resolve(profile_or_path: str | os.PathLike[str]) -> Path:
    p = Path(profile_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        return p
    candidate = PROFILE_DIR / f"{profile_or_path}.yaml"
    if not candidate.exists():
        raise ConfigError(
            f"unknown profile {str(profile_or_path)!r}; available: {available_profiles()} (or pass a YAML path)"
        )
    return candidate


def _set_path(tree: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    keys = [k for k in dotted.split(".") if k]
    if not keys:
        raise ConfigError(f"{origin}: empty key in override {dotted!r}")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{origin}: cannot set {dotted!r}: {k!r} is a {type(nxt).__name__}, not a section")
        node = nxt
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str], origin: str = "override") -> None:
    """Apply ``a.b.c=value`` strings; values are parsed as YAML (so ``3``, ``true``, ``[1,2]`` work)."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"{origin} {ov!r} must look like section.field=value")
        key, raw = ov.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{origin} {ov!r}: value is not valid YAML: {e}") from None
        _set_path(tree, key.strip(), value, origin)


def env_overrides(environ: Mapping[str, str] | None = None) -> list[str]:
    environ = os.environ if environ is None else environ
    out = []
    for k, v in sorted(environ.items()):
        if k.startswith(ENV_PREFIX) and len(k) > len(ENV_PREFIX):
            out.append(k[len(ENV_PREFIX):].lower().replace("__", ".") + "=" + v)
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = e["msg"]
        got = e.get("input")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        shown = repr(got)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"{loc}: {msg} (got {shown})")
    return f"invalid config {source}:\n  " + "\n  ".join(lines)


def validate_tree(tree: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_config(
    profile_or_path: str | os.PathLike[str] = "local-cpu",
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Load a profile or YAML file, then apply env and command-line overrides."""
    path = _resolve(profile_or_path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(tree).__name__}")
    tree.setdefault("profile", path.stem)
    apply_overrides(tree, env_overrides(environ), origin="environment override")
    apply_overrides(tree, overrides, origin="override")
    return validate_tree(tree, source=str(path))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
