"""Shared pytest fixtures. Keep this small; component fixtures live in their test files.
Shared plain helpers (test data factories) live in ``tests/factories.py``."""

from __future__ import annotations

import pytest

from worldagent_ray.env import apply_env_defaults

apply_env_defaults(offline=True)  # tests never reach a model hub


@pytest.fixture(scope="session")
def tiny_llama_path() -> str:
    """Local folder of the builtin ``tiny-random-llama`` (built once into the cache)."""
    from worldagent_ray.models import resolve_model

    return resolve_model("tiny-random-llama")


@pytest.fixture(scope="session")
def tiny_engine(tiny_llama_path):
    """A session-wide transformers engine on ``tiny-random-llama`` (loads in about 1 s).

    Do not load weights into it; build your own engine for that.
    """
    from worldagent_ray.config import EngineConfig
    from worldagent_ray.engines.hf import TransformersEngine

    engine = TransformersEngine(
        EngineConfig(backend="transformers", model="tiny-random-llama", dtype="float32", max_json_retries=1)
    )
    yield engine
    engine.shutdown()
