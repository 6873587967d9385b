"""Environment defaults in one place, and what a job's workers receive (no secrets)."""

from __future__ import annotations

from worldagent_ray.config import load_config
from worldagent_ray.env import apply_env_defaults, needs_hub
from worldagent_ray.runtime.cluster import job_env


def test_offline_only_when_no_model_needs_the_hub():
    env: dict[str, str] = {}
    apply_env_defaults(cfg=load_config("local-cpu", environ={}), environ=env)
    assert env["HF_HUB_OFFLINE"] == "1" and env["RUST_LOG"] == "error"
    env = {}
    apply_env_defaults(cfg=load_config("gpu-cluster", environ={}), environ=env)
    assert "HF_HUB_OFFLINE" not in env and env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert needs_hub(["Qwen/Qwen2.5-VL-7B-Instruct"]) and not needs_hub(["smollm2-135m-instruct", "tiny-wan-t2v"])


def test_user_settings_are_never_changed():
    env = {"HF_HUB_OFFLINE": "0", "RUST_LOG": "debug"}
    applied = apply_env_defaults(offline=True, environ=env)
    assert env["HF_HUB_OFFLINE"] == "0" and env["RUST_LOG"] == "debug" and "HF_HUB_OFFLINE" not in applied


def test_secrets_are_never_forwarded_into_a_job():
    env = {"HF_TOKEN": "hf_secret", "HF_HUB_OFFLINE": "1", "HF_HOME": "/models", "VLLM_CPU_KVCACHE_SPACE": "1",
           "AWS_SECRET_ACCESS_KEY": "x", "AWS_ACCESS_KEY_ID": "y", "WANDB_API_KEY": "z", "VLLM_API_KEY": "k",
           "HUGGING_FACE_HUB_TOKEN": "t", "PATH": "/bin", "WORLDAGENT_CACHE": "/cache"}
    fwd = job_env(env)
    assert fwd == {"HF_HUB_OFFLINE": "1", "HF_HOME": "/models", "VLLM_CPU_KVCACHE_SPACE": "1",
                   "WORLDAGENT_CACHE": "/cache"}
