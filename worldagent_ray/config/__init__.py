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
from .services import (  # noqa: F401
    EngineConfig,
    ActionConfig,
    CriticConfig,
    CriticTrainingConfig,
    CurriculumConfig,
    AgentsConfig,
    SandboxConfig,
    DiffusersConfig,
    StepwiseConfig,
    WorldConfig,
    MemoryConfig,
)
from .training import (  # noqa: F401
    FSDP_LORA_REFUSAL,
    LearnerConfig,
    PlannerConfig,
    ExportConfig,
    SFTConfig,
    OfflineDPOConfig,
    TrainingConfig,
)
from .root import (  # noqa: F401
    AutoscalingConfig,
    PartResources,
    ResourcesConfig,
    StageLimits,
    PipelineConfig,
    RunConfig,
    Config,
)
from .loading import (  # noqa: F401
    PROFILE_DIR,
    ENV_PREFIX,
    available_profiles,
    apply_overrides,
    env_overrides,
    validate_tree,
    load_config,
    dump_config,
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
    "PROFILE_DIR",
    "ENV_PREFIX",
    "available_profiles",
    "apply_overrides",
    "env_overrides",
    "validate_tree",
    "load_config",
    "dump_config",
]
