"""The asynchronous GRPO learner's pure training core (no Ray).

:class:`LearnerCore` is plain PyTorch + transformers (+ peft for LoRA). It owns the policy,
the optimizer, the LR schedule and the policy version, and takes one GRPO optimizer step per
call of :meth:`LearnerCore.step` on a list of reward-scored groups. The Ray Train shell that
runs it (pulling from the buffer actor, checkpointing, publishing weights) is
:mod:`worldagent_ray.runtime.learner_trainer`.

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
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..config import LearnerConfig
from .dpo import dpo_term
from .grpo import group_advantages, grpo_loss, importance_weights, off_policy_mask, token_logprobs
from .weight_sync import LORA_SCALING_KEY

logger = logging.getLogger(__name__)

__all__ = [
    "LORA_TARGET_MODULES",
    "LORA_SCALING_KEY",
    "LearnerBatch",
    "LearnerCore",
    "collate_groups",
    "lr_lambda",
]

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")

MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"
TRAINER_STATE_FILE = "trainer_state.pt"
LEARNER_STATE_FILE = "learner_state.json"


# --------------------------------------------------------------------------- batching


@dataclass
class LearnerBatch:
    """Tensors of one learner step. ``B`` completions, prompts left-padded to ``P``,
    completions right-padded to ``T``; sequences are ``[pad.., prompt, completion, pad..]``.

    Attributes:
        input_ids (`Tensor`): ``[B, P + T]`` token ids (padding is ``pad_token_id``).
        attention_mask (`Tensor`): ``[B, P + T]``, 1 on real tokens.
        position_ids (`Tensor`): ``[B, P + T]``, 0 at each prompt's first real token.
        completion_mask (`Tensor`): ``[B, T]``, 1 on completion tokens.
        rollout_logps (`Tensor`): ``[B, T]``, the sampling engine's log-probs (NaN where it
            reported none, 0 on padding).
        rewards (`Tensor`): ``[B]``.
        group_index (`Tensor`): ``[B]``, index of each completion's group in the step.
        staleness (`list[int]`): per group, learner version minus the group's policy version.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    completion_mask: Tensor
    rollout_logps: Tensor
    rewards: Tensor
    group_index: Tensor
    staleness: list[int]

    @property
    def completion_len(self) -> int:
        return int(self.completion_mask.shape[1])


