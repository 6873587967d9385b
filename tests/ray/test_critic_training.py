"""Critic training on a local Ray: the ground-truth export (Ray Data) and both TRL stages
(SFTTrainer, RewardTrainer) in Ray Train on tiny-random-llama for a couple of steps; the
trained reward model then scores inside the Critic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from worldagent_ray.config import load_config
from worldagent_ray.world.sandbox import build_task, reference_plan

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, namespace="test-critic-training", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("critic-run")
    return load_config("local-cpu", environ={}, overrides=[
        f"run.root={root}", "critic_training.base_model=tiny-random-llama", "critic_training.tasks_per_phase=4",
        "critic_training.heldout_tasks_per_phase=4", "critic_training.max_steps=2", "critic_training.batch_size=2",
        "critic_training.max_length=512", "critic_training.max_pairs_per_task=2", "critic_training.anchor_pairs_per_task=1",
        "world.sandbox.image_size=32",
        "world.sandbox.frames_per_step=1"])


@pytest.fixture(scope="module")
def exported(ray_local, cfg, tmp_path_factory):
    from worldagent_ray.runtime.critic_trainer import export_critic_data

    out = tmp_path_factory.mktemp("critic-data")
    return str(out), export_critic_data(cfg, str(out))


def test_export_shapes_and_split(exported, cfg):
    out, data = exported
    recs = data["records"].take_all()
    tasks = {r["task_id"]: r["split"] for r in recs}
    # 4 train then 4 held-out tasks per phase, rendered 4 per batch: blocks of one split only, which
    # each split's filter empties (the task_id shuffle of the pairs once failed on such blocks)
    assert sum(s == "train" for s in tasks.values()) == 12 and sum(s == "heldout" for s in tasks.values()) == 12
    assert {r["kind"] for r in recs} >= {"reference", "shuffled", "corrupted", "random"}
    assert any(r["success"] for r in recs) and not all(r["success"] for r in recs)
    for r in recs:  # the label is the verifiable ground truth of the rendered episode
        assert (r["reward"] > 0.5) or not r["success"]
        assert "Goal conditions met" not in r["observation"] and r["frame_uris"]
    for split in ("train", "heldout"):
        sft = data[f"sft_{split}"].take_all()
        pairs = data[f"pairs_{split}"].take_all()
        assert sft and pairs and all(x["split"] == split for x in sft + pairs)
        assert {x["task_id"] for x in sft + pairs} <= {t for t, s in tasks.items() if s == split}
        ex = sft[0]
        prompt, completion = json.loads(ex["prompt_json"]), json.loads(ex["completion_json"])
        assert [m["role"] for m in prompt] == ["system", "user"] and completion[0]["role"] == "assistant"
        assert set(json.loads(completion[0]["content"])) == {"state_caption", "success", "scores"}
        assert all(p["reward_gap"] >= cfg.critic_training.pair_margin for p in pairs)
        task_pairs = [p for p in pairs if p["kind"] == "task"]
        anchors = [p for p in pairs if p["kind"] == "anchor"]
        assert len(task_pairs) + len(anchors) == len(pairs) and task_pairs and anchors
        assert len(task_pairs) <= 2 * len({p["task_id"] for p in task_pairs})  # max_pairs_per_task=2
        assert len(anchors) == len({p["task_id"] for p in anchors})  # anchor_pairs_per_task=1
    written = ray.data.read_parquet(f"{out}/pairs_train").count()
    assert written == data["pairs_train"].count()


@pytest.mark.slow
def test_sft_and_rm_stages_train_and_the_rm_scores_in_the_critic(exported, cfg, tmp_path):
    from worldagent_ray.config import CriticConfig
    from worldagent_ray.critic import Critic, HFRewardModel
    from worldagent_ray.runtime.critic_trainer import launch_critic_trainer
    from worldagent_ray.runtime.train_progress import fit_with_progress, progress_queue
    from worldagent_ray.world.sandbox import SandboxWorld
    from worldagent_ray.schemas import Plan

    _, data = exported
    sft = launch_critic_trainer(cfg, "sft", data["sft_train"], str(tmp_path / "sft")).fit()
    assert sft.error is None and sft.metrics["steps"] == 2 and sft.metrics["last_loss"] == sft.metrics["last_loss"]
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(sft.checkpoint.path)  # a loadable judge model

    # the reward model trains under bf16 autocast (the benchmark's default on a CPU with AMX), the
    # judge above in float32: both precisions run here
    cfg_bf16 = cfg.model_copy(deep=True)
    cfg_bf16.critic_training.precision = "bf16"
    queue, lines = progress_queue(), []
    rm = fit_with_progress(launch_critic_trainer(cfg_bf16, "rm", data["pairs_train"], str(tmp_path / "rm"),
                                                 progress=queue), queue, "critic rm", printer=lines.append)
    assert rm.error is None and rm.metrics["steps"] == 2
    assert lines and lines[-1].startswith("critic rm: step 2/2 (100%)"), lines  # the worker's steps reached us
    assert rm.metrics["last_loss"] == rm.metrics["last_loss"]  # finite, not NaN
    saved = json.loads((Path(rm.checkpoint.path) / "config.json").read_text())
    assert saved.get("dtype", saved.get("torch_dtype")) == "float32"  # master weights stay float32
    model = HFRewardModel(rm.checkpoint.path, max_length=512)
    assert model.weights_version == 0 and not any(p.requires_grad for p in model.model.parameters())
    world = SandboxWorld(cfg.world.sandbox)
    task = build_task("turn_on_stove", {})
    plans = [reference_plan(task), Plan.from_actions(["open the fridge"])]
    rollouts = world.render(task, plans, str(tmp_path / "frames"))
    critic = Critic(CriticConfig(scorers=["reward_model"], reward_model=rm.checkpoint.path), reward_model=model)
    vs = critic.score_batch([(task, p, r) for p, r in zip(plans, rollouts)])
    assert [v.scorer for v in vs] == ["reward_model", "reward_model"]
    assert all(0.0 <= v.reward <= 1.0 for v in vs) and vs[0].reward != vs[1].reward


@pytest.mark.parametrize("precision,use_gpu,plan", [
    ("auto", False, ("float32", False)), ("auto", True, ("bfloat16", True)),
    ("bf16", False, ("float32", True)), ("bf16", True, ("float32", True)),
    ("fp32", False, ("float32", False)), ("fp32", True, ("float32", False)),
])
def test_precision_plan(precision, use_gpu, plan):
    from worldagent_ray.runtime.critic_trainer import precision_plan

    assert precision_plan(precision, use_gpu) == plan


def test_a_bad_precision_is_refused_naming_the_field():
    from worldagent_ray.runtime.critic_trainer import precision_plan

    with pytest.raises(ValueError, match="critic_training.precision"):
        precision_plan("fp16", False)
    with pytest.raises(Exception, match="precision"):
        load_config("local-cpu", environ={}, overrides=["critic_training.precision=fp16"])
