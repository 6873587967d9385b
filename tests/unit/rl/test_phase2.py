"""Phase 2 in one process: rounds draw only train tasks; the policy is saved as a loadable folder."""

from __future__ import annotations

import pytest
import torch

from worldagent_ray.config import ActionConfig, CriticConfig, LearnerConfig, SandboxConfig
from worldagent_ray.critic import Critic
from worldagent_ray.rl.learner import LearnerCore
from worldagent_ray.rl.phase2 import Phase2Trainer, save_policy_model
from worldagent_ray.world.sandbox import SandboxTaskGenerator, SandboxWorld

pytestmark = pytest.mark.timeout(300)


class _Recording(SandboxTaskGenerator):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.drawn = []

    def sample(self, *a, **kw):
        t = super().sample(*a, **kw)
        self.drawn.append(t)
        return t


def test_rounds_draw_train_tasks_only_and_bound_by_rounds(tiny_engine, tmp_path):
    world = SandboxWorld(SandboxConfig(image_size=32, frames_per_step=1, write_mp4=False, write_gif=False), critic_frames=1)
    gen = _Recording(0)
    tr = Phase2Trainer(None, tiny_engine, world, Critic(CriticConfig(scorers=["verifiable"]), None), gen,
                       ActionConfig(group_size=2, max_tokens=32), world.admissible_actions, learn=False,
                       engine_dtype=torch.float32, out_dir=str(tmp_path), say=lambda _: None)
    st = tr.run(max_rounds=3)
    assert st.rounds == 3 and st.samples == 6 and st.steps == 0 and len(gen.drawn) == 3
    assert all(t.split == "train" for t in gen.drawn)
    with pytest.raises(ValueError, match="minutes"):
        tr.run()


def test_save_policy_model_is_a_loadable_hf_folder(tiny_llama_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    core = LearnerCore(LearnerConfig(lora=True, lora_rank=4, lora_alpha=8), tiny_llama_path)
    with torch.no_grad():
        for n, p in core.module.named_parameters():
            if "lora_B" in n:
                p.add_(0.01)  # a non-trivial adapter, so that merging changes the weights
    out = save_policy_model(core, tiny_llama_path, str(tmp_path / "model"))
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        want = core.module(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert torch.allclose(want, got, atol=1e-4)
    assert AutoTokenizer.from_pretrained(out).chat_template  # the chat template travels with the model
