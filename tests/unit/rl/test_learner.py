"""The GRPO learner core: LearnerCore on tiny-random-llama (full and LoRA), weights into a real
TransformersEngine, exact resume, and a reward that rises on a toy task."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worldagent_ray.config import LearnerConfig
from worldagent_ray.models import resolve_model
from worldagent_ray.rl.learner import (
    LORA_SCALING_KEY,
    LearnerCore,
    collate_groups,
    lr_lambda,
)
from worldagent_ray.rl.batch import shard_rows
from worldagent_ray.rl.weight_sync import load_base_weights, merge_lora
from worldagent_ray.schemas import SamplingParams, ScoredGroup

from tests.factories import make_groups, running_engine

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_torch_thread")]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- core step


def test_step_updates_weights_and_bumps_version(tiny_llama_path):
    core = LearnerCore(LearnerConfig(lr=1e-3), tiny_llama_path)
    before = snapshot(core.module)
    groups = make_groups(0)
    m = core.step(groups)
    after = core.module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert core.policy_version == 1 and core.step_count == 1 and m["policy_version"] == 1.0
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.norm.weight" in changed
    rewards = [r for g in groups for r in g.rewards]
    assert m["reward_mean"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-6)
    assert m["num_sequences"] == len(rewards) and math.isfinite(m["loss"]) and m["grad_norm"] > 0
    # the engine's log-probs differ from the learner's, so IS weights are not all 1
    assert m["is_weight/min"] < m["is_weight/max"]
    core.step(make_groups(1))
    assert core.policy_version == 2


def test_lora_step_changes_only_adapters_and_exports_only_adapters(tiny_llama_path):
    cfg = LearnerConfig(lr=1e-2, lora=True, lora_rank=4, lora_alpha=8)
    core = LearnerCore(cfg, tiny_llama_path)
    before = snapshot(core.module)
    for s in range(2):  # lora_B starts at 0, so lora_A moves only from the second step on
        core.step(make_groups(s))
    after = core.module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed), sorted(changed)[:5]
    assert any(".lora_A." in k for k in changed) and any(".lora_B." in k for k in changed)
    exported = core.export_weights()
    assert float(exported.pop(LORA_SCALING_KEY)) == pytest.approx(8 / 4)
    assert exported and all(".lora_A." in k or ".lora_B." in k for k in exported)
    targets = {k.split(".")[-3] for k in exported}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj"}
    base_numel = sum(v.numel() for k, v in after.items() if "lora_" not in k)
    assert sum(v.numel() for v in exported.values()) < base_numel / 10


def test_lora_merge_matches_peft_merge(tiny_llama_path):
    core = LearnerCore(LearnerConfig(lr=1e-2, lora=True, lora_rank=4, lora_alpha=16), tiny_llama_path)
    for s in range(2):
        core.step(make_groups(s))
    merged = merge_lora(load_base_weights(tiny_llama_path), core.export_weights())
    reference = {k: v for k, v in core.module.merge_and_unload().state_dict().items()}
    assert set(reference) - set(merged) <= {"lm_head.weight"}  # tied to the embeddings
    for k, v in merged.items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=1e-6, msg=k)


def test_kl_to_frozen_reference(tiny_llama_path):
    core = LearnerCore(LearnerConfig(lr=1e-2, beta=0.1), tiny_llama_path)
    m0 = core.step(make_groups(0))
    m1 = core.step(make_groups(0))
    assert m0["kl"] == pytest.approx(0.0, abs=1e-7)  # policy == reference before the first update
    assert m1["kl"] > 1e-6
    ref_before = core.ref_module.state_dict()["model.norm.weight"]
    assert torch.equal(ref_before, torch.ones_like(ref_before))  # reference stayed frozen


# --------------------------------------------------------------------------- into the engine


@pytest.fixture(scope="module")
def engine():
    with running_engine(model="tiny-random-llama", backend="transformers", dtype="float32") as eng:
        yield eng


def _greedy(engine, prompt: str = "Plan: pick up the cup") -> tuple[list[int], int]:
    [[c]] = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, seed=0))
    return c.token_ids, c.weights_version


def test_engine_generates_with_new_full_weights(tiny_llama_path, engine):
    core = LearnerCore(LearnerConfig(lr=3e-2), tiny_llama_path)
    before, v0 = _greedy(engine)
    # reward the greedy continuation's tokens negatively: the argmax must move
    [[c]] = engine.generate(["Plan: pick up the cup"], SamplingParams(temperature=1.0, max_tokens=8, n=1, seed=1))
    for _ in range(3):
        groups = [
            ScoredGroup(
                group_id="g", task_id="t", policy_version=v0, prompt_token_ids=c.prompt_token_ids,
                completion_token_ids=[before, c.token_ids], rollout_logprobs=[[-10.0] * len(before), c.logprobs],
                rewards=[0.0, 1.0], episode_ids=["a", "b"],
            )
        ]
        core.step(groups)
    version = v0 + core.policy_version
    assert engine.load_weights(core.export_weights(), version) == version
    after, v1 = _greedy(engine)
    assert engine.weights_version == version and v1 == version
    assert after != before
    # the engine now holds exactly the learner's weights: its log-probs of a fresh sample are
    # the learner's, so the IS weights of the next step are 1
    [[s]] = engine.generate(["Plan: pick up the cup"], SamplingParams(temperature=1.0, max_tokens=6, n=1, seed=2))
    [[s2]] = engine.generate(["Plan: pick up the cup"], SamplingParams(temperature=1.0, max_tokens=6, n=1, seed=3))
    m = core.step(
        [ScoredGroup(group_id="h", task_id="t", policy_version=version, prompt_token_ids=s.prompt_token_ids,
                     completion_token_ids=[s.token_ids, s2.token_ids], rollout_logprobs=[s.logprobs, s2.logprobs],
                     rewards=[0.0, 1.0], episode_ids=["c", "d"])]
    )
    assert m["is_weight/min"] == pytest.approx(1.0, abs=1e-3) and m["is_weight/max"] == pytest.approx(1.0, abs=1e-3)


def test_engine_generates_with_merged_lora_weights(tiny_llama_path, engine):
    core = LearnerCore(LearnerConfig(lr=5e-2, lora=True, lora_rank=8, lora_alpha=16), tiny_llama_path)
    for s in range(3):
        core.step(make_groups(s))
    before, v0 = _greedy(engine, "Say hello")
    payload = core.export_weights()
    version = v0 + 1
    engine.load_weights(merge_lora(load_base_weights(tiny_llama_path), payload), version)
    after, v1 = _greedy(engine, "Say hello")
    assert v1 == version == engine.weights_version
    assert after != before


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_is_exact_at_core_level(tiny_llama_path, tmp_path, lora):
    cfg = LearnerConfig(lr=1e-2, lr_schedule="cosine", lr_warmup_steps=1, max_steps=5, weight_decay=0.01,
                        lora=lora, lora_rank=4, lora_alpha=8)
    N, k = 4, 2
    data = [make_groups(100 + s) for s in range(N)]
    cont = LearnerCore(cfg, tiny_llama_path)
    cont_metrics = [cont.step(g) for g in data]

    first = LearnerCore(cfg, tiny_llama_path)
    for g in data[:k]:
        first.step(g)
    first.save_checkpoint(tmp_path / "ckpt", extra={"consumed": ["a", "b"]})
    random.random(), torch.rand(3)  # disturb the RNGs: the checkpoint must restore them
    resumed = LearnerCore(cfg, tiny_llama_path)
    extra = resumed.load_checkpoint(tmp_path / "ckpt")
    assert extra == {"consumed": ["a", "b"]}
    assert (resumed.step_count, resumed.policy_version) == (k, k)
    res_metrics = [resumed.step(g) for g in data[k:]]

    assert abs(res_metrics[-1]["loss"] - cont_metrics[-1]["loss"]) <= 1e-6
    assert res_metrics[-1]["lr"] == pytest.approx(cont_metrics[-1]["lr"], rel=1e-12)
    for (name, a), b in zip(cont.trainable_state_dict().items(), resumed.trainable_state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert resumed.policy_version == cont.policy_version == N


def test_checkpoint_refuses_a_lora_mismatch(tiny_llama_path, tmp_path):
    core = LearnerCore(LearnerConfig(lr=1e-3), tiny_llama_path)
    core.save_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="lora"):
        LearnerCore(LearnerConfig(lr=1e-3, lora=True), tiny_llama_path).load_checkpoint(tmp_path)


def test_checkpoint_has_no_pickled_objects(tiny_llama_path, tmp_path):
    core = LearnerCore(LearnerConfig(lr=1e-3, lora=True), tiny_llama_path)
    core.step(make_groups(0))
    core.save_checkpoint(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "learner_state.json", "trainer_state.pt"]
    state = torch.load(tmp_path / "trainer_state.pt", weights_only=True)  # would raise on arbitrary objects
    assert set(state) == {"optimizer", "scheduler", "rng"}


# --------------------------------------------------------------------------- inputs


def test_collate_layout_left_pads_prompts_and_right_pads_completions():
    g = ScoredGroup(group_id="g", task_id="t", policy_version=1, prompt_token_ids=[[5, 6, 7], [8]],
                    completion_token_ids=[[1, 2], [3, 4, 9]], rollout_logprobs=[[-1.0, -2.0], [-3.0, -4.0, -5.0]],
                    rewards=[0.0, 1.0], episode_ids=["a", "b"])
    b = collate_groups([g], policy_version=3, pad_token_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert b.position_ids[1].tolist()[2:] == [0, 1, 2, 3]
    assert b.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert b.rollout_logps.tolist() == [[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0]]
    assert b.staleness == [2]


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(rewards=[1.0]), "1 rewards for 2 completions"),
        (dict(completion_token_ids=[[1], []]), "completion 1 is empty"),
        (dict(rollout_logprobs=[[-1.0, -1.0], [-1.0]]), "completion 0 has 1 tokens but 2 rollout logprobs"),
        (dict(prompt_token_ids=[]), "empty prompt_token_ids"),
    ],
)
def test_collate_names_the_bad_group(bad, match):
    fields = dict(group_id="bad-group", policy_version=0, prompt_token_ids=[1, 2], completion_token_ids=[[1], [2]],
                  rollout_logprobs=[[-1.0], [-1.0]], rewards=[0.0, 1.0])
    fields.update(bad)
    with pytest.raises(ValueError, match="bad-group") as e:
        collate_groups([SimpleNamespace(**fields)], 0)
    assert match in str(e.value)
    with pytest.raises(ValueError, match="at least one"):
        collate_groups([], 0)


def test_lr_schedules():
    kw = dict(warmup_steps=2, total_steps=10)
    assert [lr_lambda(s, schedule="constant", **kw) for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1, 1])
    assert lr_lambda(2, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_lambda(6, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_lambda(10, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_lambda(6, schedule="linear", **kw) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_lambda(5, schedule="step", **kw)


# --------------------------------------------------------------------------- learning


def test_reward_rises_on_even_token_task(tiny_llama_path, engine):
    """Closed loop on CPU: the engine samples groups, a synthetic reward (the fraction of
    even token ids in the completion) scores them, LearnerCore steps, the engine loads the new
    weights. Sampling at temperature 0.3 makes the toy policy learnable in a few steps."""
    temperature, steps = 0.3, 16
    core = LearnerCore(LearnerConfig(lr=1e-2, loss_type="dapo"), tiny_llama_path, temperature=temperature)
    engine.load_weights(core.export_weights(), engine.weights_version + 1)  # start from the base
    base_version = engine.weights_version
    history = []
    for step in range(steps):
        [comps] = engine.generate(["Count: one two"], SamplingParams(temperature=temperature, max_tokens=6, n=8, seed=step))
        assert all(c.weights_version == base_version + core.policy_version for c in comps)
        rewards = [sum(t % 2 == 0 for t in c.token_ids) / len(c.token_ids) for c in comps]
        group = ScoredGroup(
            group_id=f"even-{step}", task_id="even", policy_version=core.policy_version,
            prompt_token_ids=comps[0].prompt_token_ids, completion_token_ids=[c.token_ids for c in comps],
            rollout_logprobs=[c.logprobs for c in comps], rewards=rewards,
            episode_ids=[f"even-{step}-{i}" for i in range(len(comps))],
        )
        history.append(core.step([group])["reward_mean"])
        engine.load_weights(core.export_weights(), base_version + core.policy_version)
    first, last = sum(history[:4]) / 4, sum(history[-4:]) / 4
    assert first < 0.7 and last > first + 0.25, history


# --------------------------------------------------------------------------- data parallel


@settings(derandomize=True, max_examples=200, deadline=None)
@given(st.integers(0, 50), st.integers(1, 9))
def test_shard_rows_partition_every_row_once_in_near_equal_chunks(rows, world):
    shards = [shard_rows(rows, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(rows))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_rank_shards_average_to_the_single_process_gradient(tiny_llama_path, monkeypatch, loss_type):
    """What DDP/FSDP do with the ranks' gradients (average them) gives exactly the gradient of
    one process on the whole batch, for every loss type, also with more ranks than rows
    (those ranks run a weight-0 row)."""
    import worldagent_ray.rl.learner as learner_mod
    from worldagent_ray.rl.batch import collate_groups as collate
    from worldagent_ray.rl.grpo import group_advantages

    core = LearnerCore(LearnerConfig(lr=1e-3, loss_type=loss_type, gradient_checkpointing=False), tiny_llama_path)
    groups = make_groups(7, n_groups=2, group_size=3)  # 6 rows of uneven lengths
    batch = collate(groups, 0, core.pad_token_id)
    adv = group_advantages(batch.rewards, batch.group_index, core.cfg.scale_rewards)
    params = core.trainable

    def grads(rank, world):
        monkeypatch.setattr(learner_mod, "_rank_world", lambda: (rank, world))
        loss, _, _ = core._grpo_loss(batch, adv)
        return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)

    single_loss, single = grads(0, 1)
    for world in (4, 8):
        per_rank = [grads(r, world) for r in range(world)]
        assert sum(l for l, _ in per_rank) / world == pytest.approx(float(single_loss), rel=1e-5, abs=1e-7)
        for i, g1 in enumerate(single):
            avg = sum(g[i] for _, g in per_rank) / world
            torch.testing.assert_close(avg, g1, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- cluster models


def test_unknown_hub_id_offline_names_the_model_and_the_builtins():
    from worldagent_ray.engines.base import UnknownModelError

    with pytest.raises(UnknownModelError, match="no-such-org/no-such-model") as e:
        LearnerCore(LearnerConfig(), "no-such-org/no-such-model")
    assert "tiny-random-llama" in str(e.value)


_HUB_CHILD = r"""
import sys
from worldagent_ray.config import LearnerConfig
from worldagent_ray.rl.learner import LearnerCore
from tests.factories import make_groups
core = LearnerCore(LearnerConfig(lr=1e-3, lora=True, lora_rank=2, lora_alpha=4), "test-org/tiny-policy")
m = core.step(make_groups(0))
print("PATH", core.model_path, "VERSION", core.policy_version, "LOSS", m["loss"])
"""


def test_hub_id_loads_from_the_hub_cache_offline(tiny_llama_path, tmp_path):
    """A hub id (not a builtin, not a folder) is passed through to from_pretrained, which finds it
    in the hub cache with HF_HUB_OFFLINE=1 (the cluster path, minus the download)."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = tmp_path / "hub" / "models--test-org--tiny-policy"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    shutil.copytree(tiny_llama_path, snap, ignore=shutil.ignore_patterns(".worldagent-complete"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _HUB_CHILD], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = out.stdout.strip().splitlines()[-1].split()
    assert line[1] == "test-org/tiny-policy" and line[3] == "1" and math.isfinite(float(line[5]))


