"""Parity of :mod:`worldagent_ray.rl.dpo` with TRL 1.16's DPOTrainer, used as the oracle.

TRL keeps the DPO loss in ``DPOTrainer._compute_loss(self, model, inputs, return_outputs)``. We call
it unbound on a small stand-in object holding only the attributes it reads, with a model whose
"forward" turns one logits parameter into per-token log-probs (TRL's fused-LM-head output
contract) and precomputed reference log-probs. Our side starts from a copy of the same logits
leaf. Loss, gradient w.r.t. the logits and the logged reward metrics must agree to 1e-6 in
float64, for the sigmoid, hinge and ipo losses, with completions of different lengths.
"""

from __future__ import annotations

import types
from collections import defaultdict
from itertools import product

import pytest
import torch

pytest.importorskip("trl.trainer.dpo_trainer")
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402

from worldagent_ray.rl.dpo import dpo_loss, dpo_term, sequence_logps  # noqa: E402
from worldagent_ray.rl.grpo import token_logprobs  # noqa: E402

TOL = 1e-6
DT = torch.float64
N, P, C, V = 4, 3, 6, 13  # pairs, prompt length, completion length, vocabulary


class _Accel:
    device = torch.device("cpu")

    def gather(self, t):
        return t

    def gather_for_metrics(self, t):
        return t


class FusedHeadModel(torch.nn.Module):
    """A "causal LM" whose logits are one parameter ``[2N, L, V]``; ``forward(..., labels,
    fused_lm_head=True)`` returns what TRL's fused head returns: per-token log-probs of
    ``labels[:, 1:]`` (0 where the label is -100), entropies, mean logits and top-1 flags."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids, attention_mask=None, labels=None, fused_lm_head=False, **_):
        assert fused_lm_head and labels is not None
        lp = torch.log_softmax(self.logits[:, :-1], dim=-1)
        lab = labels[:, 1:]
        valid = lab != -100
        picked = lp.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~valid, 0.0)
        return types.SimpleNamespace(
            log_probs=picked,
            entropy=-(lp.exp() * lp).sum(-1),
            mean_logits=self.logits[:, :-1].mean(-1),
            is_top1=lp.argmax(-1) == lab,
        )


def _trl_stub(loss_type: str, beta: float):
    return types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=_Accel(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )


def _batch(seed: int):
    """``[chosen x N; rejected x N]`` rows of prompt + right-padded completion."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * N, P + C, V, generator=g, dtype=DT) * 2.0
    ids = torch.randint(0, V, (2 * N, P + C), generator=g)
    lengths = torch.randint(1, C + 1, (2 * N,), generator=g)
    cmask = torch.zeros(2 * N, P + C, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        cmask[i, P : P + n] = 1
    attn = torch.ones_like(cmask)
    for i, n in enumerate(lengths.tolist()):
        attn[i, P + n :] = 0
    ref = torch.randn(2 * N, generator=g, dtype=DT) * 3.0 - 8.0
    return logits, ids, cmask, attn, ref


@pytest.mark.parametrize("loss_type, beta, seed", list(product(["sigmoid", "hinge", "ipo"], [0.1, 0.7], [0, 1, 2])))
def test_dpo_loss_and_gradients_match_trl(loss_type, beta, seed):
    logits, ids, cmask, attn, ref = _batch(seed)

    model = FusedHeadModel(logits)
    stub = _trl_stub(loss_type, beta)
    inputs = {"input_ids": ids, "attention_mask": attn, "completion_mask": cmask,
              "ref_chosen_logps": ref[:N], "ref_rejected_logps": ref[N:]}
    trl_loss = DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    trl_loss.backward()

    leaf = logits.clone().requires_grad_(True)
    tok = token_logprobs(leaf, ids)  # [2N, L-1]
    mask = cmask[:, 1:].to(DT)
    seq = sequence_logps(tok, mask)
    lengths = mask.sum(-1)
    ours, metrics = dpo_loss(seq[:N], seq[N:], ref[:N], ref[N:], beta=beta, loss_type=loss_type,
                             chosen_lengths=lengths[:N], rejected_lengths=lengths[N:])
    ours.backward()

    assert abs(float(ours.detach()) - float(trl_loss.detach())) < TOL
    assert float((leaf.grad - model.logits.grad).abs().max()) < TOL
    assert float(leaf.grad.abs().sum()) > 0  # the comparison is not between two zeros
    m = stub._metrics["train"]
    assert abs(metrics["rewards_chosen"] - m["rewards/chosen"][0]) < TOL
    assert abs(metrics["rewards_rejected"] - m["rewards/rejected"][0]) < TOL
    assert abs(metrics["reward_margin"] - m["rewards/margins"][0]) < TOL
    assert abs(metrics["reward_accuracy"] - m["rewards/accuracies"][0]) < TOL


def test_dpo_term_picks_each_groups_best_and_worst_and_equals_dpo_loss():
    logits, ids, cmask, _, _ = _batch(5)
    g = torch.Generator().manual_seed(9)
    ref_tok = -torch.rand(2 * N, P + C - 1, generator=g, dtype=DT)
    leaf = logits.clone().requires_grad_(True)
    tok = token_logprobs(leaf, ids)[:, -C:]
    mask = cmask[:, -C:].to(DT)
    ref_tok = ref_tok[:, -C:]
    # Two groups of four: group 0 has rewards spread, group 1 is within the margin.
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.1, 0.50, 0.55, 0.52, 0.51], dtype=DT)
    gidx = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    loss, m = dpo_term(tok, ref_tok, mask, rewards, gidx, beta=0.3, loss_type="sigmoid", margin=0.2)
    assert m["dpo_pairs"] == 1.0
    seq, ref = sequence_logps(tok, mask), sequence_logps(ref_tok, mask)
    want, _ = dpo_loss(seq[1:2], seq[0:1], ref[1:2], ref[0:1], beta=0.3)  # best row 1, worst row 0 (first tie)
    assert abs(float(loss) - float(want)) < TOL
    none, m0 = dpo_term(tok, ref_tok, mask, rewards, gidx, beta=0.3, loss_type="sigmoid", margin=0.95)
    assert m0["dpo_pairs"] == 0.0 and float(none) == 0.0
    none.backward()  # a batch without pairs still back-propagates (zero gradient)
    assert float(leaf.grad.abs().max()) == 0.0


def test_dpo_loss_rejects_bad_arguments():
    x = torch.zeros(2, dtype=DT)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="ipo"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="rejected_logps"):
        dpo_loss(x, torch.zeros(3, dtype=DT), x, x, beta=0.1)
    with pytest.raises(ValueError, match="at least one pair"):
        dpo_loss(x[:0], x[:0], x[:0], x[:0], beta=0.1)