def collate_groups(groups: Sequence[Any], policy_version: int, pad_token_id: int = 0) -> LearnerBatch:
    """Pad a list of :class:`~worldagent_ray.schemas.ScoredGroup` into one :class:`LearnerBatch`.

    Args:
        groups: scored groups; each has ``prompt_token_ids`` (one prompt, or one per sample),
            ``completion_token_ids`` (one list per sample), ``rollout_logprobs`` (one list per sample, or empty lists),
            ``rewards`` (one per sample) and ``policy_version``.
        policy_version (`int`): the learner's current version (for staleness).
        pad_token_id (`int`): id written on padding positions (masked out everywhere).

    Raises:
        ValueError: empty input, or a group whose lists disagree in length (names the group).
    """
    if not groups:
        raise ValueError("groups is empty: a learner step needs at least one scored group")
    prompts: list[list[int]] = []
    completions: list[list[int]] = []
    roll: list[list[float]] = []
    rewards: list[float] = []
    gidx: list[int] = []
    staleness: list[int] = []
    for g_i, g in enumerate(groups):
        gid = getattr(g, "group_id", g_i)
        n = len(g.completion_token_ids)
        if n == 0:
            raise ValueError(f"group {gid!r} has no completions")
        if len(g.rewards) != n:
            raise ValueError(f"group {gid!r}: {len(g.rewards)} rewards for {n} completions")
        lps = list(g.rollout_logprobs) if g.rollout_logprobs else [[] for _ in range(n)]
        if len(lps) != n:
            raise ValueError(f"group {gid!r}: {len(lps)} rollout_logprobs lists for {n} completions")
        if not g.prompt_token_ids:
            raise ValueError(f"group {gid!r} has an empty prompt_token_ids")
        per_sample = isinstance(g.prompt_token_ids[0], (list, tuple))
        sample_prompts = [list(p) for p in g.prompt_token_ids] if per_sample else [list(g.prompt_token_ids)] * n
        if len(sample_prompts) != n or any(not p for p in sample_prompts):
            raise ValueError(f"group {gid!r}: need one non-empty prompt, or one per completion ({n})")
        staleness.append(int(policy_version) - int(g.policy_version))
        for j in range(n):
            comp = list(g.completion_token_ids[j])
            if not comp:
                raise ValueError(f"group {gid!r}: completion {j} is empty")
            lp = list(lps[j])
            if lp and len(lp) != len(comp):
                raise ValueError(
                    f"group {gid!r}: completion {j} has {len(comp)} tokens but {len(lp)} rollout logprobs"
                )
            prompts.append(sample_prompts[j])
            completions.append(comp)
            roll.append(lp if lp else [math.nan] * len(comp))
            rewards.append(float(g.rewards[j]))
            gidx.append(g_i)
    B = len(prompts)
    P = max(len(p) for p in prompts)
    T = max(len(c) for c in completions)
    input_ids = torch.full((B, P + T), pad_token_id, dtype=torch.long)
    attention = torch.zeros((B, P + T), dtype=torch.long)
    cmask = torch.zeros((B, T), dtype=torch.float32)
    rlp = torch.zeros((B, T), dtype=torch.float32)
    for i, (p, c, lp) in enumerate(zip(prompts, completions, roll)):
        input_ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        input_ids[i, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
        attention[i, P - len(p) : P + len(c)] = 1
        cmask[i, : len(c)] = 1.0
        rlp[i, : len(c)] = torch.tensor(lp, dtype=torch.float32)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return LearnerBatch(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=position_ids,
        completion_mask=cmask,
        rollout_logps=rlp,
        rewards=torch.tensor(rewards, dtype=torch.float32),
        group_index=torch.tensor(gidx, dtype=torch.long),
        staleness=staleness,
    )


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


class LearnerCore:
    """One GRPO policy under training: model, optimizer, schedule and policy version.

    Args:
        cfg (`LearnerConfig`): loss, optimizer, LoRA and off-policy settings.
        model_path (`str`): a local Hugging Face folder (see :func:`worldagent_ray.models.resolve_model`).
        temperature (`float`): the sampling temperature of the rollouts (log-probs are taken
            at this temperature, as TRL does).
        device (`str | torch.device`): where the model lives (``"cpu"`` here).
        dtype (`torch.dtype`): parameter dtype for training (float32 by default).
        wrap_model (`Callable | None`): applied to the policy before the optimizer is built,
            e.g. ``ray.train.torch.prepare_model`` (DDP/FSDP). The unwrapped module stays
            reachable as :attr:`module`.
        pad_token_id (`int | None`): padding id; defaults to the model config's, else 0.

    Example::

        core = LearnerCore(LearnerConfig(lr=1e-4), resolve_model("tiny-random-llama"))
        metrics = core.step(groups)          # one optimizer step; core.policy_version += 1
        engine.load_weights(core.export_weights(), core.policy_version)
    """

    def __init__(
        self,
        cfg: LearnerConfig,
        model_path: str,
        *,
        temperature: float = 1.0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        pad_token_id: int | None = None,
    ):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.cfg = cfg
        self.model_path = str(model_path)
        self.temperature = float(temperature)
        self.device = torch.device(device)
        self.step_count = 0
        self.policy_version = 0
        _seed_everything(cfg.seed)
        self.module = self._load_policy(dtype)
        if pad_token_id is None:
            pad_token_id = getattr(self.module.config, "pad_token_id", None)
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else 0
        self.ref_module = self._make_reference() if (cfg.beta > 0 or cfg.dpo_coef > 0) else None
        self.model = wrap_model(self.module) if wrap_model is not None else self.module
        self.trainable = [p for p in self.module.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError(f"model at {model_path!r} has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_lambda(
                s, schedule=cfg.lr_schedule, warmup_steps=cfg.lr_warmup_steps, total_steps=cfg.max_steps
            ),
        )

    # ------------------------------------------------------------------ model

    def _load_policy(self, dtype: torch.dtype) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        if not Path(self.model_path).exists():
            raise FileNotFoundError(
                f"model_path {self.model_path!r} does not exist; resolve builtin names with "
                "worldagent_ray.models.resolve_model first"
            )
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        model.to(self.device)
        model.config.use_cache = False
        if self.cfg.gradient_checkpointing:
            # Without it a step keeps every layer's activations for B x (prompt + completion)
            # tokens: ~14 GB for SmolLM2 with 8 samples of ~850 tokens on CPU.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.cfg.lora:
            from peft import LoraConfig, get_peft_model

            lcfg = LoraConfig(
                r=self.cfg.lora_rank,
                lora_alpha=self.cfg.lora_alpha,
                target_modules=list(LORA_TARGET_MODULES),
                lora_dropout=0.0,
                bias="none",
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, lcfg)
        model.train()
        return model

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
        """Log-probs ``[B, T]`` of the completion tokens; only the last ``T + 1`` logits are built."""
        T = batch.completion_len
        out = model(
            input_ids=batch.input_ids.to(self.device),
            attention_mask=batch.attention_mask.to(self.device),
            position_ids=batch.position_ids.to(self.device),
            logits_to_keep=T + 1,
            use_cache=False,
        )
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

        Args:
            groups: :class:`~worldagent_ray.schemas.ScoredGroup` items (one per prompt).
            stale_flags: per group, whether the buffer marked it stale (older than
                ``cfg.max_staleness``); only counted in the metrics, because the IS weights
                already correct every group for the policy that sampled it.

        Returns:
            Metrics: ``loss``, ``reward_mean``, ``reward_std``, ``staleness_mean``,
            ``staleness_max``, ``stale_frac``, ``zero_variance_frac``, ``grad_norm``, ``lr``,
            ``policy_version`` (after the step), ``step``, ``num_sequences`` and the loss
            metrics of :func:`~worldagent_ray.rl.grpo.grpo_loss`; with ``cfg.dpo_coef > 0`` the
            loss includes ``dpo_coef`` times the DPO term of :func:`~worldagent_ray.rl.dpo.dpo_term`
            (against the frozen reference: a copy of the initial weights, or the base model
            under LoRA; token log-probs at the learner's ``temperature``) and the ``dpo_*`` metrics.
        """
        if stale_flags is not None and len(stale_flags) != len(groups):
            raise ValueError(f"stale_flags has {len(stale_flags)} entries for {len(groups)} groups")
        cfg = self.cfg
        batch = collate_groups(groups, self.policy_version, self.pad_token_id)
        mask = batch.completion_mask.to(self.device)
        rollout = batch.rollout_logps.to(self.device)
        advantages = group_advantages(batch.rewards, batch.group_index, cfg.scale_rewards).to(self.device)

        self.model.train()
        logps = self._completion_logps(self.model, batch)
        current = logps.detach()
        is_weights = None
        if cfg.is_correction != "none":
            old_logps = current
            is_weights = importance_weights(current, rollout, mask, cfg.is_correction, cfg.is_cap)
        else:
            old_logps = torch.where(torch.isnan(rollout), current, rollout)
        keep = None
        if cfg.off_policy_delta is not None:
            keep = off_policy_mask(advantages, current, rollout, mask, cfg.off_policy_delta)
        ref_logps = self._reference_logps(batch) if (cfg.beta > 0 or cfg.dpo_coef > 0) else None
        loss, loss_metrics = grpo_loss(
            logps,
            old_logps,
            advantages,
            mask,
            loss_type=cfg.loss_type,
            epsilon_low=cfg.epsilon_low,
            epsilon_high=cfg.epsilon_high,
            ref_logps=ref_logps if cfg.beta > 0 else None,
            beta=cfg.beta,
            is_weights=is_weights,
            max_completion_length=batch.completion_len,
            num_items_in_batch=self._dapo_normaliser(mask),
            keep_mask=keep,
        )
        if cfg.dpo_coef > 0:  # seed 000's L = L_GRPO + lambda * L_DPO on each group's best/worst pair
            dpo, dpo_metrics = dpo_term(logps, ref_logps, mask, batch.rewards.to(self.device), batch.group_index,
                                        beta=cfg.dpo_beta, loss_type=cfg.dpo_loss_type, margin=cfg.dpo_margin)
            loss = loss + cfg.dpo_coef * dpo
            loss_metrics = {**loss_metrics, **dpo_metrics}
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        self.policy_version += 1
        return self._metrics(batch, loss, loss_metrics, grad_norm, lr, stale_flags)

    def _dapo_normaliser(self, mask: Tensor) -> Tensor | None:
        """With DDP, the dapo token mean must use the *global* token count divided by the world
        size (DDP averages gradients); on one process the batch's own count is used (None)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        n = mask.sum().detach().clone()
        dist.all_reduce(n)
        return n / dist.get_world_size()

    def _metrics(
        self,
        batch: LearnerBatch,
        loss: Tensor,
        loss_metrics: Mapping[str, float],
        grad_norm: Tensor,
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
            "loss": float(loss.detach()),
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "staleness_mean": float(sum(batch.staleness)) / n_groups,
            "staleness_max": float(max(batch.staleness)),
            "stale_frac": float(sum(bool(s) for s in stale_flags)) / n_groups if stale_flags else 0.0,
            "zero_variance_frac": zero_var / n_groups,
            "grad_norm": float(grad_norm),
            "lr": lr,
            "policy_version": float(self.policy_version),
            "step": float(self.step_count),
            "num_sequences": float(rewards.numel()),
            "num_groups": float(n_groups),
        }
        out.update({k: float(v) for k, v in loss_metrics.items()})
        return out

    # ------------------------------------------------------------------ weights

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint stores of the model: the LoRA adapters, or the full state dict."""
        if self.cfg.lora:
            from peft import get_peft_model_state_dict

            return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.module).items()}
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None:
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
        """The weight payload for the Action engines (CPU tensors, HF parameter names).

        Without LoRA: the full state dict (what ``InferenceEngine.load_weights`` takes).
        With LoRA: *only* the adapter tensors (``...lora_A.weight`` / ``...lora_B.weight``
        under peft's names) plus :data:`LORA_SCALING_KEY`; the receiving side merges them into
        its own copy of the base weights with
        :func:`worldagent_ray.rl.weight_sync.merge_lora`, so only the adapters travel.
        """
        if not self.cfg.lora:
            return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.module.state_dict().items()}
        out = self.trainable_state_dict()
        out[LORA_SCALING_KEY] = torch.tensor(float(self.lora_scaling), dtype=torch.float32)
        return out

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: model (or adapters), optimizer, scheduler,
        step, policy version and RNG states."""
        return {
            "model": self.trainable_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step_count,
            "policy_version": self.policy_version,
            "rng": _rng_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (the core must be built with the same config)."""
        missing = {"model", "optimizer", "scheduler", "step", "policy_version", "rng"} - set(state)
        if missing:
            raise ValueError(f"learner state is missing {sorted(missing)}")
        self.load_trainable_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count = int(state["step"])
        self.policy_version = int(state["policy_version"])
        _set_rng_state(state["rng"])

    def save_checkpoint(self, directory: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> None:
        """Write :meth:`state_dict` to ``directory``: weights as safetensors, optimizer/scheduler/
        RNG as a tensors-only ``torch.save`` (loaded with ``weights_only=True``), and a JSON with
        step, policy version and ``extra`` (e.g. the buffer's consumed group ids)."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        save_file(state["model"], str(d / (ADAPTER_FILE if self.cfg.lora else MODEL_FILE)))
        torch.save(
            {"optimizer": state["optimizer"], "scheduler": state["scheduler"], "rng": state["rng"]},
            d / TRAINER_STATE_FILE,
        )
        meta = {"step": state["step"], "policy_version": state["policy_version"], "lora": self.cfg.lora}
        meta["extra"] = dict(extra or {})
        (d / LEARNER_STATE_FILE).write_text(json.dumps(meta))

    def load_checkpoint(self, directory: str | os.PathLike[str]) -> dict[str, Any]:
        """Restore from :meth:`save_checkpoint`; return the ``extra`` mapping it stored."""
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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": _py_state_to_tensor(random.getstate())}


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_py_state_from_tensor(state["python"]))


def _py_state_to_tensor(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _py_state_from_tensor(d: Mapping[str, Any]) -> tuple:
    return (int(d["version"]), tuple(int(x) for x in d["internal"].tolist()), d["gauss"])