@pytest.fixture(scope="module")
def vl_path() -> str:
    return resolve_model("tiny-random-qwen2.5-vl")


def _image(tmp_path, name: str, seed: int, size=(96, 80)) -> str:
    import numpy as np
    from PIL import Image

    path = tmp_path / f"{name}.png"
    Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8")).save(path)
    return str(path)


def _vl_group(vl_path: str, image: str | None, gid: str = "vl-g", prompt_image: str | None = None) -> ScoredGroup:
    """A group whose prompt is what the engine writes for an image prompt: the Qwen-VL chat
    template with the image placeholder expanded to one token per merged patch."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
    from PIL import Image

    tok = AutoTokenizer.from_pretrained(vl_path)
    cfg = AutoConfig.from_pretrained(vl_path)
    proc = AutoImageProcessor.from_pretrained(vl_path)
    with Image.open(prompt_image or image) as im:
        grid = proc(images=[im.convert("RGB")], return_tensors="pt")["image_grid_thw"]
    n = int(grid.prod()) // 4
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "cook"}]}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False).input_ids
    at = ids.index(cfg.image_token_id)
    prompt = ids[:at] + [cfg.image_token_id] * n + ids[at + 1 :]
    comps = [[300 + i, 400 + i, 500 + i] for i in range(3)]
    return ScoredGroup(group_id=gid, task_id="t", policy_version=0, prompt_token_ids=prompt, completion_token_ids=comps,
                       rollout_logprobs=[[-10.8] * 3 for _ in comps], rewards=[0.0, 0.5, 1.0],
                       episode_ids=[f"{gid}-{i}" for i in range(3)], reference_image=image)


def test_vlm_logprobs_use_the_reference_image(vl_path, tmp_path):
    from worldagent_ray.rl.batch import collate_groups as collate

    core = LearnerCore(LearnerConfig(lr=1e-3, lora=True, lora_rank=4, lora_alpha=8), "tiny-random-qwen2.5-vl")
    assert core.vision and type(core.module.get_base_model()).__name__ == "Qwen2_5_VLForConditionalGeneration"
    a, b = _image(tmp_path, "a", 0), _image(tmp_path, "b", 1)

    def logps(group):
        with torch.no_grad():
            return core._completion_logps(core.model, collate([group], 0, core.pad_token_id))

    la, lb = logps(_vl_group(vl_path, a)), logps(_vl_group(vl_path, b))
    assert torch.isfinite(la).all() and not torch.allclose(la, lb)
    torch.testing.assert_close(logps(_vl_group(vl_path, a)), la)  # deterministic: the image is what differs
    with pytest.raises(ValueError, match="group 'no-image'.*no reference_image"):
        logps(_vl_group(vl_path, None, "no-image", prompt_image=a))
    small = _image(tmp_path, "small", 2, size=(28, 28))
    with pytest.raises(ValueError, match="group 'mismatch'.*image tokens"):
        logps(_vl_group(vl_path, small, "mismatch", prompt_image=a))
    m = core.step([_vl_group(vl_path, a), _vl_group(vl_path, b, "vl-h")])
    assert core.policy_version == 1 and math.isfinite(m["loss"]) and m["grad_norm"] > 0


def test_vlm_lora_targets_the_language_model_only_and_merges(vl_path, tmp_path):
    from transformers import AutoModelForImageTextToText

    core = LearnerCore(LearnerConfig(lr=5e-2, lora=True, lora_rank=4, lora_alpha=8), vl_path)
    lora_modules = {n for n, _ in core.module.named_modules() if n.endswith((".lora_A", ".lora_B"))}
    assert lora_modules and all(".language_model." in n for n in lora_modules)
    a = _image(tmp_path, "a", 0)
    for s in range(2):
        core.step([_vl_group(vl_path, a, f"g{s}")])
    payload = core.export_weights()
    assert {k.split(".")[-3] for k in payload if k != LORA_SCALING_KEY} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    base = AutoModelForImageTextToText.from_pretrained(vl_path, dtype=torch.float32).state_dict()
    merged = merge_lora(base, payload)  # the transformers class's names, as TransformersEngine.load_weights takes
    reference = core.module.merge_and_unload().state_dict()
    changed = [k for k in merged if not torch.equal(merged[k], base[k])]
    assert changed and all(".language_model." in k for k in changed)
    for k in changed:
        torch.testing.assert_close(merged[k], reference[k], rtol=0, atol=1e-6, msg=k)
    # the checkpoint's names (what vLLM loads; transformers 5 renames model.layers.* on load)
    from worldagent_ray.rl.weight_sync import load_base_weights

    disk = load_base_weights(vl_path)
    on_disk = merge_lora(disk, payload)
    assert set(on_disk) == set(disk)
    for k in changed:
        d = k.replace("model.language_model.", "model.", 1)
        torch.testing.assert_close(on_disk[d], reference[k], rtol=0, atol=1e-6, msg=d)


def test_vlm_full_fine_tuning_keeps_the_vision_tower_frozen(vl_path, tmp_path):
    core = LearnerCore(LearnerConfig(lr=1e-2), vl_path)
    before = snapshot(core.module)
    core.step([_vl_group(vl_path, _image(tmp_path, "a", 0))])
    after = core.module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".language_model." in k for k in changed)
    assert not any(".visual." in k for k in changed)
    assert set(core.export_weights()) == set(before)  # the full state dict goes to the engines


# --------------------------------------------------------------------------- FSDP


def _fsdp_rank(rank: int, world: int, port: int, model_path: str, lora: bool, out_dir: str) -> None:
    """One FSDP rank: 2 steps, a checkpoint (every rank gathers, rank 0 writes), the export."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        from worldagent_ray.rl.policy import fully_shard_policy

        cfg = LearnerConfig(lr=1e-2, lora=lora, lora_rank=4, lora_alpha=8, gradient_checkpointing=False)
        core = LearnerCore(cfg, model_path, wrap_model=fully_shard_policy)
        assert core.sharded
        for s in range(2):
            core.step(make_groups(300 + s, n_groups=2, group_size=3))
        core.save_checkpoint(f"{out_dir}/ckpt", extra={"trained_ids": ["x"]})
        payload = core.export_weights()
        if rank == 0:
            torch.save(payload, f"{out_dir}/export.pt")
        else:
            assert payload == {}
        dist.barrier()
        again = LearnerCore(cfg, model_path, wrap_model=fully_shard_policy)  # every rank restores its shards
        again.load_checkpoint(f"{out_dir}/ckpt")
        m = again.step(make_groups(302, n_groups=2, group_size=3))
        if rank == 0:
            torch.save({"loss": m["loss"], "export": again.export_weights()}, f"{out_dir}/resumed.pt")
        else:
            again.export_weights()
    finally:
        dist.destroy_process_group()


