"""Parity of :mod:`worldagent_ray.rl.grpo` with TRL 1.16's GRPOTrainer, used as the oracle.

TRL keeps its loss in ``GRPOTrainer._compute_loss(self, model, inputs)``; we call it unbound on
a small stand-in object holding only the attributes it reads, with a model whose "forward"
turns one logits parameter into per-token log-probs (TRL's fused-LM-head output contract).
Our side starts from a copy of the same logits leaf. Loss, gradient w.r.t. the logits and the
logged metrics must agree to 1e-6 in float64.

TRL computes advantages and the vLLM importance-sampling ratio inline in the long
``_generate_and_score_completions``; those two blocks are lifted out of TRL's own source with
``ast`` and executed on the same tensors, so the oracle is TRL's code, not a transcription.

The largest differences seen are printed (run with ``-s``) and collected in ``MAX_DIFFS``.
"""

from __future__ import annotations

import ast
import inspect
import math
import textwrap
import types
import zlib
from collections import defaultdict
from contextlib import nullcontext
from itertools import product

import pytest
import torch

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

from worldagent_ray.rl.grpo import (  # noqa: E402
    grpo_loss,
    group_advantages,
    importance_weights,
    off_policy_mask,
    token_logprobs,
)

TOL = 1e-6
MAX_DIFFS: dict[str, float] = defaultdict(float)
DT = torch.float64


def _record(name: str, ours: torch.Tensor | float, theirs: torch.Tensor | float) -> float:
    d = float((torch.as_tensor(ours, dtype=DT) - torch.as_tensor(theirs, dtype=DT)).abs().max())
    MAX_DIFFS[name] = max(MAX_DIFFS[name], d)
    return d


@pytest.fixture(scope="module", autouse=True)
def _print_max_diffs():
    yield
    print("\nmax |ours - TRL| observed:")
    for k, v in sorted(MAX_DIFFS.items()):
        print(f"  {k:40s} {v:.3e}")


# --------------------------------------------------------------------------- TRL stand-ins


class _Accel:
    """The accelerator calls ``_compute_loss`` makes, for one process."""

    num_processes = 1
    is_main_process = True

    def autocast(self):
        return nullcontext()

    def reduce(self, t, reduction="sum"):
        return t

    def gather(self, t):
        return t

    def gather_for_metrics(self, t):
        return t


class LogitsModel(torch.nn.Module):
    """A "causal LM" whose logits are one parameter ``[B, L, V]``, with TRL's fused-head contract.

    ``forward(input_ids, attention_mask, labels, fused_lm_head=True)`` returns per-token
    log-probs of ``labels[:, 1:]`` under ``logits[:, :-1]`` (0 where the label is -100) and
    the entropies, as ``add_fused_lm_head`` does, computed here with a plain log_softmax.
    """

    def __init__(self, logits: torch.Tensor, temperature: float = 1.0):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())
        self.temperature = temperature

    def forward(self, input_ids, attention_mask=None, labels=None, fused_lm_head=False, **_):
        assert fused_lm_head and labels is not None
        lp = torch.log_softmax(self.logits[:, :-1] / self.temperature, dim=-1)
        lab = labels[:, 1:]
        valid = lab != -100
        picked = lp.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~valid, 0.0)
        ent = -(lp.exp() * lp).sum(-1).masked_fill(~valid, 0.0)
        return types.SimpleNamespace(log_probs=picked, entropy=ent)


def _trl_stub(**kw):
    """An object with the attributes ``GRPOTrainer._compute_loss`` reads."""
    args = types.SimpleNamespace(
        use_bias_correction_kl=kw.pop("use_bias_correction_kl", True),
        delta=kw.pop("delta", None),
        steps_per_generation=kw.pop("steps_per_generation", 1),
    )
    s = types.SimpleNamespace(
        args=args,
        accelerator=_Accel(),
        model=types.SimpleNamespace(training=True),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        _entropy_bonus_enabled=False,
        importance_sampling_level="token",
        off_policy_mask_threshold=None,
        beta=0.0,
        loss_type="dapo",
        epsilon_low=0.2,
        epsilon_high=0.2,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        max_completion_length=None,
        current_gradient_accumulation_steps=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
    )
    for k, v in kw.items():
        setattr(s, k, v)
    s._get_per_token_logps_and_entropies = types.MethodType(GRPOTrainer._get_per_token_logps_and_entropies, s)
    return s


