"""Process environment defaults, in one place (the Makefile, the jobs, the CLI and the tests
all call :func:`apply_env_defaults`).

``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` are set only when nothing needs the hub: every model
the config names is a builtin or a local folder (the embedded default), so a laptop never
waits on network timeouts, while a cluster profile that names hub ids keeps hub access.
A variable the user has already set is never changed.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, MutableMapping

QUIET_DEFAULTS = {
    "RUST_LOG": "error",  # LanceDB logs a warning per query otherwise
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
OFFLINE_DEFAULTS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def config_models(cfg: Any) -> list[str]:
    """Every model name a config refers to (engines, the diffusers world, the embedder)."""
    names = [e.model for e in cfg.engines.values()]
    if cfg.world.backend == "diffusers":
        names.append(cfg.world.diffusers.model)
    if cfg.memory.enabled:
        names.append(cfg.memory.embedder)
    return names


def needs_hub(models: Iterable[str]) -> bool:
    """True if some name is neither a builtin nor an existing local folder (a hub id)."""
    from .models import is_builtin
    from .world.tiny_wan import is_builtin as is_builtin_video

    return any(not (is_builtin(m) or is_builtin_video(m) or os.path.isdir(m)) for m in models)


def apply_env_defaults(offline: bool | None = None, cfg: Any = None,
                       environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the defaults the user has not set; return what was set.

    ``offline``: True/False forces the hub defaults on/off; None decides from ``cfg`` (offline
    when no model needs the hub; with no config, offline).
    """
    env = os.environ if environ is None else environ
    wanted = dict(QUIET_DEFAULTS)
    if offline is None:
        offline = cfg is None or not needs_hub(config_models(cfg))
    if offline:
        wanted.update(OFFLINE_DEFAULTS)
    return set_missing(env, wanted)


def set_missing(environ: MutableMapping[str, str], wanted: Mapping[str, str]) -> dict[str, str]:
    """Set each variable of ``wanted`` that ``environ`` lacks (a value already set always
    wins); returns the ones set."""
    applied = {}
    for k, v in wanted.items():
        if k not in environ:
            environ[k] = v
            applied[k] = v
    return applied


def native_bf16_precision() -> str:
    """``"bf16"`` where this machine multiplies bf16 natively (a CUDA GPU, or a CPU with AMX or
    AVX512-BF16), else ``"fp32"``: the training precision the benchmarks default to."""
    import torch

    if torch.cuda.is_available():
        return "bf16"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return "bf16" if (amx or avx512_bf16) else "fp32"