def test_fsdp_with_lora_is_refused_naming_the_alternative():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="parallel_strategy='ddp' with LoRA"):
        LearnerConfig(parallel_strategy="fsdp", lora=True)


@pytest.mark.slow
def test_fsdp_two_ranks_gather_the_full_state_on_rank_zero_and_resume(tiny_llama_path, tmp_path):
    """2 gloo ranks under FSDP2 train like one process; the export gathers the full state dict
    on rank 0 only; a checkpoint restores every rank's shards and training continues as the
    single process does."""
    lora = False
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_fsdp_rank, args=(2, port, tiny_llama_path, lora, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    cfg = LearnerConfig(lr=1e-2, lora=lora, lora_rank=4, lora_alpha=8, gradient_checkpointing=False)
    ref = LearnerCore(cfg, tiny_llama_path)
    for s in range(2):
        ref.step(make_groups(300 + s, n_groups=2, group_size=3))
    exported = torch.load(tmp_path / "export.pt", weights_only=True)
    expected = ref.export_weights()
    assert set(exported) == set(expected)
    # Sharded gradients are summed in another order; Adam turns that rounding noise into updates
    # of up to ~lr on coordinates whose gradient is ~0 (<= 1e-4 here; a missing or repeated step
    # moves weights by ~4e-2, see tests/ray/test_learner_trainer.py).
    for k, v in expected.items():
        torch.testing.assert_close(exported[k], v, rtol=0, atol=1e-3, msg=k)
    m = ref.step(make_groups(302, n_groups=2, group_size=3))
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert resumed["loss"] == pytest.approx(m["loss"], abs=1e-4)
    for k, v in ref.export_weights().items():
        torch.testing.assert_close(resumed["export"][k], v, rtol=0, atol=1e-3, msg=k)


def test_reference_images_open_from_paths_and_uris(tmp_path):
    import fsspec
    from PIL import Image

    from worldagent_ray.rl.policy import open_image

    path = _image(tmp_path, "ref", 3, size=(30, 20))
    with open(path, "rb") as f:
        data = f.read()
    with fsspec.open("memory://refs/ref.png", "wb") as f:  # any fsspec URI, e.g. s3:// with s3fs
        f.write(data)
    for where in (path, f"file://{path}", "memory://refs/ref.png"):
        im = open_image(where)
        assert isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (30, 20)
    with pytest.raises(FileNotFoundError):
        open_image(str(tmp_path / "missing.png"))
