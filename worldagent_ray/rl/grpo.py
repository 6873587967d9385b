"""GRPO maths as pure torch functions (no Ray, no trainer state).

These functions are the loss of the asynchronous GRPO learner. Their numbers agree with
TRL 1.16's ``GRPOTrainer`` (``_generate_and_score_completions`` for advantages and the vLLM
importance-sampling correction, ``get_off_policy_mask`` and ``_compute_loss`` for the loss);
``tests/test_grpo_parity_trl.py`` checks loss and gradients against TRL to 1e-6 in float64.

Notation, for a batch of ``B`` completions padded to ``T`` tokens:

- ``logp[i,t]``: log pi_theta(y_{i,t} | x_i, y_{i,<t}) under the weights being trained (with grad);
- ``old[i,t]``: the same under the weights that the ratio is taken against (pi_old, detached);
- ``roll[i,t]``: the log-prob reported by the engine that sampled the token (pi_rollout);
- ``ref[i,t]``: the same under the frozen reference policy;
- ``m[i,t]`` in {0, 1}: 1 for completion tokens that carry loss, 0 for padding;
- ``A_i``: the advantage of completion ``i`` (one scalar per sequence).

All tensors of shape ``[B, T]`` must share one floating dtype; ``mask`` may be bool, int or float.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "LossType",
    "ISMode",
    "group_advantages",
    "gather_logprobs",
    "token_logprobs",
    "sequence_logprobs",
    "importance_weights",
    "off_policy_mask",
    "grpo_loss",
]

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ISMode = Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
_IS_MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


# --------------------------------------------------------------------------- checks


def _check_2d(name: str, x: Tensor, shape: torch.Size | None = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [B, T], got shape {tuple(x.shape)}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)} (the shape of logps)")


def _float_mask(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(dtype=like.dtype)


# --------------------------------------------------------------------------- advantages


def group_advantages(
    rewards: Tensor,
    group_index: Tensor,
    scale: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-4,
) -> Tensor:
    """Group-relative advantages.

    Formula, for completion ``i`` in group ``g(i)`` (the completions sampled for one prompt)::

        A_i = (r_i - mean_{j in g(i)} r_j) / (s_i + eps)

    where ``s_i`` is the unbiased (Bessel-corrected, divisor n-1) standard deviation of the
    rewards of group ``g(i)`` when ``scale="group"``, of the whole batch when
    ``scale="batch"``, and ``A_i = r_i - mean_g r`` with no division when ``scale="none"``.
    A group (or batch) of one sample has ``s = 0``. This is TRL 1.16's definition
    (``scale_rewards``; ``sum_then_normalize`` with one reward function), including the
    ``1e-4`` default for ``eps``. A constant group gets exactly zero advantages (TRL can leave
    rounding residue there, amplified by ``1 / eps``).

    Args:
        rewards (`Tensor`): shape ``[B]``, finite floats.
        group_index (`Tensor`): shape ``[B]``, integer group id of each sample. Groups need
            not be contiguous or numbered densely.
        scale (`str`): ``"group"``, ``"batch"`` or ``"none"``.
        eps (`float`): added to the standard deviation before dividing.

    Returns:
        `Tensor`: shape ``[B]``, dtype of ``rewards``, no grad.
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape [B], got shape {tuple(rewards.shape)}")
    if group_index.shape != rewards.shape:
        raise ValueError(
            f"group_index has shape {tuple(group_index.shape)}, expected {tuple(rewards.shape)} (one id per reward)"
        )
    if group_index.dtype.is_floating_point or group_index.dtype == torch.bool:
        raise ValueError(f"group_index must hold integer ids, got dtype {group_index.dtype}")
    rewards = rewards.detach()
    if not rewards.dtype.is_floating_point:
        rewards = rewards.to(torch.get_default_dtype())
    if rewards.numel() and not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(f"rewards must be finite; non-finite at indices {bad[:10]}")
    if rewards.numel() == 0:
        return rewards.clone()

    _, inverse, counts = torch.unique(group_index, return_inverse=True, return_counts=True)
    n_groups = counts.numel()
    sums = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, inverse, rewards)
    counts_f = counts.to(rewards.dtype)
    means = sums / counts_f
    centred = rewards - means[inverse]
    # A constant group has exactly zero advantage (the mean above may be off by an ulp).
    gmin = torch.full_like(sums, math.inf).scatter_reduce_(0, inverse, rewards, reduce="amin")
    gmax = torch.full_like(sums, -math.inf).scatter_reduce_(0, inverse, rewards, reduce="amax")
    centred = torch.where((gmax == gmin)[inverse], torch.zeros_like(centred), centred)
    if scale == "none":
        return centred
    if scale == "group":
        sq = torch.zeros_like(sums).index_add_(0, inverse, centred * centred)
        std_g = torch.where(counts > 1, torch.sqrt(sq / (counts_f - 1).clamp(min=1)), torch.zeros_like(sq))
        std = std_g[inverse]
    else:
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        std = std.expand_as(rewards)
    return centred / (std + eps)


