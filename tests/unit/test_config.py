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
        ("world: {backend: sandbx}", ["world.backend", "'sandbox', 'diffusers' or 'stepwise'", "sandbx"]),
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


# ---------------------------------------------------------------- checked as a whole at load time (issue 9.9)


@pytest.mark.parametrize(
    "override,needles",
    [
        ("agents.action.temperature=9", ["agents.action.temperature", "less than or equal to 2"]),
        ("agents.action.max_tokens=2048", ["agents.action.max_tokens (2048)", "engines.policy.max_model_len (2048)"]),
        ("agents.critic.max_tokens=4096", ["agents.critic.max_tokens", "engines.judge.max_model_len"]),
        ("run.pipeline.wrld={workers: 1, queue: 1}", ["run.pipeline.wrld", "unknown field"]),
        ("run.pipeline.world.workrs=3", ["run.pipeline.world.workrs", "unknown field"]),
        ("resources.engines.polcy={num_cpus: 1}", ["resources.engines", "polcy", "policy"]),
        ("learner.backend=nccl", ["nccl", "use_gpu"]),
        ("learner.sync_method=nccl", ["learner.sync_method", "'object_store' or 'collective'"]),
    ],
)
def test_config_is_checked_as_a_whole_at_load_time(override, needles):
    with pytest.raises(ConfigError) as e:
        load_config("local-cpu", overrides=[override], environ={})
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_every_shipped_profile_loads_and_describes_every_field():
    from worldagent_ray.cli import config_rows

    for name in available_profiles():
        cfg = load_config(name, environ={})
        rows = config_rows(cfg)
        assert len(rows) > 100
        undocumented = [path for path, _, desc in rows if not desc]
        assert undocumented == [], f"{name}: fields without a description: {undocumented}"


# ---------------------------------------------------------------- every field is read somewhere (issue 8.3)


def _leaf_fields(model_cls, prefix=""):
    """``(dotted path, field name)`` of every leaf field of a config class tree."""
    import typing

    from pydantic import BaseModel

    out = []
    for name, info in model_cls.model_fields.items():
        ann = info.annotation
        inner = [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _leaf_fields(ann, f"{prefix}{name}.")
        elif inner:  # dict[str, Section] or Section | None
            out += _leaf_fields(inner[-1], f"{prefix}{name}.*.")
        else:
            out.append((f"{prefix}{name}", name))
    return out


def test_every_config_field_is_read_by_the_code():
    """A static check: each leaf field's name is read as an attribute (``.name``) or key
    (``["name"]``) somewhere in the package or the jobs, outside ``config/``. A field nobody reads
    is config that lies."""
    import re
    from pathlib import Path

    from worldagent_ray.config import Config

    root = Path(__file__).resolve().parents[2]
    sources = [p for p in [*(root / "worldagent_ray").rglob("*.py"), *(root / "jobs").glob("*.py")]
               if p.parent.name != "config"]
    text = "\n".join(p.read_text() for p in sources)
    unread = []
    for path, name in _leaf_fields(Config):
        if path == "profile":
            continue  # provenance, shown in summaries and the CLI
        if not re.search(rf"\.{name}\b|\[[\"']{name}[\"']\]|get\([\"']{name}[\"']", text):
            unread.append(path)
    assert unread == [], f"config fields read nowhere: {unread}"


def test_a_vlm_judge_engine_must_take_the_frames_plus_the_reference_image():
    base = ["agents.critic.scorers=[vlm_judge]", "agents.critic.num_frames=8"]
    with pytest.raises(ConfigError, match=r"engines.judge.limit_mm_per_prompt.image \(8\).*num_frames \(8\) \+ 1"):
        load_config("local-cpu", overrides=[*base, "engines.judge.limit_mm_per_prompt={image: 8}"], environ={})
    ok = load_config("local-cpu", overrides=[*base, "engines.judge.limit_mm_per_prompt={image: 8}",
                                             "world.reference_scene=false"], environ={})
    assert ok.agents.critic.num_frames == 8
    gpu = load_config("gpu-cluster", environ={})
    assert gpu.engines["judge"].limit_mm_per_prompt["image"] >= gpu.agents.critic.num_frames + 1
