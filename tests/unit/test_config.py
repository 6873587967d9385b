"""Config: profiles load, overrides from CLI and environment, and bad YAML names the field."""

import pytest

from worldagent_ray.config import ConfigError, available_profiles, dump_config, load_config


def test_both_profiles_load():
    assert {"local-cpu", "gpu-cluster"} <= set(available_profiles())
    cpu = load_config("local-cpu", environ={})
    gpu = load_config("gpu-cluster", environ={})
    assert cpu.world.backend == "sandbox" and cpu.engines["policy"].model == "smollm2-135m-instruct"
    assert set(cpu.agents.critic.scorers) == {"verifiable", "text_judge"}
    assert gpu.world.backend == "diffusers" and "Wan2.2" in gpu.world.diffusers.model
    assert gpu.engines["policy"].model == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert gpu.agents.critic.scorers == ["vlm_judge"]
    assert gpu.resources.world.num_gpus == 1 and gpu.resources.world.autoscaling.max_replicas >= 2


def test_overrides_cli_beat_env_beat_file():
    env = {"WORLDAGENT__RUN__ITERATIONS": "7", "WORLDAGENT__AGENTS__ACTION__GROUP_SIZE": "3"}
    cfg = load_config("local-cpu", overrides=["run.iterations=9", "learner.enabled=true"], environ=env)
    assert cfg.run.iterations == 9  # CLI wins
    assert cfg.agents.action.group_size == 3  # env applied
    assert cfg.learner.enabled is True


def test_dump_round_trips(tmp_path):
    cfg = load_config("gpu-cluster", environ={})
    p = tmp_path / "snap.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p, environ={}) == cfg


@pytest.mark.parametrize(
    "yaml_text,needles",
    [
        ("world: {backend: sandbx}", ["world.backend", "'sandbox' or 'diffusers'", "sandbx"]),
        ("engines: {policy: {backend: tgi}}", ["engines.policy.backend", "'vllm'", "tgi"]),
        ("agents: {action: {group_size: 0}}", ["agents.action.group_size", "greater than or equal to 1"]),
        ("wrld: {}", ["wrld", "unknown field"]),
        ("agents: {critic: {reward_weights: {fun: 1}}}", ["reward_weights", "fun", "action_following"]),
        ("agents: {action: {engine: nope}}", ["agents.action.engine", "nope", "judge"]),
        ("world: {diffusers: {num_frames: 10}}", ["num_frames", "4k+1"]),
    ],
)
def test_bad_yaml_names_field_and_allowed_values(tmp_path, yaml_text, needles):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(p, environ={})
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    assert str(p) in str(e.value)


def test_unknown_profile_and_bad_override():
    with pytest.raises(ConfigError, match="available"):
        load_config("no-such-profile")
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config("local-cpu", overrides=["run.iterations"], environ={})
    with pytest.raises(ConfigError, match="run.iterations"):
        load_config("local-cpu", overrides=["run.iterations=-1"], environ={})


def test_a_vlm_judge_engine_must_take_the_frames_plus_the_reference_image():
    base = ["agents.critic.scorers=[vlm_judge]", "agents.critic.num_frames=8"]
    with pytest.raises(ConfigError, match=r"engines.judge.limit_mm_per_prompt.image \(8\).*num_frames \(8\) \+ 1"):
        load_config("local-cpu", overrides=[*base, "engines.judge.limit_mm_per_prompt={image: 8}"], environ={})
    ok = load_config("local-cpu", overrides=[*base, "engines.judge.limit_mm_per_prompt={image: 8}",
                                             "world.reference_scene=false"], environ={})
    assert ok.agents.critic.num_frames == 8
    gpu = load_config("gpu-cluster", environ={})
    assert gpu.engines["judge"].limit_mm_per_prompt["image"] >= gpu.agents.critic.num_frames + 1
