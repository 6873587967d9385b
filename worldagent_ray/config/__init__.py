"""One pydantic config tree for the whole system, loaded from YAML.

Precedence, lowest to highest:

1. the profile YAML (``local-cpu``, ``gpu-cluster``, or any path);
2. environment variables ``WORLDAGENT__SECTION__FIELD=value`` (double underscores nest);
3. command-line overrides ``section.field=value`` (values parsed as YAML scalars).

Every section forbids unknown fields, and ``Literal`` fields list their allowed values,
so a typo fails with an error that names the field and what it accepts::

    ConfigError: configs/x.yaml: world.backend: Input should be 'sandbox', 'diffusers' or
    'stepwise' (got 'sandbx')
"""

from __future__ import annotations

from .base import (  # noqa: F401
    ConfigError,
)
from .loading import (  # noqa: F401
    ENV_PREFIX,
    PROFILE_DIR,
    apply_overrides,
    available_profiles,
    dump_config,
    env_overrides,
    load_config,
    validate_tree,
)
from .root import (  # noqa: F401
    AutoscalingConfig,
    Config,
    PartResources,
    PipelineConfig,
    ResourcesConfig,
    RunConfig,
    StageLimits,
    used_engines,
)
from .services import (  # noqa: F401
    ActionConfig,
    AgentsConfig,
    CriticConfig,
    CriticTrainingConfig,
    CurriculumConfig,
    DiffusersConfig,
    EngineConfig,
    MemoryConfig,
    SandboxConfig,
    StepwiseConfig,
    WorldConfig,
)
from .training import (  # noqa: F401
    FSDP_LORA_REFUSAL,
    ExportConfig,
    LearnerConfig,
    OfflineDPOConfig,
    PlannerConfig,
    SFTConfig,
    TrainingConfig,
)

__all__ = [
    "ConfigError",
    "EngineConfig",
    "ActionConfig",
    "CriticConfig",
    "CriticTrainingConfig",
    "CurriculumConfig",
    "AgentsConfig",
    "SandboxConfig",
    "DiffusersConfig",
    "StepwiseConfig",
    "WorldConfig",
    "MemoryConfig",
    "FSDP_LORA_REFUSAL",
    "LearnerConfig",
    "PlannerConfig",
    "ExportConfig",
    "SFTConfig",
    "OfflineDPOConfig",
    "TrainingConfig",
    "AutoscalingConfig",
    "PartResources",
    "ResourcesConfig",
    "StageLimits",
    "PipelineConfig",
    "RunConfig",
    "Config",
    "used_engines",
    "PROFILE_DIR",
    "ENV_PREFIX",
    "available_profiles",
    "apply_overrides",
    "env_overrides",
    "validate_tree",
    "load_config",
    "dump_config",
]
