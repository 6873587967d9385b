"""What the two diffusers-backed worlds (``diffusers`` and ``stepwise``) share: their common
state (:class:`PipelineWorld`), the check of their prompt template, the default device, and
reading a checkpoint's ``model_index.json``."""

from __future__ import annotations

import threading
from typing import Any

from . import media
from .base import WorldModel
from .tiny_wan import resolve_video_model


class PipelineWorld(WorldModel):
    """A world that renders with diffusers pipelines, one call at a time per replica.

    Sets ``cfg``, ``critic_frames`` (PNG frames per video for the critic; default: that field's
    default), ``scenes``, ``device`` (default :func:`default_device`), ``model_path`` (``model``
    resolved: a builtin tiny name, a folder or a hub id) and an empty ``_pipes``, checks
    ``cfg.prompt_template`` against ``template_fields`` (an example value per allowed field,
    reported under ``template_setting``), then calls the subclass's ``_load()``.
    """

    def __init__(self, cfg: Any, model: str, device: str | None, critic_frames: int | None, scenes: Any,
                 template_setting: str, **template_fields: Any):
        self.cfg = cfg
        self.critic_frames = media.critic_frames_or_default(critic_frames)
        self.scenes = scenes
        check_prompt_template(template_setting, cfg.prompt_template, **template_fields)
        self.device = default_device(device)
        self.model_path = resolve_video_model(model)
        self._lock = threading.Lock()  # one pipeline call at a time per replica
        self._pipes: dict[str, Any] = {}
        self._load()

    def _load(self) -> None:
        raise NotImplementedError


def check_prompt_template(setting: str, template: str, **example: Any) -> None:
    """Raise ValueError naming ``setting`` when ``template`` uses a field other than the keys
    of ``example`` (or is not a valid format string)."""
    try:
        template.format(**example)
    except (KeyError, IndexError, ValueError) as e:
        fields = ", ".join("{" + k + "}" for k in example)
        raise ValueError(f"{setting} {template!r} may use only the fields {fields} ({type(e).__name__}: {e})") from None


def default_device(device: str | None) -> str:
    """``device``, else ``"cuda"`` when available, else ``"cpu"``."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def checkpoint_index(model_path: str) -> tuple[str, dict[str, Any]]:
    """The pipeline class a diffusers checkpoint names (``""`` when none) and its whole index."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(model_path)
    return index.get("_class_name", ""), index
