"""Loading a config tree: profile or path, environment and command-line overrides, validation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from pydantic import ValidationError

from .base import ConfigError
from .root import Config

PROFILE_DIR = Path(__file__).resolve().parent.parent / "configs"
ENV_PREFIX = "WORLDAGENT__"


# --------------------------------------------------------------------------- loading


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _resolve(profile_or_path: str | os.PathLike[str]) -> Path:
    p = Path(profile_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        return p
    candidate = PROFILE_DIR / f"{profile_or_path}.yaml"
    if not candidate.exists():
        raise ConfigError(
            f"unknown profile {str(profile_or_path)!r}; available: {available_profiles()} (or pass a YAML path)"
        )
    return candidate


def _set_path(tree: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    keys = [k for k in dotted.split(".") if k]
    if not keys:
        raise ConfigError(f"{origin}: empty key in override {dotted!r}")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{origin}: cannot set {dotted!r}: {k!r} is a {type(nxt).__name__}, not a section")
        node = nxt
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str], origin: str = "override") -> None:
    """Apply ``a.b.c=value`` strings; values are parsed as YAML (so ``3``, ``true``, ``[1,2]`` work)."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"{origin} {ov!r} must look like section.field=value")
        key, raw = ov.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{origin} {ov!r}: value is not valid YAML: {e}") from None
        _set_path(tree, key.strip(), value, origin)


def env_overrides(environ: Mapping[str, str] | None = None) -> list[str]:
    environ = os.environ if environ is None else environ
    out = []
    for k, v in sorted(environ.items()):
        if k.startswith(ENV_PREFIX) and len(k) > len(ENV_PREFIX):
            out.append(k[len(ENV_PREFIX):].lower().replace("__", ".") + "=" + v)
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = e["msg"]
        got = e.get("input")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        shown = repr(got)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"{loc}: {msg} (got {shown})")
    return f"invalid config {source}:\n  " + "\n  ".join(lines)


def validate_tree(tree: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_config(
    profile_or_path: str | os.PathLike[str] = "local-cpu",
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Load a profile or YAML file, then apply env and command-line overrides."""
    path = _resolve(profile_or_path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(tree).__name__}")
    tree.setdefault("profile", path.stem)
    apply_overrides(tree, env_overrides(environ), origin="environment override")
    apply_overrides(tree, overrides, origin="override")
    return validate_tree(tree, source=str(path))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
