"""Inference engines."""
from .base import (EngineError, EngineStartupError, InferenceEngine, PromptTooLongError,
                   UnknownModelError, WeightSyncError)
from .factory import build_engine
__all__ = ["EngineError", "EngineStartupError", "InferenceEngine", "PromptTooLongError",
           "UnknownModelError", "WeightSyncError", "build_engine"]
