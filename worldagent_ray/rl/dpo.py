"""Direct preference optimisation (DPO) on best/worst pairs of GRPO groups (pure torch, no Ray).

Seed 000's phase 2 trains the Action agent with ``L = L_GRPO + lambda * L_DPO``. The pairs come
from the groups the GRPO learner already holds: in each group of G completions of one prompt,
the completion with the highest reward is *chosen* and the one with the lowest is *rejected*,
when their rewards differ by at least ``margin`` (:func:`group_pairs`). The DPO loss compares
the policy's and the frozen reference's sequence log-probs of the two (:func:`dpo_loss`).

The maths equals TRL 1.16's ``DPOTrainer._compute_loss`` for ``f_divergence_type="reverse_kl"``
(standard DPO), no ``ld_alpha`` and no WPO weighting, for the loss types listed in
:data:`DPO_LOSS_TYPES`; ``tests/unit/rl/test_dpo_parity_trl.py`` checks loss and gradients
against TRL's own code in float64. With ``r_c = log pi(c) - log ref(c)`` and
``r_r = log pi(r) - log ref(r)`` (sums over completion tokens) and ``d = r_c - r_r``:

- ``sigmoid``: ``-log sigmoid(beta * d)`` (Rafailov et al. 2023);
- ``hinge``: ``relu(1 - beta * d)`` (SLiC);
- ``ipo``: ``(r_c / |c| - r_r / |r| - 1 / (2 * beta))^2`` with ``|x|`` the completion length
  (TRL's length-normalised IPO).

The loss is the mean over pairs.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["DPO_LOSS_TYPES", "dpo_loss", "group_pairs", "pairs_from_groups", "sequence_logps", "dpo_term"]

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def sequence_logps(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Sum of the completion tokens' log-probs: ``[B, T] x [B, T] -> [B]`` (padding masked out)."""
    return (token_logps * mask).sum(dim=-1)


def group_pairs(rewards: Sequence[float] | Tensor, group_index: Sequence[int] | Tensor,
                margin: float) -> list[tuple[int, int]]:
    """``(chosen, rejected)`` row indices, one pair per group whose best and worst rewards
    differ by at least ``margin`` (> 0). Ties go to the earliest row, so the result is
    deterministic. Rows are indices into the flat batch (``group_index[i]`` is row i's group).

    Raises:
        ValueError: ``margin`` not > 0, or ``rewards``/``group_index`` of different lengths.
    """
    if not margin > 0:
        raise ValueError(f"margin must be > 0 (a pair needs two different rewards), got {margin!r}")
    r = [float(x) for x in (rewards.tolist() if isinstance(rewards, Tensor) else rewards)]
    g = [int(x) for x in (group_index.tolist() if isinstance(group_index, Tensor) else group_index)]
    if len(r) != len(g):
        raise ValueError(f"{len(r)} rewards for {len(g)} group indices")
    rows: dict[int, list[int]] = {}
    for i, gi in enumerate(g):
        rows.setdefault(gi, []).append(i)
    out = []
    for gi in sorted(rows):
        idx = rows[gi]
        best = max(idx, key=lambda i: (r[i], -i))
        worst = min(idx, key=lambda i: (r[i], i))
        if r[best] - r[worst] >= margin:
            out.append((best, worst))
    return out


def pairs_from_groups(groups: Sequence[object], margin: float) -> list[tuple[object, int, int]]:
    """``(group, chosen sample index, rejected sample index)`` for each scored group (anything
    with a ``rewards`` list, e.g. :class:`~worldagent_ray.schemas.ScoredGroup`) that has a pair."""
    out = []
    for g in groups:
        rewards = list(getattr(g, "rewards"))
        for c, r in group_pairs(rewards, [0] * len(rewards), margin):
            out.append((g, c, r))
    return out


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The DPO loss (mean over pairs) and TRL's logged metrics.

    Args:
        chosen_logps / rejected_logps (`Tensor`): ``[N]`` policy sequence log-probs.
        ref_chosen_logps / ref_rejected_logps (`Tensor`): ``[N]`` reference sequence log-probs
            (no gradient flows into them).
        beta (`float`): the DPO temperature (> 0).
        loss_type (`str`): one of :data:`DPO_LOSS_TYPES`.
        chosen_lengths / rejected_lengths (`Tensor`): ``[N]`` completion token counts; ``ipo`` needs them.

    Returns:
        ``(loss, metrics)``: metrics ``rewards_chosen``, ``rewards_rejected``, ``reward_accuracy``,
        ``reward_margin`` (``beta * log-ratio``, means over pairs, as TRL logs them).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    n = chosen_logps.shape[0]
    for name, t in (("rejected_logps", rejected_logps), ("ref_chosen_logps", ref_chosen_logps),
                    ("ref_rejected_logps", ref_rejected_logps)):
        if t.shape != chosen_logps.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, chosen_logps {tuple(chosen_logps.shape)}")
    if n == 0:
        raise ValueError("dpo_loss needs at least one pair")
    chosen_ratio = chosen_logps - ref_chosen_logps.detach()
    rejected_ratio = rejected_logps - ref_rejected_logps.detach()
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        per_pair = torch.relu(1 - beta * delta)
    else:  # ipo
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' needs chosen_lengths and rejected_lengths")
        lc = chosen_lengths.to(chosen_ratio.dtype).clamp(min=1.0)
        lr = rejected_lengths.to(rejected_ratio.dtype).clamp(min=1.0)
        per_pair = (chosen_ratio / lc - rejected_ratio / lr - 1 / (2 * beta)) ** 2
    loss = per_pair.mean()
    rc, rr = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    metrics = {
        "rewards_chosen": float(rc.mean()),
        "rewards_rejected": float(rr.mean()),
        "reward_accuracy": float((rc > rr).float().mean()),
        "reward_margin": float((rc - rr).mean()),
    }
    return loss, metrics


def dpo_term(
    logps: Tensor,
    ref_logps: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_index: Tensor,
    *,
    beta: float,
    loss_type: str,
    margin: float,
) -> tuple[Tensor, dict[str, float]]:
    """The DPO term of a learner step over a padded batch of groups.

    ``logps``/``ref_logps``/``mask`` are ``[B, T]`` completion token log-probs of the policy
    (with gradient), of the frozen reference, and the completion mask; ``rewards`` and
    ``group_index`` are ``[B]``. Returns ``(loss, metrics)``; with no pair in the batch the loss
    is a zero that still depends on ``logps`` (so ``backward`` works) and ``dpo_pairs`` is 0.
    Metrics are prefixed ``dpo_``.
    """
    pairs = group_pairs(rewards, group_index, margin)
    if not pairs:
        return (logps * 0.0).sum(), {"dpo_pairs": 0.0, "dpo_loss": 0.0}
    c = torch.tensor([p[0] for p in pairs], device=logps.device)
    r = torch.tensor([p[1] for p in pairs], device=logps.device)
    seq = sequence_logps(logps, mask)
    ref = sequence_logps(ref_logps, mask)
    lengths = mask.sum(dim=-1)
    loss, m = dpo_loss(seq[c], seq[r], ref[c], ref[r], beta=beta, loss_type=loss_type,
                       chosen_lengths=lengths[c], rejected_lengths=lengths[r])
    out = {f"dpo_{k}": v for k, v in m.items()}
    out.update({"dpo_pairs": float(len(pairs)), "dpo_loss": float(loss.detach())})
    return loss, out