def _lift_block(func, predicate) -> types.CodeType:
    """Compile the first top-level-or-nested ``if`` statement of ``func`` matching ``predicate``."""
    src = textwrap.dedent(inspect.getsource(func))
    tree = ast.parse(src)
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and predicate(ast.unparse(node.test), ast.unparse(node)):
            return compile(ast.Module(body=[node], type_ignores=[]), "<trl-block>", "exec")
    raise AssertionError("block not found in TRL source: TRL changed, update the parity test")


_IS_BLOCK = _lift_block(
    GRPOTrainer._generate_and_score_completions,
    lambda test, body: test == "self.use_vllm and self.vllm_importance_sampling_correction"
    and "vllm_importance_sampling_ratio = torch.exp" in body,
)
_ADV_BLOCK = _lift_block(
    GRPOTrainer._generate_and_score_completions,
    lambda test, body: test == "self.multi_objective_aggregation == 'sum_then_normalize'",
)


def trl_is_ratio(old, sampling, mask, mode, clip_max, clip_min=None):
    stub = types.SimpleNamespace(
        use_vllm=True,
        vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_max=clip_max,
        vllm_importance_sampling_clip_min=clip_min,
    )
    ns = dict(
        self=stub, torch=torch, math=math, completion_mask=mask, tool_mask=None,
        old_per_token_logps=old, sampling_per_token_logps=sampling,
    )
    exec(_IS_BLOCK, ns)  # TRL's own code, from the installed package
    return ns["vllm_importance_sampling_ratio"]


def trl_advantages(rewards, num_generations, scale):
    stub = types.SimpleNamespace(
        multi_objective_aggregation="sum_then_normalize", reward_weights=torch.ones(1, dtype=rewards.dtype),
        scale_rewards=scale,
    )
    ns = dict(
        self=stub, torch=torch, nanstd=nanstd, rewards_per_func=rewards.unsqueeze(1), device=rewards.device,
        unscorable_mask=torch.zeros_like(rewards, dtype=torch.bool), num_generations=num_generations,
    )
    exec(_ADV_BLOCK, ns)
    return ns["advantages"]


# --------------------------------------------------------------------------- fixtures


