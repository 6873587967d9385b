"""The learned Critic stays frozen while the policy learns: policy weights published through the
weight publisher reach the policy engine (its weights_version grows) while the judge engine and
the reward-model deployment stay at weights_version 0 and keep their answers; the Critic
deployment scores with the served reward model throughout."""

from __future__ import annotations

import pytest
import ray
import torch

from worldagent_ray.config import load_config
from worldagent_ray.schemas import Plan, SamplingParams
from worldagent_ray.world.sandbox import SandboxWorld, build_task, reference_plan

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

NS = "test-critic-frozen"


def tiny_reward_model(folder) -> str:
    """A real sequence-classification model on tiny-random-llama's backbone (random head)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from worldagent_ray.models import resolve_model

    src = resolve_model("tiny-random-llama")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1)
    tok = AutoTokenizer.from_pretrained(src)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_judge_and_reward_model_stay_at_version_zero_while_policy_weights_are_published(tmp_path):
    from ray import serve

    from worldagent_ray.runtime.agent_deployments import critic_app
    from worldagent_ray.runtime.engine_deployment import engine_app, engine_app_name
    from worldagent_ray.runtime.reward_model_deployment import REWARD_MODEL_APP, reward_model_app
    from worldagent_ray.runtime.weight_publisher import create_publisher_actor

    rm_dir = tiny_reward_model(tmp_path / "rm")
    cfg = load_config("local-cpu", environ={}, overrides=[
        "engines.policy.model=tiny-random-llama", "engines.policy.backend=transformers",
        "engines.policy.dtype=float32", "engines.judge.model=tiny-random-llama", "engines.judge.backend=transformers",
        "engines.judge.dtype=float32", "agents.critic.scorers=[verifiable, text_judge, reward_model]",
        f"agents.critic.reward_model={rm_dir}", "agents.critic.max_tokens=16", "resources.critic.num_cpus=0",
        "run.stage_timeout_s=120"])
    ray.init(num_cpus=2, include_dashboard=False, namespace=NS, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")  # handles only: no port taken
        pub = create_publisher_actor("frozen-weights")
        policy = serve.run(engine_app(cfg, "policy", "frozen-weights", NS), name=engine_app_name("policy"),
                           route_prefix=None)
        judge = serve.run(engine_app(cfg, "judge"), name=engine_app_name("judge"), route_prefix=None)
        rm = serve.run(reward_model_app(cfg), name=REWARD_MODEL_APP, route_prefix=None)
        critic = serve.run(critic_app(cfg), name="critic", route_prefix=None)
        greedy = SamplingParams(temperature=0.0, max_tokens=6, seed=0, logprobs=False)
        judge_before = judge.generate.remote(["Judge: the stove is on."], greedy).result(timeout_s=120)[0][0].text
        world = SandboxWorld(cfg.world.sandbox.model_copy(update={"write_mp4": False, "write_gif": False}))
        task = build_task("turn_on_stove", {})
        plans = [reference_plan(task), Plan.from_actions(["open the fridge"])]
        items = list(zip([task] * 2, plans, world.render(task, plans, str(tmp_path / "frames"))))
        before = critic.score.remote(items).result(timeout_s=300)
        assert policy.info.remote().result(timeout_s=120)["weights_version"] == 0  # subscriber registered

        from worldagent_ray.models import resolve_model
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-random-llama"), dtype=torch.float32)
        for version in (1, 2):  # two learner steps' worth of published weights
            g = torch.Generator().manual_seed(version)
            state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()}
            ray.get(pub.publish.remote(version, [ray.put(state)]), timeout=60)
            acked = ray.get(pub.wait_synced.remote(version, 120.0), timeout=150)
            assert set(acked.values()) == {version}
            assert policy.info.remote().result(timeout_s=120)["weights_version"] == version
            assert judge.info.remote().result(timeout_s=120)["weights_version"] == 0
            assert rm.info.remote().result(timeout_s=120)["weights_version"] == 0
        judge_after = judge.generate.remote(["Judge: the stove is on."], greedy).result(timeout_s=120)[0][0].text
        after = critic.score.remote(items).result(timeout_s=300)
        assert judge_after == judge_before
        assert [v.reward for v in after] == [v.reward for v in before]  # the frozen critic judges the same
        assert all("reward_model" in v.scorer for v in after)
        assert ray.get(pub.status.remote(), timeout=60)["version"] == 2
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
