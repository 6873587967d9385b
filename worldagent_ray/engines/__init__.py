"""Inference engines."""
from .base import (EngineError, EngineStartupError, EngineTimeoutError, InferenceEngine, PromptTooLongError,
                   StaleWeightsError, UnknownModelError, WeightSyncError)
from .factory import build_engine
__all__ = ["EngineError", "EngineStartupError", "EngineTimeoutError", "InferenceEngine", "PromptTooLongError",
           "StaleWeightsError", "UnknownModelError", "WeightSyncError", "build_engine"]
