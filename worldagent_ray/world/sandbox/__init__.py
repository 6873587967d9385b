"""The sandbox world: a deterministic symbolic kitchen with a renderer and ground truth."""

from .parser import ParsedStep, StepParser, normalize
from .rules import Rules, RulesError, load_rules
from .state import KitchenState
from .tasks import FAMILIES, SandboxTaskGenerator, build_task, is_valid_task, reference_plan, split_of
from .world import SandboxWorld

__all__ = [
    "FAMILIES", "KitchenState", "ParsedStep", "Rules", "RulesError", "SandboxTaskGenerator",
    "SandboxWorld", "StepParser", "build_task", "is_valid_task", "load_rules", "normalize",
    "reference_plan", "split_of",
]
