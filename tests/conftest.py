"""Shared pytest fixtures. Keep this small; component fixtures live in their test files."""

from __future__ import annotations

import os

import pytest

# Offline always: models come from packages or are built from configs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RUST_LOG", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
