"""Phase 1 on Ray: TRL's SFTTrainer (and DPOTrainer) inside a Ray Train TorchTrainer, data through
Ray Data from the task generator and a real LanceDB memory; the output folder is a policy model
that the transformers engine loads and runs; a second run on the same folder resumes."""

from __future__ import annotations

import json
import os

import pytest

from worldagent_ray.config import load_config
from worldagent_ray.world.sandbox import SandboxTaskGenerator, reference_plan

from tests.factories import sandbox_episode

pytestmark = [pytest.mark.timeout(600), pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def memory_uri(tmp_path_factory):
    from worldagent_ray.memory import Embedder, EpisodeMemory

    uri = str(tmp_path_factory.mktemp("mem") / "memory")
    g = SandboxTaskGenerator(0)
    a, b = g.split_tasks(1, "train")[4:6]
    held = g.heldout_tasks(1, 1)[0]
    eps = [
        sandbox_episode(a, 0, reference_plan(a).actions, success=True, reward=1.0),
        sandbox_episode(a, 1, ["turn on the stove"], success=False, reward=0.1),
        sandbox_episode(b, 0, ["open the fridge"], success=False, reward=0.0),
        sandbox_episode(held, 0, reference_plan(held).actions, success=True, reward=1.0),
    ]
    mem = EpisodeMemory(uri, embedder=Embedder("minilm"))
    assert mem.upsert(eps) == 4
    mem.close()
    return uri


def _cfg():
    cfg = load_config("local-cpu", overrides=["engines.policy.model=tiny-random-llama"], environ={})
    s = cfg.training.sft
    s.phases, s.max_steps, s.batch_size, s.max_length, s.save_steps = [1], 2, 2, 512, 1
    cfg.training.dpo.max_steps, cfg.training.dpo.batch_size = 1, 1
    return cfg


def test_sft_in_ray_train_writes_a_loadable_policy_and_resumes(ray_local, memory_uri, tmp_path):
    from worldagent_ray.config import EngineConfig
    from worldagent_ray.engines.hf import TransformersEngine
    from worldagent_ray.runtime.sft_trainer import run_sft, sft_dataset
    from worldagent_ray.schemas import SamplingParams

    cfg = _cfg()
    n_gen = len(SandboxTaskGenerator(0).split_tasks(1, "train"))
    rows = [json.loads(r["json"]) for r in sft_dataset(cfg, memory_uri).take_all()]
    assert len(rows) == n_gen + 1  # + the one successful train episode; the held-out success is left out
    assert {r["source"] for r in rows} == {"generator", "memory"} and {r["split"] for r in rows} == {"train"}

    out = str(tmp_path / "sft" / "model")
    info = run_sft(cfg, out, memory_uri=memory_uri)
    assert info["examples"] == n_gen + 1 and info["metrics"]["steps"] == 2.0
    for f in ("config.json", "model.safetensors", "tokenizer.json", "train_info.json"):
        assert os.path.exists(os.path.join(out, f)), f
    assert os.path.isdir(out + ".work/trainer/checkpoint-2")

    engine = TransformersEngine(EngineConfig(backend="transformers", model=out, dtype="float32"))
    try:
        res = engine.generate([[{"role": "user", "content": "Goal: Turn on the stove"}]],
                              SamplingParams(max_tokens=8, temperature=0.0, n=1))
        assert len(res[0][0].token_ids) > 0
    finally:
        engine.shutdown()

    # Same folder again with one more step: TRL resumes from checkpoint-2, so the log history
    # it saved there (marked here) is carried into checkpoint-3; a fresh start would lose it.
    state_file = out + ".work/trainer/checkpoint-2/trainer_state.json"
    state = json.loads(open(state_file).read())
    state["log_history"].append({"resume_marker": 1.0, "step": 2})
    open(state_file, "w").write(json.dumps(state))
    cfg.training.sft.max_steps = 3
    again = run_sft(cfg, out, memory_uri=memory_uri)
    assert again["metrics"]["steps"] >= 3.0
    newest = json.loads(open(out + ".work/trainer/checkpoint-3/trainer_state.json").read())
    assert any(e.get("resume_marker") == 1.0 for e in newest["log_history"])


def test_offline_dpo_in_ray_train_from_memory_pairs(ray_local, memory_uri, tmp_path):
    from worldagent_ray.runtime.sft_trainer import dpo_dataset, run_dpo

    cfg = _cfg()
    pairs = dpo_dataset(cfg, memory_uri)
    assert len(pairs) == 1  # only the train group with a reward gap; the held-out group is never used
    info = run_dpo(cfg, str(tmp_path / "dpo"), memory_uri=memory_uri, model="tiny-random-llama")
    assert info["pairs"] == 1 and info["metrics"]["steps"] == 1.0
    assert os.path.exists(tmp_path / "dpo" / "model.safetensors")
