"""What the two diffusers-backed worlds (``diffusers`` and ``stepwise``) share: the check of
their prompt template, the default device, and reading a checkpoint's ``model_index.json``."""

from __future__ import annotations

from typing import Any


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