# --------------------------------------------------------------------------- log-probs


def gather_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of ``targets`` under ``softmax(logits / temperature)``, position by position.

    Formula: ``out[..., t] = z[..., t, y_t] - logsumexp_v z[..., t, v]`` with ``z = logits / temperature``.
    Computed row by row (a "selective log-softmax") so that the full ``[..., V]`` log-softmax is
    never materialised at once; bf16/fp16 logits fall back to ``log_softmax`` for stability.

    Args:
        logits (`Tensor`): shape ``[B, T, V]``.
        targets (`Tensor`): shape ``[B, T]``, token ids aligned with ``logits`` (no shift).
        temperature (`float`): must be > 0 (the sampling temperature of the rollout).

    Returns:
        `Tensor`: shape ``[B, T]``, dtype of ``logits``, differentiable w.r.t. ``logits``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [B, T, V] and targets [B, T]; got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if temperature != 1.0:
        logits = logits / temperature
    idx = targets.long().unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, idx).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return picked - lse
    rows = [torch.log_softmax(row, dim=-1).gather(-1, i).squeeze(-1) for row, i in zip(logits, idx)]
    return torch.stack(rows)


def token_logprobs(logits: Tensor, input_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each next token of ``input_ids`` under a causal LM's ``logits``.

    Formula: ``out[b, t] = log softmax(logits[b, t] / temperature)[input_ids[b, t + 1]]``
    for ``t = 0 .. L-2`` (position ``t`` predicts token ``t + 1``).

    To get the completion log-probs of a prompt+completion sequence, slice the last ``T``
    columns: ``token_logprobs(model(ids).logits, ids)[:, -T:]``.

    Args:
        logits (`Tensor`): shape ``[B, L, V]`` (the model's output over ``input_ids``).
        input_ids (`Tensor`): shape ``[B, L]``.
        temperature (`float`): the sampling temperature (logits are divided by it, as TRL does).

    Returns:
        `Tensor`: shape ``[B, L - 1]``.
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [B, L, V] and input_ids [B, L]; got {tuple(logits.shape)} and {tuple(input_ids.shape)}"
        )
    return gather_logprobs(logits[:, :-1], input_ids[:, 1:], temperature)


def sequence_logprobs(logps: Tensor, mask: Tensor, reduction: Literal["sum", "mean"] = "sum") -> Tensor:
    """Per-sequence log-probability: ``sum_t m[i,t] logp[i,t]`` (``"sum"``) or that sum divided by
    ``max(1, sum_t m[i,t])`` (``"mean"``). Shapes ``[B, T] -> [B]``."""
    _check_2d("logps", logps)
    _check_2d("mask", mask, logps.shape)
    total = (logps * _float_mask(mask, logps)).sum(-1)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / _float_mask(mask, logps).sum(-1).clamp(min=1.0)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


# --------------------------------------------------------------------------- off-policy corrections


@torch.no_grad()
def importance_weights(
    learner_logps: Tensor,
    rollout_logps: Tensor,
    mask: Tensor,
    mode: ISMode,
    cap: float | None,
    *,
    cap_min: float | None = None,
) -> Tensor:
    """Importance weights that correct for sampling with a different policy than the learner's.

    TRL's vLLM importance-sampling correction. With ``d[i,t] = m[i,t] (old[i,t] - roll[i,t])``
    (NaN rollout log-probs count as 0, i.e. no correction for that token)::

        token_*:     w[i,t] = exp(d[i,t])
        sequence_*:  w[i,t] = exp(sum_t' d[i,t'])         (one weight per sequence, broadcast over t)
        *_truncate:  w <- clamp(w, cap_min, cap)            (truncated IS, TIS)
        *_mask:      w <- w * 1[cap_min <= w <= cap]        (masked IS, MIS; out-of-range weights become 0)
        none:        w = 1

    A ``None`` bound is open. The loss multiplies each token's clipped surrogate by ``w``.

    Args:
        learner_logps (`Tensor`): ``[B, T]``, the learner's log-probs of the sampled tokens
            (pi_old in the loss; detached).
        rollout_logps (`Tensor`): ``[B, T]``, the engine's log-probs of the same tokens.
        mask (`Tensor`): ``[B, T]``, 1 for loss tokens.
        mode (`str`): one of ``none``, ``token_truncate``, ``token_mask``, ``sequence_truncate``,
            ``sequence_mask``.
        cap (`float | None`): upper bound C_max (TRL's ``vllm_importance_sampling_clip_max``, 3.0 there).
        cap_min (`float | None`): lower bound C_min (TRL's ``vllm_importance_sampling_clip_min``).

    Returns:
        `Tensor`: ``[B, T]`` weights, detached; 1 on padding for ``token_*`` modes.
    """
    if mode not in _IS_MODES:
        raise ValueError(f"mode must be one of {_IS_MODES}, got {mode!r}")
    _check_2d("learner_logps", learner_logps)
    _check_2d("rollout_logps", rollout_logps, learner_logps.shape)
    _check_2d("mask", mask, learner_logps.shape)
    if mode == "none":
        return torch.ones_like(learner_logps)
    if cap is None and cap_min is None:
        raise ValueError(f"importance mode {mode!r} needs at least one of cap / cap_min, both are None")
    if cap is not None and cap_min is not None and cap_min >= cap:
        raise ValueError(f"cap_min ({cap_min}) must be less than cap ({cap})")
    diff = (learner_logps.detach() - rollout_logps.detach()) * _float_mask(mask, learner_logps)
    diff = torch.nan_to_num(diff, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    w = torch.exp(diff)
    if mode.endswith("truncate"):
        w = torch.clamp(w, min=cap_min, max=cap)
    else:
        lo = -math.inf if cap_min is None else cap_min
        hi = math.inf if cap is None else cap
        w = w.masked_fill((w < lo) | (w > hi), 0.0)
    return w.expand_as(learner_logps).clone()


@torch.no_grad()
def off_policy_mask(
    advantages: Tensor,
    logps: Tensor,
    rollout_logps: Tensor,
    mask: Tensor,
    delta: float,
) -> Tensor:
    """Off-policy sequence mask (DeepSeek-V3.2 eq. 9; TRL's ``get_off_policy_mask``).

    Formula, with ``k[i] = sum_t m[i,t] (roll[i,t] - logp[i,t]) / max(1, sum_t m[i,t])``
    (a sample estimate of KL(pi_rollout || pi_theta); NaN rollout log-probs count as 0)::

        keep[i] = 1[A_i >= 0  or  k[i] <= delta]

    So only sequences with a negative advantage that drifted more than ``delta`` are dropped.

    Args:
        advantages (`Tensor`): ``[B]`` (or ``[B, 1]``).
        logps (`Tensor`): ``[B, T]`` current log-probs (detached here).
        rollout_logps (`Tensor`): ``[B, T]`` log-probs of the sampling policy.
        mask (`Tensor`): ``[B, T]``.
        delta (`float`): KL threshold (TRL's ``off_policy_mask_threshold``).

    Returns:
        `Tensor`: ``[B, 1]`` of 0/1 in the dtype of ``logps``; multiply into the per-token loss.
    """
    _check_2d("logps", logps)
    _check_2d("rollout_logps", rollout_logps, logps.shape)
    _check_2d("mask", mask, logps.shape)
    adv = advantages.reshape(-1, 1)
    if adv.shape[0] != logps.shape[0]:
        raise ValueError(f"advantages has {adv.shape[0]} entries, expected B={logps.shape[0]}")
    m = _float_mask(mask, logps)
    kl = torch.nan_to_num(rollout_logps - logps.detach(), nan=0.0)
    avg_kl = (kl * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    return ((adv >= 0) | (avg_kl <= delta)).to(logps.dtype)


# --------------------------------------------------------------------------- loss


def _masked_mean(x: Tensor, m: Tensor) -> float:
    if x.shape[1] == 1:  # one value per sequence
        return float(x.mean()) if x.numel() else 0.0
    return float((x * m).sum() / m.sum().clamp(min=1.0))


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: LossType = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    ref_logps: Tensor | None = None,
    beta: float = 0.0,
    is_weights: Tensor | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: Tensor | float | None = None,
    grad_accum_steps: int = 1,
    importance_sampling_level: Literal["token", "sequence"] = "token",
    delta: float | None = None,
    use_bias_correction_kl: bool = True,
    keep_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped GRPO surrogate loss with optional KL penalty, as TRL 1.16 computes it.

    Per token, with ``r = exp(logp - old)`` (``importance_sampling_level="sequence"``: one
    ``r_i = exp(sum_t m (logp - old) / max(1, sum_t m))`` per sequence, GSPO)::

        l[i,t] = -min(r' A_i, clip(r, 1 - epsilon_low, 1 + epsilon_high) A_i)
                 * keep[i] * w[i,t]  +  beta * kl[i,t]
        r'     = min(r, delta) if delta is set (two-sided clipping, INTELLECT-2) else r
        kl     = exp(ref - logp) - (ref - logp) - 1            (k3 estimator of KL(pi_theta || pi_ref))
        kl    <- kl * r   if use_bias_correction_kl (TRL's default; r keeps its gradient)

    where ``w`` are ``is_weights`` (see :func:`importance_weights`; 1 if None) and ``keep``
    is ``keep_mask`` (see :func:`off_policy_mask`; 1 if None). Aggregation, with ``G =
    grad_accum_steps`` (TRL's ``current_gradient_accumulation_steps``)::

        grpo:     mean_i( sum_t m l / max(1, sum_t m) ) / G
        bnpo:     (sum_{i,t} m l / max(1, sum_{i,t} m)) / G
        dr_grpo:  (sum_{i,t} m l / (B * max_completion_length)) / G
        dapo:     sum_{i,t} m l / max(1, N)

    For ``dapo``, ``N = num_items_in_batch`` is the number of loss tokens that the optimizer
    step averages over *per process* (default: ``sum m``, i.e. this batch alone). With gradient
    accumulation over micro-batches, pass the token count of the whole accumulation window so
    that the summed gradients are a token mean; with DDP pass that window's global count divided
    by the world size (DDP averages gradients). TRL's ``normalizer = num_items_in_batch /
    num_processes * current_gradient_accumulation_steps / steps_per_generation`` is this ``N``.

    Args:
        logps (`Tensor`): ``[B, T]`` log-probs under the weights being trained (with grad).
        old_logps (`Tensor | None`): ``[B, T]`` pi_old log-probs; ``None`` means ``logps.detach()``
            (on-policy: ``r = 1`` but the gradient is the policy gradient).
        advantages (`Tensor`): ``[B]`` (or ``[B, 1]``).
        mask (`Tensor`): ``[B, T]``, 1 for loss tokens.
        loss_type (`str`): ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo``.
        epsilon_low, epsilon_high (`float`): clip range ``[1 - epsilon_low, 1 + epsilon_high]``.
        ref_logps (`Tensor | None`): ``[B, T]`` reference log-probs; required when ``beta > 0``.
        beta (`float`): KL coefficient.
        is_weights (`Tensor | None`): ``[B, T]`` (or ``[B, 1]``) detached importance weights.
        max_completion_length (`int | None`): required for ``dr_grpo``.
        num_items_in_batch (`Tensor | float | None`): ``dapo`` normaliser ``N`` (see above).
        grad_accum_steps (`int`): divisor for ``grpo``, ``bnpo``, ``dr_grpo``.
        importance_sampling_level (`str`): ``"token"`` (GRPO) or ``"sequence"`` (GSPO).
        delta (`float | None`): upper clamp of the unclipped ratio (two-sided clipping).
        use_bias_correction_kl (`bool`): multiply the KL term by the ratio (TRL default True).
        keep_mask (`Tensor | None`): ``[B]`` or ``[B, 1]`` 0/1 sequence mask.

    Returns:
        `tuple[Tensor, dict[str, float]]`: the scalar loss and metrics: ``policy_loss`` (loss
        before the accumulation divisor), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
        ``clip_ratio/region_mean`` (fractions of loss tokens clipped), ``ratio/mean``,
        ``ratio/max``, ``kl`` (when ``beta > 0``), ``is_weight/min|mean|max`` (when
        ``is_weights`` is given, over loss tokens), ``keep_frac`` (when ``keep_mask`` is
        given), ``num_tokens``.
    """
    if loss_type not in _LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {_LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    if epsilon_low < 0 or epsilon_high < 0:
        raise ValueError(f"epsilon_low and epsilon_high must be >= 0, got {epsilon_low}, {epsilon_high}")
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    _check_2d("logps", logps)
    if not logps.dtype.is_floating_point:
        raise ValueError(f"logps must be floating point, got dtype {logps.dtype}")
    shape = logps.shape
    _check_2d("mask", mask, shape)
    if old_logps is None:
        old_logps = logps.detach()
    _check_2d("old_logps", old_logps, shape)
    adv = advantages.to(logps.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    if adv.shape != (shape[0], 1):
        raise ValueError(f"advantages must have shape [B] = [{shape[0]}], got {tuple(advantages.shape)}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"ref_logps is required when beta != 0 (beta={beta})")
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length < 1):
        raise ValueError(f"loss_type='dr_grpo' needs max_completion_length >= 1, got {max_completion_length!r}")

    m = _float_mask(mask, logps)
    log_ratio = logps - old_logps.detach()
    if importance_sampling_level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_w)

    per_token_kl = None
    if beta != 0.0:
        _check_2d("ref_logps", ref_logps, shape)
        d = ref_logps.detach() - logps
        per_token_kl = torch.exp(d) - d - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * ratio

    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
    per_token_loss = -torch.min(unclipped * adv, clipped * adv)
    if keep_mask is not None:
        per_token_loss = per_token_loss * keep_mask.to(logps.dtype).reshape(-1, 1)
    if is_weights is not None:
        if is_weights.dim() != 2 or is_weights.shape[0] != shape[0] or is_weights.shape[1] not in (1, shape[1]):
            raise ValueError(f"is_weights must have shape [B, T] or [B, 1], got {tuple(is_weights.shape)}")
        per_token_loss = per_token_loss * is_weights.detach().to(logps.dtype)
    if per_token_kl is not None:
        per_token_loss = per_token_loss + beta * per_token_kl

    masked_sum = (per_token_loss * m).sum()
    if loss_type == "grpo":
        policy_loss = ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
        loss = policy_loss / grad_accum_steps
    elif loss_type == "bnpo":
        policy_loss = masked_sum / m.sum().clamp(min=1.0)
        loss = policy_loss / grad_accum_steps
    elif loss_type == "dr_grpo":
        policy_loss = masked_sum / (shape[0] * max_completion_length)
        loss = policy_loss / grad_accum_steps
    else:  # dapo
        n = m.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=logps.dtype)
        policy_loss = masked_sum / n.clamp(min=1.0)
        loss = policy_loss

    metrics = _loss_metrics(ratio.detach(), adv, m, epsilon_low, epsilon_high, per_token_kl, is_weights, keep_mask)
    metrics["policy_loss"] = float(policy_loss.detach())
    return loss, metrics


@torch.no_grad()
def _loss_metrics(
    ratio: Tensor,
    adv: Tensor,
    m: Tensor,
    epsilon_low: float,
    epsilon_high: float,
    per_token_kl: Tensor | None,
    is_weights: Tensor | None,
    keep_mask: Tensor | None,
) -> dict[str, float]:
    low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(m.dtype)
    high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(m.dtype)
    region = torch.clamp(low + high, max=1.0)
    out = {
        "clip_ratio/low_mean": _masked_mean(low, m),
        "clip_ratio/high_mean": _masked_mean(high, m),
        "clip_ratio/region_mean": _masked_mean(region, m),
        "ratio/mean": _masked_mean(ratio, m),
        "ratio/max": float(ratio.expand_as(m)[m > 0].max()) if bool((m > 0).any()) else 1.0,
        "num_tokens": float(m.sum()),
    }
    if per_token_kl is not None:
        out["kl"] = _masked_mean(per_token_kl.detach(), m)
    if is_weights is not None:
        w = is_weights.detach().to(m.dtype).expand_as(m)[m > 0]
        if w.numel():
            out.update({"is_weight/min": float(w.min()), "is_weight/mean": float(w.mean()), "is_weight/max": float(w.max())})
    if keep_mask is not None:
        out["keep_frac"] = float(keep_mask.to(m.dtype).mean()) if keep_mask.numel() else 1.0
    return out