B, P, C, V = 6, 3, 7, 11


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, P + C, V, generator=g, dtype=DT) * 2.0
    ids = torch.randint(0, V, (B, P + C), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    lengths = torch.tensor([C, C - 2, 1, C - 3, C, 4])
    completion_mask = (torch.arange(C).unsqueeze(0) < lengths.unsqueeze(1)).long()
    with torch.no_grad():
        lp = torch.log_softmax(logits[:, P - 1 : -1], -1).gather(-1, ids[:, P:].unsqueeze(-1)).squeeze(-1)
    # pi_old and the sampler drift away from the current logits so that clipping and IS bite.
    old = lp + 0.35 * torch.randn(B, C, generator=g, dtype=DT)
    sampling = old + 0.5 * torch.randn(B, C, generator=g, dtype=DT)
    ref = lp + 0.3 * torch.randn(B, C, generator=g, dtype=DT)
    adv = torch.tensor([1.3, -0.7, 0.4, -1.1, 0.0, 0.9], dtype=DT)
    return dict(
        logits=logits, ids=ids, prompt_mask=prompt_mask, completion_mask=completion_mask,
        old=old, sampling=sampling, ref=ref, adv=adv,
    )


def _run_trl(b, stub, is_ratio=None, num_items=None):
    model = LogitsModel(b["logits"])
    inputs = {
        "prompt_ids": b["ids"][:, :P], "prompt_mask": b["prompt_mask"],
        "completion_ids": b["ids"][:, P:], "completion_mask": b["completion_mask"],
        "advantages": b["adv"], "old_per_token_logps": b["old"],
        "num_items_in_batch": torch.tensor(float(b["completion_mask"].sum()) if num_items is None else num_items, dtype=DT),
    }
    if stub.beta != 0.0:
        inputs["ref_per_token_logps"] = b["ref"]
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
        inputs["sampling_per_token_logps"] = b["sampling"]
    loss = GRPOTrainer._compute_loss(stub, model, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return loss.detach(), model.logits.grad.clone(), metrics


def _run_ours(b, **kw):
    leaf = b["logits"].clone().requires_grad_(True)
    logps = token_logprobs(leaf, b["ids"])[:, -C:]
    loss, metrics = grpo_loss(logps, b["old"], b["adv"], b["completion_mask"], **kw)
    loss.backward()
    return loss.detach(), leaf.grad.clone(), metrics


# --------------------------------------------------------------------------- tests

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
IS_MODES = [None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


@pytest.mark.parametrize("loss_type,beta,is_mode", list(product(LOSS_TYPES, [0.0, 0.04], IS_MODES)))
def test_loss_and_grad_match_trl(loss_type, beta, is_mode):
    b = _batch(seed=zlib.crc32(repr((loss_type, beta, is_mode)).encode()) % 1000)
    eps_lo, eps_hi, accum, spg = 0.2, 0.28, 2, 2
    stub = _trl_stub(
        loss_type=loss_type, beta=beta, epsilon_low=eps_lo, epsilon_high=eps_hi, max_completion_length=C + 1,
        current_gradient_accumulation_steps=accum, steps_per_generation=spg,
        use_vllm=is_mode is not None, vllm_importance_sampling_correction=is_mode is not None,
    )
    is_trl = None
    is_ours = None
    if is_mode is not None:
        is_trl = trl_is_ratio(b["old"], b["sampling"], b["completion_mask"], is_mode, clip_max=2.0)
        is_ours = importance_weights(b["old"], b["sampling"], b["completion_mask"], is_mode, cap=2.0)
        _record("importance_weights (in loss tests)", is_ours, is_trl.expand_as(is_ours))
    n_items = float(b["completion_mask"].sum())
    loss_t, grad_t, met_t = _run_trl(b, stub, is_ratio=is_trl, num_items=n_items)
    loss_o, grad_o, met_o = _run_ours(
        b, loss_type=loss_type, beta=beta, ref_logps=b["ref"], epsilon_low=eps_lo, epsilon_high=eps_hi,
        is_weights=is_ours, max_completion_length=C + 1, grad_accum_steps=accum,
        num_items_in_batch=n_items / 1 * accum / spg,
    )
    assert grad_t.abs().max() > 1e-3, "degenerate case: no gradient"
    assert _record(f"loss[{loss_type}]", loss_o, loss_t) < TOL
    assert _record(f"grad[{loss_type}]", grad_o, grad_t) < TOL
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean") + (("kl",) if beta else ()):
        assert _record(f"metric {key}", met_o[key], met_t[key]) < TOL, key


def test_cases_exercise_clipping_and_is():
    """The fixtures are not degenerate: both clip sides and IS truncation/masking are active."""
    b = _batch(seed=3)
    _, _, met = _run_ours(b, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28)
    assert met["clip_ratio/low_mean"] > 0 and met["clip_ratio/high_mean"] > 0
    w = importance_weights(b["old"], b["sampling"], b["completion_mask"], "token_truncate", cap=2.0)
    assert (w[b["completion_mask"].bool()] == 2.0).any()
    w = importance_weights(b["old"], b["sampling"], b["completion_mask"], "token_mask", cap=2.0)
    assert (w[b["completion_mask"].bool()] == 0.0).any()


@pytest.mark.parametrize("use_bias_correction_kl", [True, False])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_kl_bias_correction_and_sequence_level_match_trl(use_bias_correction_kl, level):
    b = _batch(seed=11)
    stub = _trl_stub(loss_type="grpo", beta=0.1, use_bias_correction_kl=use_bias_correction_kl,
                     importance_sampling_level=level, epsilon_low=0.2, epsilon_high=0.28)
    loss_t, grad_t, met_t = _run_trl(b, stub)
    loss_o, grad_o, met_o = _run_ours(b, loss_type="grpo", beta=0.1, ref_logps=b["ref"],
                                      use_bias_correction_kl=use_bias_correction_kl,
                                      importance_sampling_level=level, epsilon_low=0.2, epsilon_high=0.28)
    assert _record("loss[kl/level]", loss_o, loss_t) < TOL
    assert _record("grad[kl/level]", grad_o, grad_t) < TOL
    assert _record("metric kl", met_o["kl"], met_t["kl"]) < TOL


def test_two_sided_clipping_delta_matches_trl():
    b = _batch(seed=5)
    stub = _trl_stub(loss_type="bnpo", delta=1.1, epsilon_low=0.2, epsilon_high=0.28)
    loss_t, grad_t, _ = _run_trl(b, stub)
    loss_o, grad_o, _ = _run_ours(b, loss_type="bnpo", delta=1.1, epsilon_low=0.2, epsilon_high=0.28)
    assert _record("loss[delta]", loss_o, loss_t) < TOL
    assert _record("grad[delta]", grad_o, grad_t) < TOL


@pytest.mark.parametrize("delta_kl", [0.05, 0.3])
def test_off_policy_mask_matches_trl(delta_kl):
    b = _batch(seed=7)
    m = b["completion_mask"]
    with torch.no_grad():
        logps = token_logprobs(b["logits"], b["ids"])[:, -C:]
    theirs = GRPOTrainer.get_off_policy_mask(b["adv"].unsqueeze(1), logps, b["sampling"], m, delta_kl)
    ours = off_policy_mask(b["adv"], logps, b["sampling"], m, delta_kl)
    assert torch.equal(ours, theirs.to(ours.dtype))
    # And inside the loss: TRL applies it when off_policy_mask_threshold is set.
    stub = _trl_stub(loss_type="dapo", off_policy_mask_threshold=delta_kl, use_vllm=True,
                     vllm_importance_sampling_correction=True)
    is_w = importance_weights(b["old"], b["sampling"], m, "token_truncate", cap=3.0)
    loss_t, grad_t, _ = _run_trl(b, stub, is_ratio=is_w)
    loss_o, grad_o, _ = _run_ours(b, loss_type="dapo", keep_mask=ours, is_weights=is_w)
    assert _record("loss[off_policy_mask]", loss_o, loss_t) < TOL
    assert _record("grad[off_policy_mask]", grad_o, grad_t) < TOL


def test_off_policy_mask_drops_something_at_small_delta():
    b = _batch(seed=7)
    with torch.no_grad():
        logps = token_logprobs(b["logits"], b["ids"])[:, -C:]
    keep = off_policy_mask(b["adv"], logps, b["sampling"], b["completion_mask"], 0.0)
    neg = b["adv"] < 0
    assert keep[~neg].eq(1).all() and keep[neg].eq(0).any()


@pytest.mark.parametrize("mode", IS_MODES[1:])
@pytest.mark.parametrize("clip_min,clip_max", [(None, 3.0), (0.5, 2.0), (0.8, None)])
def test_importance_weights_match_trl(mode, clip_min, clip_max):
    b = _batch(seed=13)
    sampling = b["sampling"].clone()
    sampling[0, 2] = float("nan")  # a token the engine could not score
    theirs = trl_is_ratio(b["old"], sampling, b["completion_mask"], mode, clip_max, clip_min)
    ours = importance_weights(b["old"], sampling, b["completion_mask"], mode, cap=clip_max, cap_min=clip_min)
    assert ours.shape == b["old"].shape
    assert _record("importance_weights", ours, theirs.expand_as(ours)) < 1e-12


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("num_generations", [1, 2, 4])
def test_advantages_match_trl(scale, num_generations):
    g = torch.Generator().manual_seed(num_generations)
    rewards = torch.rand(12, generator=g, dtype=DT)
    rewards[:num_generations] = 0.5  # one constant group
    theirs = trl_advantages(rewards, num_generations, scale)
    group = torch.arange(12) // num_generations
    ours = group_advantages(rewards, group, scale=scale)
    # TRL's nanstd computes Bessel's n/(n-1) in float32 (int/int division), so float64 agreement
    # is ~1e-8, not machine precision.
    assert _record(f"advantages[{scale}]", ours, theirs) < TOL
    # Groups need not be contiguous: a permutation of samples permutes the advantages.
    perm = torch.randperm(12, generator=g)
    assert torch.allclose(group_advantages(rewards[perm], group[perm], scale=scale), ours[perm], atol=1e-12)


def test_token_logprobs_match_trl_fused_head_on_a_real_model():
    """Our selective log-softmax over a real tiny LlamaForCausalLM agrees with TRL's fused LM head."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(DT)
    ids = torch.randint(0, 64, (3, 12))
    attn = torch.ones_like(ids)
    temperature = 0.7
    with torch.no_grad():
        ours = token_logprobs(model(input_ids=ids, attention_mask=attn).logits, ids, temperature)[:, -5:]
    add_fused_lm_head(model, temperature=temperature)
    labels = ids.clone()
    labels[:, :-5] = -100
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True).log_probs[:, -5:]
    assert _record("token_logprobs vs fused head", ours, theirs) < TOL
