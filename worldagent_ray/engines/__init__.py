"""Inference engines."""
from .base import (EngineError, EngineStartupError, InferenceEngine, PromptTooLongError,
                   UnknownModelError, WeightSyncError)
__all__ = ["EngineError", "EngineStartupError", "InferenceEngine", "PromptTooLongError",
           "UnknownModelError", "WeightSyncError"]
