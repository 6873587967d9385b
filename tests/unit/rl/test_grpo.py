"""Unit tests of the GRPO maths (:mod:`worldagent_ray.rl.grpo`) on hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worldagent_ray.rl.grpo import (
    gather_logprobs,
    grpo_loss,
    group_advantages,
    importance_weights,
    off_policy_mask,
    sequence_logprobs,
    token_logprobs,
)

DT = torch.float64


# --------------------------------------------------------------------------- advantages


def test_advantages_zero_mean_per_group_and_zero_for_constant_groups():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.5, 0.2, 0.9, 0.4], dtype=DT)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    adv = group_advantages(rewards, groups)
    for g in range(3):
        assert abs(float(adv[groups == g].sum())) < 1e-12
    assert torch.equal(adv[groups == 1], torch.zeros(3, dtype=DT))


def test_advantages_hand_computed():
    # group {1, 0}: mean 0.5, unbiased std sqrt(0.5)
    adv = group_advantages(torch.tensor([1.0, 0.0], dtype=DT), torch.tensor([7, 7]), eps=0.0)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5], dtype=DT) / math.sqrt(0.5))
    adv = group_advantages(torch.tensor([1.0, 0.0], dtype=DT), torch.tensor([7, 7]), scale="none")
    assert torch.equal(adv, torch.tensor([0.5, -0.5], dtype=DT))
    # batch scale: divide by the std of all rewards, not the group's
    r = torch.tensor([1.0, 0.0, 3.0, 3.0], dtype=DT)
    adv = group_advantages(r, torch.tensor([0, 0, 1, 1]), scale="batch", eps=0.0)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, 0.0, 0.0], dtype=DT) / r.std())


def test_advantages_singleton_group_is_zero():
    adv = group_advantages(torch.tensor([0.3, 0.9, 0.1], dtype=DT), torch.tensor([0, 1, 1]))
    assert adv[0] == 0.0 and adv[1] > 0 > adv[2]


@pytest.mark.parametrize(
    "rewards,groups,match",
    [
        (torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]), "finite"),
        (torch.tensor([1.0, 2.0]), torch.tensor([0, 0, 1]), "group_index"),
        (torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), "integer"),
        (torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.long), r"rewards must have shape \[B\]"),
    ],
)
def test_advantages_bad_input(rewards, groups, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, groups)


def test_advantages_bad_scale():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.ones(2), torch.zeros(2, dtype=torch.long), scale="grp")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- log-probs


def test_token_logprobs_shift_and_temperature():
    logits = torch.randn(2, 5, 7, dtype=DT)
    ids = torch.randint(0, 7, (2, 5))
    out = token_logprobs(logits, ids, temperature=0.5)
    assert out.shape == (2, 4)
    expected = torch.log_softmax(logits[:, :-1] / 0.5, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(out, expected, atol=1e-12)
    # bf16 path (log_softmax per row) agrees to bf16 precision
    out16 = gather_logprobs(logits[:, :-1].to(torch.bfloat16), ids[:, 1:])
    assert torch.allclose(out16.to(DT), torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1), atol=0.1)


def test_logprobs_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        gather_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="input_ids"):
        token_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))


def test_sequence_logprobs():
    lp = torch.tensor([[-1.0, -2.0, -3.0]], dtype=DT)
    m = torch.tensor([[1, 1, 0]])
    assert sequence_logprobs(lp, m).item() == -3.0
    assert sequence_logprobs(lp, m, "mean").item() == -1.5


# --------------------------------------------------------------------------- clipping


def _one_token(ratio: float, adv: float, **kw):
    logp = torch.tensor([[math.log(ratio)]], dtype=DT, requires_grad=True)
    old = torch.zeros(1, 1, dtype=DT)
    loss, met = grpo_loss(logp, old, torch.tensor([adv], dtype=DT), torch.ones(1, 1), **kw)
    loss.backward()
    return loss.item(), logp.grad.item(), met


def test_clipping_kills_gradient_beyond_the_trust_region():
    # positive advantage, ratio above 1 + eps_high: clipped, no gradient
    loss, grad, met = _one_token(1.5, 2.0, epsilon_low=0.2, epsilon_high=0.28)
    assert loss == pytest.approx(-1.28 * 2.0) and grad == 0.0
    assert met["clip_ratio/high_mean"] == 1.0 and met["clip_ratio/low_mean"] == 0.0
    # the same ratio inside a wider epsilon_high: gradient -A * r
    loss, grad, met = _one_token(1.2, 2.0, epsilon_low=0.2, epsilon_high=0.28)
    assert grad == pytest.approx(-2.0 * 1.2) and met["clip_ratio/region_mean"] == 0.0
    # negative advantage, ratio below 1 - eps_low: clipped, no gradient
    loss, grad, met = _one_token(0.5, -1.0, epsilon_low=0.2, epsilon_high=0.28)
    assert loss == pytest.approx(0.8) and grad == 0.0 and met["clip_ratio/low_mean"] == 1.0
    # negative advantage, ratio above 1 + eps: NOT clipped (pessimistic bound keeps the gradient)
    loss, grad, _ = _one_token(1.5, -1.0, epsilon_low=0.2, epsilon_high=0.28)
    assert loss == pytest.approx(1.5) and grad == pytest.approx(1.5)


def test_two_sided_delta_caps_the_unclipped_ratio():
    loss, grad, _ = _one_token(4.0, -1.0, delta=2.0)
    assert loss == pytest.approx(2.0) and grad == 0.0


def test_on_policy_gradient_is_minus_advantage():
    logp = torch.log(torch.tensor([[0.3, 0.6]], dtype=DT)).requires_grad_(True)
    loss, _ = grpo_loss(logp, None, torch.tensor([0.5], dtype=DT), torch.ones(1, 2), loss_type="bnpo")
    loss.backward()
    assert loss.item() == pytest.approx(-0.5)
    assert torch.allclose(logp.grad, torch.full((1, 2), -0.25, dtype=DT))


# --------------------------------------------------------------------------- normalisations


def _two_seqs():
    # per-token loss is -A (ratio 1): seq0 A=1 with 3 tokens, seq1 A=-2 with 1 token (+2 padding)
    logp = torch.zeros(2, 3, dtype=DT, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([1.0, -2.0], dtype=DT)
    return logp, mask, adv


@pytest.mark.parametrize(
    "loss_type,kw,expected",
    [
        ("grpo", {}, ((-1.0 * 3 / 3) + (2.0 / 1)) / 2),  # mean of sequence means: (-1 + 2) / 2
        ("bnpo", {}, (-3.0 + 2.0) / 4),  # token mean over the batch
        ("dr_grpo", {"max_completion_length": 5}, (-3.0 + 2.0) / (2 * 5)),
        ("dapo", {}, (-3.0 + 2.0) / 4),
        ("dapo", {"num_items_in_batch": 10}, (-3.0 + 2.0) / 10),
        ("grpo", {"grad_accum_steps": 4}, 0.5 / 4),
        ("bnpo", {"grad_accum_steps": 2}, -0.25 / 2),
    ],
)
def test_loss_type_normalisations(loss_type, kw, expected):
    logp, mask, adv = _two_seqs()
    loss, met = grpo_loss(logp, logp.detach(), adv, mask, loss_type=loss_type, **kw)
    assert loss.item() == pytest.approx(expected)
    assert met["num_tokens"] == 4.0


def test_masking_drops_padded_tokens():
    logp, mask, adv = _two_seqs()
    with torch.no_grad():
        garbage = logp.detach().clone()
        garbage[1, 1:] = 50.0  # huge ratios on padding
    logp2 = garbage.clone().requires_grad_(True)
    for lt in ("grpo", "bnpo", "dapo"):
        a, _ = grpo_loss(logp, logp.detach(), adv, mask, loss_type=lt)
        b, _ = grpo_loss(logp2, torch.zeros_like(garbage), adv, mask, loss_type=lt)
        assert a.item() == pytest.approx(b.item())
    b.backward()
    assert torch.equal(logp2.grad[1, 1:], torch.zeros(2, dtype=DT))


def test_kl_term_k3():
    logp = torch.tensor([[math.log(0.5)]], dtype=DT, requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]], dtype=DT)
    loss, met = grpo_loss(logp, None, torch.zeros(1, dtype=DT), torch.ones(1, 1), beta=0.1, ref_logps=ref,
                          loss_type="bnpo")
    k3 = 0.5 - math.log(0.5) - 1  # exp(ref-logp) - (ref-logp) - 1 with ref-logp = log 0.5
    assert met["kl"] == pytest.approx(k3)
    assert loss.item() == pytest.approx(0.1 * k3)


def test_grpo_loss_bad_input():
    lp = torch.zeros(2, 3, dtype=DT)
    m = torch.ones(2, 3)
    adv = torch.zeros(2, dtype=DT)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(lp, None, adv, m, loss_type="ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(lp, None, adv, m, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(lp, None, adv, m, beta=0.1)
    with pytest.raises(ValueError, match="mask has shape"):
        grpo_loss(lp, None, adv, torch.ones(2, 4))
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(lp, None, torch.zeros(3), m)
    with pytest.raises(ValueError, match="is_weights"):
        grpo_loss(lp, None, adv, m, is_weights=torch.ones(2, 2))


# --------------------------------------------------------------------------- importance weights


def test_is_truncation_caps_weights_and_mask_zeroes_them():
    learner = torch.tensor([[0.0, 0.0, 0.0]], dtype=DT)
    rollout = torch.tensor([[-2.0, 0.0, 1.0]], dtype=DT)  # token ratios e^2, 1, e^-1
    m = torch.ones(1, 3)
    w = importance_weights(learner, rollout, m, "token_truncate", cap=3.0)
    assert torch.allclose(w, torch.tensor([[3.0, 1.0, math.exp(-1)]], dtype=DT))
    w = importance_weights(learner, rollout, m, "token_mask", cap=3.0, cap_min=0.5)
    assert torch.allclose(w, torch.tensor([[0.0, 1.0, 0.0]], dtype=DT))
    # sequence: exp(2 + 0 - 1) = e, under the cap, broadcast over tokens
    w = importance_weights(learner, rollout, m, "sequence_truncate", cap=3.0)
    assert torch.allclose(w, torch.full((1, 3), math.e, dtype=DT))
    w = importance_weights(learner, rollout, m, "sequence_mask", cap=2.0)
    assert torch.equal(w, torch.zeros(1, 3, dtype=DT))
    assert torch.equal(importance_weights(learner, rollout, m, "none", cap=3.0), torch.ones(1, 3, dtype=DT))


def test_is_ignores_padding_and_nan():
    learner = torch.zeros(1, 3, dtype=DT)
    rollout = torch.tensor([[-0.5, float("nan"), -9.0]], dtype=DT)
    w = importance_weights(learner, rollout, torch.tensor([[1, 1, 0]]), "sequence_truncate", cap=10.0)
    assert torch.allclose(w, torch.full((1, 3), math.exp(0.5), dtype=DT))


def test_is_weights_scale_the_loss_and_are_reported():
    logp, mask, adv = _two_seqs()
    w = torch.tensor([[2.0, 2.0, 2.0], [0.5, 7.0, 7.0]], dtype=DT)
    base, _ = grpo_loss(logp, logp.detach(), adv, mask, loss_type="bnpo")
    loss, met = grpo_loss(logp, logp.detach(), adv, mask, loss_type="bnpo", is_weights=w)
    assert loss.item() == pytest.approx((-3.0 * 2 + 2.0 * 0.5) / 4) != base.item()
    assert (met["is_weight/min"], met["is_weight/max"]) == (0.5, 2.0)


def test_is_bad_input():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="mode"):
        importance_weights(x, x, x, "tis", cap=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cap_min"):
        importance_weights(x, x, x, "token_mask", cap=1.0, cap_min=2.0)
    with pytest.raises(ValueError, match="rollout_logps"):
        importance_weights(x, torch.zeros(1, 3), x, "token_mask", cap=1.0)


# --------------------------------------------------------------------------- off-policy mask


def test_off_policy_mask_only_drops_negative_advantage_high_kl():
    logps = torch.zeros(4, 2, dtype=DT)
    rollout = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.01, 0.01], [1.0, 1.0]], dtype=DT)  # KL est 1, 1, .01, 1
    adv = torch.tensor([1.0, -1.0, -1.0, 0.0], dtype=DT)
    keep = off_policy_mask(adv, logps, rollout, torch.ones(4, 2), delta=0.5)
    assert keep.flatten().tolist() == [1.0, 0.0, 1.0, 1.0]
    loss, met = grpo_loss(logps.requires_grad_(True), None, adv, torch.ones(4, 2), keep_mask=keep)
    loss.backward()
    assert torch.equal(logps.grad[1], torch.zeros(2, dtype=DT)) and met["keep_frac"] == 0.75


# --------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 5),
    t=st.integers(1, 6),
    loss_type=st.sampled_from(["grpo", "bnpo", "dr_grpo", "dapo"]),
    is_mode=st.sampled_from(["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]),
    beta=st.sampled_from([0.0, 0.05]),
    seed=st.integers(0, 10_000),
    scale=st.floats(0.0, 5.0),
)
def test_loss_is_finite_with_finite_grads(b, t, loss_type, is_mode, beta, seed, scale):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(b, t, generator=g, dtype=DT) * 5).requires_grad_(True)
    old = logp.detach() + scale * torch.randn(b, t, generator=g, dtype=DT)
    roll = old + scale * torch.randn(b, t, generator=g, dtype=DT)
    mask = (torch.rand(b, t, generator=g) < 0.7).long()  # rows may be fully masked
    adv = group_advantages(torch.rand(b, generator=g, dtype=DT), torch.arange(b) // 2)
    w = importance_weights(old, roll, mask, is_mode, cap=3.0)
    loss, met = grpo_loss(logp, old, adv, mask, loss_type=loss_type, beta=beta, ref_logps=old,
                          is_weights=w, max_completion_length=t, epsilon_high=0.28)
    loss.backward()
    assert loss.shape == () and torch.isfinite(loss)
    assert torch.isfinite(logp.grad).all()
    assert torch.equal(logp.grad[mask == 0], torch.zeros_like(logp.grad[mask == 0]))
    assert all(math.isfinite(v) for v in met.values())
    assert 0.0 <= met["clip_ratio/region_mean"] <= 1.0
    assert w.shape == (b, t) and (w >= 0).all() and (w <= 3.0).all()


@settings(max_examples=60, deadline=None)
@given(
    rewards=st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=16),
    n_groups=st.integers(1, 4),
    scale=st.sampled_from(["group", "batch", "none"]),
)
def test_advantages_properties(rewards, n_groups, scale):
    r = torch.tensor(rewards, dtype=DT)
    groups = torch.arange(len(rewards)) % n_groups
    adv = group_advantages(r, groups, scale=scale)
    assert adv.shape == r.shape and torch.isfinite(adv).all()
    for gid in groups.unique():
        sel = groups == gid
        assert abs(float(adv[sel].sum())) < 1e-6 * max(1.0, float(adv[sel].abs().sum()))
        if torch.all(r[sel] == r[sel][0]):
            assert torch.all(adv[sel] == 0)
