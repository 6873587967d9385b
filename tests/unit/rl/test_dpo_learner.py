"""The DPO term of LearnerCore.step (L = L_GRPO + lambda * L_DPO) on tiny-random-llama, and pair
extraction from scored groups."""

from __future__ import annotations

import math

import pytest

from worldagent_ray.config import LearnerConfig
from worldagent_ray.rl.dpo import group_pairs, pairs_from_groups
from worldagent_ray.rl.learner import LearnerCore

from tests.factories import make_groups

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]


def _spread(groups, lo=0.0, hi=1.0):
    """Give every group one worst (lo) and one best (hi) sample, the rest in between."""
    for g in groups:
        n = len(g.rewards)
        g.rewards = [lo + (hi - lo) * (i % n) / (n - 1) for i in range(n)]
    return groups


def test_group_pairs_best_vs_worst_above_margin():
    rewards = [0.25, 0.75, 0.75, 0.25, 0.25, 0.25, 0.25, 0.5, 1.0]
    gidx = [0, 0, 0, 0, 1, 1, 1, 1, 2]
    assert group_pairs(rewards, gidx, 0.3) == [(1, 0)]  # ties -> earliest; group 1 spread 0.25 < 0.3
    assert group_pairs(rewards, gidx, 0.25) == [(1, 0), (7, 4)]  # a spread equal to the margin pairs
    assert group_pairs(rewards, gidx, 0.6) == []  # single-sample group 2 never pairs
    with pytest.raises(ValueError, match="margin"):
        group_pairs(rewards, gidx, 0.0)
    with pytest.raises(ValueError, match="rewards"):
        group_pairs(rewards, gidx[:-1], 0.1)
    groups = _spread(make_groups(3, n_groups=3, group_size=4))
    groups[2].rewards = [0.3] * 4
    got = pairs_from_groups(groups, 0.5)
    assert [(g.group_id, c, r) for g, c, r in got] == [(groups[0].group_id, 3, 0), (groups[1].group_id, 3, 0)]


def test_dpo_term_adds_lambda_times_dpo_to_the_grpo_loss(tiny_llama_path):
    groups = _spread(make_groups(1, n_groups=2, group_size=4))
    plain = LearnerCore(LearnerConfig(lr=1e-3, seed=0), tiny_llama_path)
    m0 = plain.step(groups)
    both = LearnerCore(LearnerConfig(lr=1e-3, seed=0, dpo_coef=0.5, dpo_beta=0.2, dpo_margin=0.5), tiny_llama_path)
    m1 = both.step(groups)
    # Step 1: the policy is the reference, so every log-ratio is 0 and sigmoid DPO is log 2.
    assert m1["dpo_pairs"] == 2.0
    assert m1["dpo_loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert m1["loss"] == pytest.approx(m0["loss"] + 0.5 * m1["dpo_loss"], abs=1e-5)
    assert both.ref_module is not None and plain.ref_module is None  # frozen copy only when needed
    # The DPO gradient moves the weights differently from GRPO alone.
    diff = sum(float((a - b).detach().abs().sum()) for a, b in zip(plain.module.parameters(), both.module.parameters()))
    assert diff > 0


def test_dpo_alone_raises_the_chosen_margin(tiny_llama_path):
    """With GRPO's advantages zeroed out (all rewards of a group equal except the pair), DPO steps
    push the chosen completion's log-ratio above the rejected one's."""
    groups = _spread(make_groups(2, n_groups=2, group_size=2))
    core = LearnerCore(LearnerConfig(lr=3e-3, seed=0, dpo_coef=1.0, dpo_beta=0.5, dpo_margin=0.5,
                                     loss_type="grpo"), tiny_llama_path)
    margins = [core.step(groups)["dpo_reward_margin"] for _ in range(4)]
    assert margins[0] == pytest.approx(0.0, abs=1e-6)
    assert margins[-1] > margins[0] + 1e-3, margins


def test_dpo_with_lora_uses_the_base_model_as_reference(tiny_llama_path):
    groups = _spread(make_groups(4, n_groups=1, group_size=4))
    core = LearnerCore(LearnerConfig(lr=1e-3, seed=0, lora=True, lora_rank=4, lora_alpha=8, dpo_coef=1.0,
                                     dpo_loss_type="ipo", dpo_margin=0.5), tiny_llama_path)
    assert core.ref_module is None
    m = core.step(groups)
    # IPO at step 1 (log-ratios 0): (0 - 1 / (2 beta))^2 with beta = 0.1.
    assert m["dpo_loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-5)
    m2 = core.step(groups)
    assert m2["dpo_loss"] != pytest.approx(m["dpo_loss"], rel=1e-6)  # adapters moved away from the base
