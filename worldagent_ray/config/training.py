"""Config of learning: the GRPO learner, planning by imagination, the dataset export, offline SFT / DPO."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import _Section

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
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="Training precision: 'auto' is bf16 mixed precision on GPU and float32 on CPU; "
        "'bf16' is bf16 autocast on either (on a CPU with AMX / AVX512-BF16 it is several times faster than "
        "float32); 'fp32' is float32 everywhere. Master weights stay float32; the saved model keeps the base dtype.")


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
