"""The asynchronous GRPO learner's pure training core (no Ray).

:class:`LearnerCore` is plain PyTorch + transformers (+ peft for LoRA). It owns the policy,
the optimizer, the LR schedule and the policy version, and takes one GRPO optimizer step per
call of :meth:`LearnerCore.step` on a list of reward-scored groups. The Ray Train shell that
runs it (pulling from the buffer actor, checkpointing, publishing weights) is
:mod:`worldagent_ray.runtime.learner_trainer`. Loading (causal LMs and vision-language
models, builtin names, folders and hub ids, LoRA) is :mod:`worldagent_ray.rl.policy`;
batching and the vision inputs are :mod:`worldagent_ray.rl.batch`.

Data parallelism (DDP or FSDP under ``torch.distributed``): every rank is given *all* groups of
the step, builds the same batch and the same group advantages, and trains on its own slice of
rows (:func:`~worldagent_ray.rl.batch.shard_rows`). Its loss is scaled so that the gradients,
averaged over ranks by DDP/FSDP, equal those of one process on the whole batch, for every
``loss_type``: ``grpo``/``dr_grpo`` by ``world_size * rows_local / rows``, ``bnpo`` by
``world_size * tokens_local / tokens``, ``dapo`` through its normaliser ``tokens / world_size``.
A rank with no rows (fewer rows than ranks) runs one row with weight 0 so that every rank
enters the same collectives.

Off-policy convention (documented because it matters for correctness)::

    old_logps  = logps.detach()          (TRL's single-iteration convention: ratio r = 1 in value,
                                          the gradient is the policy gradient; clipping is inert)
    is_weights = importance_weights(old_logps, rollout_logps, mask, cfg.is_correction, cfg.is_cap)

i.e. the "proximal" policy of AReaL's decoupled objective is the learner's current weights, and
the mismatch with the policy that *sampled* the tokens (an older version, or vLLM's numerics)
is corrected by truncated/masked importance weights pi_learner / pi_rollout. With
``cfg.is_correction == "none"`` there is no IS weight; the ratio is instead taken against
the rollout log-probs (``old_logps = rollout_logps`` where the engine reported them), so that
PPO clipping bounds the update of stale samples. Rollout log-probs must be computed at the
sampling temperature that the learner is given (``temperature``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..config import FSDP_LORA_REFUSAL, LearnerConfig
from .batch import ImageInputs, LearnerBatch, collate_groups, shard_rows
from .dpo import dpo_term
from .grpo import group_advantages, grpo_loss, importance_weights, off_policy_mask, token_logprobs
from .policy import LORA_TARGET_MODULES, default_dtype, load_policy
from .policy import open_image as default_open_image
from .state import peft_module_names, rng_state, seed_everything, set_rng_state
from .weight_sync import LORA_SCALING_KEY

logger = logging.getLogger(__name__)

__all__ = [
    "LORA_TARGET_MODULES",
    "LORA_SCALING_KEY",
    "LearnerBatch",
    "LearnerCore",
    "collate_groups",
    "is_fsdp",
    "lr_lambda",
]

MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"
TRAINER_STATE_FILE = "trainer_state.pt"
LEARNER_STATE_FILE = "learner_state.json"


# --------------------------------------------------------------------------- schedule


def lr_lambda(step: int, *, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear warmup from ``1/(warmup+1)``
    to 1 over ``warmup_steps`` steps, then ``constant`` (1), ``linear`` (down to 0 at
    ``total_steps``) or ``cosine`` (half a cosine down to 0 at ``total_steps``)."""
    if step < warmup_steps:
        return float(step + 1) / float(warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, float(step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_schedule must be 'constant', 'cosine' or 'linear', got {schedule!r}")


# --------------------------------------------------------------------------- core


def _rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_fsdp(model: torch.nn.Module) -> bool:
    """True if ``model`` is sharded by FSDP (``FullyShardedDataParallel`` or ``fully_shard``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        return True
    return any(type(m).__name__.startswith("FSDP") for m in model.modules())


@dataclass
class _Rows:
    """One rank's rows of a step, as further loss terms need them."""

    logps: Tensor  # [b, T], with gradient
    ref_logps: Tensor | None  # [b, T], frozen reference (beta > 0 or dpo_coef > 0)
    mask: Tensor
    rewards: Tensor
    group_index: Tensor
    weight: float  # 0 for the stand-in row of a rank without rows


class LearnerCore:
    """One GRPO policy under training: model, optimizer, schedule and policy version.

    Args:
        cfg (`LearnerConfig`): loss, optimizer, LoRA and off-policy settings.
        model (`str`): a builtin name, a local Hugging Face folder, or a hub id (see
            :func:`worldagent_ray.rl.policy.load_policy`); causal LM or vision-language model.
        temperature (`float`): the sampling temperature of the rollouts (log-probs are taken
            at this temperature, as TRL does).
        device (`str | torch.device`): where the model lives.
        dtype (`torch.dtype | None`): parameter dtype. ``None``: float32 on CPU; on CUDA
            bfloat16 base weights with LoRA (peft keeps the adapters in float32), and float32
            master weights under bfloat16 autocast for full fine-tuning.
        wrap_model (`Callable | None`): applied to the policy before the optimizer is built,
            e.g. ``ray.train.torch.prepare_model`` (DDP) or an FSDP wrapper. The unwrapped
            module stays reachable as :attr:`module`.
        pad_token_id (`int | None`): padding id; defaults to the model config's, else 0.
        open_image (`Callable[[str], PIL.Image] | None`): reads a group's ``reference_image``
            (vision models); default :func:`worldagent_ray.rl.policy.open_image`.

    Example::

        core = LearnerCore(LearnerConfig(lr=1e-4), "tiny-random-llama")
        metrics = core.step(groups)          # one optimizer step; core.policy_version += 1
        engine.load_weights(core.export_weights(), core.policy_version)
    """

    def __init__(
        self,
        cfg: LearnerConfig,
        model: str,
        *,
        temperature: float = 1.0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        pad_token_id: int | None = None,
        open_image: Callable[[str], Any] | None = None,
    ):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.cfg = cfg
        self.temperature = float(temperature)
        self.device = torch.device(device)
        self.step_count = 0
        self.policy_version = 0
        seed_everything(cfg.seed)
        if dtype is None:
            dtype = default_dtype(self.device) if cfg.lora else torch.float32
        self._autocast = self.device.type == "cuda" and dtype == torch.float32
        loaded = load_policy(
            str(model), device=self.device, dtype=dtype, gradient_checkpointing=cfg.gradient_checkpointing,
            lora=cfg.lora, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
        )
        self.module = loaded.module
        self.model_path = loaded.path
        self.vision = loaded.vision
        self.images = (
            ImageInputs(loaded.image_processor, loaded.image_token_id, open_image or default_open_image)
            if loaded.vision and loaded.image_token_id is not None else None
        )
        if pad_token_id is None:
            pad_token_id = getattr(self.module.config, "pad_token_id", None)
            if pad_token_id is None and hasattr(self.module.config, "get_text_config"):
                pad_token_id = getattr(self.module.config.get_text_config(), "pad_token_id", None)
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else 0
        self.ref_module = self._make_reference() if (cfg.beta > 0 or cfg.dpo_coef > 0) else None
        self.model = wrap_model(self.module) if wrap_model is not None else self.module
        self.sharded = is_fsdp(self.model)
        if self.sharded and cfg.lora:
            raise ValueError(FSDP_LORA_REFUSAL)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError(f"model {model!r} has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_lambda(
                s, schedule=cfg.lr_schedule, warmup_steps=cfg.lr_warmup_steps, total_steps=cfg.max_steps
            ),
        )

    # ------------------------------------------------------------------ model

    def _make_reference(self) -> torch.nn.Module | None:
        """The frozen reference for the KL term. With LoRA the base model *is* the reference
        (adapters disabled), so no copy is made and ``None`` is returned."""
        if self.cfg.lora:
            return None
        ref = copy.deepcopy(self.module).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    @property
    def lora_scaling(self) -> float | None:
        """``lora_alpha / lora_rank`` with LoRA, else ``None``."""
        return self.cfg.lora_alpha / self.cfg.lora_rank if self.cfg.lora else None

    def _completion_logps(self, model: torch.nn.Module, batch: LearnerBatch) -> Tensor:
        """Log-probs ``[B, T]`` of the completion tokens; only the last ``T + 1`` logits are built.

        Prompts with an image get their vision inputs back (``pixel_values``, ``image_grid_thw``
        and the token types from which Qwen-VL builds its 3-D rope positions); text prompts get
        explicit positions that skip the left padding."""
        T = batch.completion_len
        kwargs: dict[str, Any] = dict(
            input_ids=batch.input_ids.to(self.device),
            attention_mask=batch.attention_mask.to(self.device),
            logits_to_keep=T + 1,
            use_cache=False,
        )
        vision = self.images(batch) if self.images is not None else None
        if vision is not None:
            kwargs.update({k: v.to(self.device) for k, v in vision.items()})
        else:
            kwargs["position_ids"] = batch.position_ids.to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self._autocast):
            out = model(**kwargs)
        logits = out.logits[:, -(T + 1) :].float()
        ids = batch.input_ids[:, -(T + 1) :].to(self.device)
        return token_logprobs(logits, ids, self.temperature)

    @torch.no_grad()
    def _reference_logps(self, batch: LearnerBatch) -> Tensor:
        if self.cfg.lora:
            with self.module.disable_adapter():
                return self._completion_logps(self.module, batch)
        assert self.ref_module is not None
        return self._completion_logps(self.ref_module, batch)

    # ------------------------------------------------------------------ step

    def step(self, groups: Sequence[Any], stale_flags: Sequence[bool] | None = None) -> dict[str, float]:
        """Take one GRPO optimizer step on ``groups`` and bump :attr:`policy_version`.

        Under ``torch.distributed`` every rank must call it with the same ``groups`` (it trains
        on its own rows, see the module docstring).

        Args:
            groups: :class:`~worldagent_ray.schemas.ScoredGroup` items (one per prompt).
            stale_flags: per group, whether the buffer marked it stale (older than
                ``cfg.max_staleness``); only counted in the metrics, because the IS weights
                already correct every group for the policy that sampled it.

        Returns:
            Metrics: ``loss`` (the whole batch's, on every rank), ``reward_mean``,
            ``reward_std``, ``staleness_mean``, ``staleness_max``, ``stale_frac``,
            ``zero_variance_frac``, ``grad_norm``, ``lr``, ``policy_version`` (after the step),
            ``step``, ``num_sequences`` and the loss metrics of
            :func:`~worldagent_ray.rl.grpo.grpo_loss` (of this rank's rows); with
            ``cfg.dpo_coef > 0`` the loss includes ``dpo_coef`` times the DPO term of
            :func:`~worldagent_ray.rl.dpo.dpo_term` (against the frozen reference: a copy of the
            initial weights, or the base model under LoRA; token log-probs at the learner's
            ``temperature``) and the ``dpo_*`` metrics. With several ranks the DPO pairs are
            formed within each rank's rows (a group split across ranks pairs its rows on each
            side), so only the GRPO term is exactly the single-process one there.
        """
        if stale_flags is not None and len(stale_flags) != len(groups):
            raise ValueError(f"stale_flags has {len(stale_flags)} entries for {len(groups)} groups")
        batch = collate_groups(groups, self.policy_version, self.pad_token_id)
        advantages = group_advantages(batch.rewards, batch.group_index, self.cfg.scale_rewards)
        self.model.train()
        loss, loss_metrics, rows = self._grpo_loss(batch, advantages)
        if self.cfg.dpo_coef > 0:  # seed 000's L = L_GRPO + lambda * L_DPO on each group's best/worst pair
            dpo, dpo_metrics = dpo_term(rows.logps, rows.ref_logps, rows.mask, rows.rewards, rows.group_index,
                                        beta=self.cfg.dpo_beta, loss_type=self.cfg.dpo_loss_type,
                                        margin=self.cfg.dpo_margin)
            loss = loss + self.cfg.dpo_coef * rows.weight * dpo
            loss_metrics = {**loss_metrics, **dpo_metrics}
        grad_norm, lr = self._optimizer_step(loss)
        self.step_count += 1
        self.policy_version += 1
        return self._metrics(batch, self._whole_batch_loss(loss), loss_metrics, grad_norm, lr, stale_flags)

    def _grpo_loss(self, batch: LearnerBatch, advantages: Tensor) -> tuple[Tensor, dict[str, float], "_Rows"]:
        """This rank's share of the GRPO loss of ``batch`` (see the module docstring), its loss
        metrics, and its rows' log-probs for further loss terms."""
        cfg = self.cfg
        rank, world = _rank_world()
        rows, weight = shard_rows(batch.num_rows, rank, world), 1.0
        if not rows:  # fewer rows than ranks: one row with weight 0 keeps the collectives matched
            rows, weight = [0], 0.0
        local = batch.rows(rows)
        mask = local.completion_mask.to(self.device)
        rollout = local.rollout_logps.to(self.device)
        adv = advantages[rows].to(self.device)
        logps = self._completion_logps(self.model, local)
        current = logps.detach()
        is_weights = None
        if cfg.is_correction != "none":
            old_logps = current
            is_weights = importance_weights(current, rollout, mask, cfg.is_correction, cfg.is_cap)
        else:
            old_logps = torch.where(torch.isnan(rollout), current, rollout)
        keep = None
        if cfg.off_policy_delta is not None:
            keep = off_policy_mask(adv, current, rollout, mask, cfg.off_policy_delta)
        ref_logps = self._reference_logps(local) if (cfg.beta > 0 or cfg.dpo_coef > 0) else None
        tokens = float(batch.completion_mask.sum())
        loss, metrics = grpo_loss(
            logps,
            old_logps,
            adv,
            mask,
            loss_type=cfg.loss_type,
            epsilon_low=cfg.epsilon_low,
            epsilon_high=cfg.epsilon_high,
            ref_logps=ref_logps if cfg.beta > 0 else None,
            beta=cfg.beta,
            is_weights=is_weights,
            max_completion_length=batch.completion_len,
            num_items_in_batch=tokens / world if cfg.loss_type == "dapo" else None,
            keep_mask=keep,
        )
        if cfg.loss_type in ("grpo", "dr_grpo"):
            share = world * len(rows) / batch.num_rows
        elif cfg.loss_type == "bnpo":
            share = world * float(local.completion_mask.sum()) / max(1.0, tokens)
        else:  # dapo: the normaliser above already is the whole batch's
            share = 1.0
        rows_out = _Rows(logps, ref_logps, mask, local.rewards.to(self.device), local.group_index, weight)
        return loss * (share * weight), metrics, rows_out

    def _optimizer_step(self, loss: Tensor) -> tuple[float, float]:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if hasattr(self.model, "clip_grad_norm_"):  # FSDP1: the norm over every rank's shard
            grad_norm = self.model.clip_grad_norm_(self.cfg.grad_clip)
        else:  # DTensor-aware for FSDP2
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm), lr

    def _whole_batch_loss(self, loss: Tensor) -> Tensor:
        """The single-process loss of the whole batch: the mean over ranks of their scaled shares."""
        _, world = _rank_world()
        total = loss.detach().float().clone()
        if world > 1:
            torch.distributed.all_reduce(total)
            total /= world
        return total

    def _metrics(
        self,
        batch: LearnerBatch,
        loss: Tensor,
        loss_metrics: Mapping[str, float],
        grad_norm: float,
        lr: float,
        stale_flags: Sequence[bool] | None,
    ) -> dict[str, float]:
        rewards = batch.rewards
        n_groups = len(batch.staleness)
        zero_var = 0
        for g in range(n_groups):
            r = rewards[batch.group_index == g]
            zero_var += int(bool((r == r[0]).all()))
        out = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "staleness_mean": float(sum(batch.staleness)) / n_groups,
            "staleness_max": float(max(batch.staleness)),
            "stale_frac": float(sum(bool(s) for s in stale_flags)) / n_groups if stale_flags else 0.0,
            "zero_variance_frac": zero_var / n_groups,
            "grad_norm": grad_norm,
            "lr": lr,
            "policy_version": float(self.policy_version),
            "step": float(self.step_count),
            "num_sequences": float(rewards.numel()),
            "num_groups": float(n_groups),
        }
        out.update({k: float(v) for k, v in loss_metrics.items()})
        out["loss"] = float(loss)
        return out

    # ------------------------------------------------------------------ weights

    def _full_state_dict(self) -> dict[str, Tensor]:
        """The module's whole state dict on CPU. Under FSDP a collective (every rank must call
        it): the shards are gathered onto rank 0 (``get_model_state_dict(full_state_dict=True,
        cpu_offload=True)``); the other ranks get ``{}``."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return {k: v.detach().clone() for k, v in get_model_state_dict(self.module, options=opts).items()}
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.module.state_dict().items()}

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint stores of the model: the LoRA adapters (peft's names), or the full
        state dict. Under FSDP a collective whose result only rank 0 holds (``{}`` elsewhere)."""
        if not self.cfg.lora:
            return self._full_state_dict()
        from peft import get_peft_model_state_dict

        if self.sharded:
            full = self._full_state_dict()
            return get_peft_model_state_dict(self.module, state_dict=full) if full else {}
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.module).items()}

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Inverse of :meth:`trainable_state_dict`; under FSDP every rank passes the full dict."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            full = peft_module_names(state) if self.cfg.lora else dict(state)
            result = set_model_state_dict(self.module, full, options=StateDictOptions(full_state_dict=True,
                                                                                       strict=False))
            if result.unexpected_keys:
                raise ValueError(f"model state has unexpected keys: {list(result.unexpected_keys)[:5]}")
            return
        if self.cfg.lora:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.module, dict(state))
            unexpected = list(getattr(result, "unexpected_keys", []) or [])
            if unexpected:
                raise ValueError(f"adapter state has unexpected keys: {unexpected[:5]}")
            return
        missing, unexpected = self.module.load_state_dict(dict(state), strict=False)
        if unexpected or missing:
            raise ValueError(f"model state mismatch: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")

    @torch.no_grad()
    def export_weights(self) -> dict[str, Tensor]:
        """The weight payload for the Action engines (CPU tensors, the transformers class's
        parameter names).

        Without LoRA: the full state dict (what ``InferenceEngine.load_weights`` takes).
        With LoRA: *only* the adapter tensors (``...lora_A.weight`` / ``...lora_B.weight``
        under peft's names) plus :data:`LORA_SCALING_KEY`; the receiving side merges them into
        its own copy of the base weights with
        :func:`worldagent_ray.rl.weight_sync.merge_lora`, so only the adapters travel.
        Under FSDP a collective: every rank calls it, rank 0 gets the gathered payload and the
        others ``{}``.
        """
        out = self.trainable_state_dict()
        if self.cfg.lora and out:
            out[LORA_SCALING_KEY] = torch.tensor(float(self.lora_scaling), dtype=torch.float32)
        return out

    # ------------------------------------------------------------------ state

    def _optimizer_state(self) -> dict[str, Any]:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.module, self.optimizer, options=opts)
        return self.optimizer.state_dict()

    def _load_optimizer_state(self, state: Mapping[str, Any]) -> None:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.module, self.optimizer, optim_state_dict=dict(state),
                                     options=StateDictOptions(full_state_dict=True))
            return
        self.optimizer.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: model (or adapters), optimizer, scheduler,
        step, policy version and RNG states. Under FSDP a collective (full on rank 0 only)."""
        return {
            "model": self.trainable_state_dict(),
            "optimizer": self._optimizer_state(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step_count,
            "policy_version": self.policy_version,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (the core must be built with the same config)."""
        missing = {"model", "optimizer", "scheduler", "step", "policy_version", "rng"} - set(state)
        if missing:
            raise ValueError(f"learner state is missing {sorted(missing)}")
        self.load_trainable_state_dict(state["model"])
        self._load_optimizer_state(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count = int(state["step"])
        self.policy_version = int(state["policy_version"])
        set_rng_state(state["rng"])

    def save_checkpoint(self, directory: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> None:
        """Write :meth:`state_dict` to ``directory``: weights as safetensors, optimizer/scheduler/
        RNG as a tensors-only ``torch.save`` (loaded with ``weights_only=True``), and a JSON with
        step, policy version and ``extra`` (e.g. the group ids the checkpoint has trained on).
        Under FSDP every rank calls it and rank 0 writes."""
        from safetensors.torch import save_file

        state = self.state_dict()
        if _rank_world()[0] != 0:
            return
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file(state["model"], str(d / (ADAPTER_FILE if self.cfg.lora else MODEL_FILE)))
        torch.save(
            {"optimizer": state["optimizer"], "scheduler": state["scheduler"], "rng": state["rng"]},
            d / TRAINER_STATE_FILE,
        )
        meta = {"step": state["step"], "policy_version": state["policy_version"], "lora": self.cfg.lora}
        meta["extra"] = dict(extra or {})
        (d / LEARNER_STATE_FILE).write_text(json.dumps(meta))

    def load_checkpoint(self, directory: str | os.PathLike[str]) -> dict[str, Any]:
        """Restore from :meth:`save_checkpoint`; return the ``extra`` mapping it stored.
        Under FSDP every rank reads the checkpoint and loads its own shards from it."""
        from safetensors.torch import load_file

        d = Path(directory)
        meta = json.loads((d / LEARNER_STATE_FILE).read_text())
        if bool(meta.get("lora")) != self.cfg.lora:
            raise ValueError(
                f"checkpoint {str(d)!r} has lora={meta.get('lora')} but the learner config has lora={self.cfg.lora}"
            )
        model = load_file(str(d / (ADAPTER_FILE if self.cfg.lora else MODEL_FILE)))
        trainer = torch.load(d / TRAINER_STATE_FILE, weights_only=True, map_location="cpu")
        self.load_state_dict(
            {
                "model": model,
                "optimizer": trainer["optimizer"],
                "scheduler": trainer["scheduler"],
                "rng": trainer["rng"],
                "step": meta["step"],
                "policy_version": meta["policy_version"],
            }
        )
        return dict(meta.get("extra") or {})
