"""Loading the policy under training (no Ray): causal LMs and vision-language models from a
builtin name, a local folder or a hub id, in the right dtype, optionally with LoRA on the
language model.

Model kinds. A config with a ``vision_config`` (Qwen2-VL, Qwen2.5-VL, ...) is loaded with
``AutoModelForImageTextToText`` (transformers 5.19 has no ``AutoModelForCausalLM`` mapping for
Qwen2.5-VL); anything else with ``AutoModelForCausalLM``. For a vision-language model the
vision tower stays frozen: the learner trains the language model (fully, or its LoRA
adapters); the image features are recomputed in every step but get no gradient.

Names. ``model`` may be a builtin (see :func:`worldagent_ray.models.resolve_model`), a local
folder or a hub id (``Qwen/Qwen2.5-VL-7B-Instruct``), which ``from_pretrained`` loads from the
hub cache (``HF_HUB_OFFLINE=1``: from the cache alone) or downloads where a hub is reachable.

Dtype. ``None`` picks bfloat16 parameters on CUDA and float32 on CPU. With LoRA, peft keeps
the adapters in float32 whatever the base dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..engines.base import UnknownModelError
from ..models import builtin_models, resolve_model

logger = logging.getLogger(__name__)

__all__ = [
    "LORA_TARGET_MODULES", "LoadedPolicy", "default_dtype", "fully_shard_policy", "language_model_lora_targets",
    "load_policy", "open_image",
]

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
"""Leaf names of the attention projections that get LoRA adapters (language model only)."""

_VISION_PARTS = ("visual", "vision_tower", "vision_model", "vision_encoder", "multi_modal_projector")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 on CUDA, float32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


@dataclass
class LoadedPolicy:
    """What :func:`load_policy` returns.

    Attributes:
        module: the model (a peft model with LoRA), on its device, in train mode.
        path: what ``from_pretrained`` loaded (a local folder or a hub id).
        vision: whether it is a vision-language model.
        image_processor: the model's image processor (vision models only, else ``None``).
        image_token_id: the image placeholder id (vision models only, else ``None``).
    """

    module: torch.nn.Module
    path: str
    vision: bool
    image_processor: Any = None
    image_token_id: int | None = None


def _is_vision_part(name: str) -> bool:
    return any(part in name.split(".") for part in _VISION_PARTS)


def language_model_lora_targets(model: torch.nn.Module, leaves: tuple[str, ...] = LORA_TARGET_MODULES) -> list[str]:
    """Full names of the ``nn.Linear`` modules named ``leaves`` outside any vision tower.

    Raises:
        ValueError: no module matches (names the leaves looked for).
    """
    names = [
        n for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in leaves and not _is_vision_part(n)
    ]
    if not names:
        raise ValueError(f"no language-model linear layer named {list(leaves)} for LoRA in {type(model).__name__}")
    return names


def load_policy(
    model: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    gradient_checkpointing: bool = True,
    lora: bool = False,
    lora_rank: int = 16,
    lora_alpha: int = 32,
) -> LoadedPolicy:
    """Load ``model`` for training.

    Args:
        model: a builtin name, a local folder or a hub id.
        device: where the parameters go.
        dtype: parameter dtype; ``None``: :func:`default_dtype` of ``device``.
        gradient_checkpointing: recompute activations in backward (far less memory).
        lora, lora_rank, lora_alpha: LoRA adapters on the language model's attention projections.

    Raises:
        UnknownModelError: ``model`` is neither a builtin, a folder, nor a hub id loadable
            here (offline: not in the hub cache); the message names the model and the builtins.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    path = resolve_model(model)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UnknownModelError(
            f"policy model {model!r} (resolved to {path!r}) is not a builtin, a local folder, or a hub id "
            f"loadable here: {e}. Builtin models: {builtin_models()}"
        ) from e
    device = torch.device(device)
    dtype = default_dtype(device) if dtype is None else dtype
    vision = getattr(config, "vision_config", None) is not None
    cls = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    module = cls.from_pretrained(path, dtype=dtype)
    module.to(device)
    module.config.use_cache = False
    image_processor = image_token_id = None
    if vision:
        for name, p in module.named_parameters():
            if _is_vision_part(name):
                p.requires_grad_(False)
        image_processor = _image_processor(path, model)
        image_token_id = getattr(config, "image_token_id", None)
    if gradient_checkpointing:
        # Without it a step keeps every layer's activations for B x (prompt + completion)
        # tokens: ~14 GB for SmolLM2 with 8 samples of ~850 tokens on CPU.
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha,
            target_modules=language_model_lora_targets(module),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        module = get_peft_model(module, lcfg)
    module.train()
    logger.info("policy %s loaded from %s: %s, %s, vision=%s, lora=%s", model, path, type(module).__name__,
                dtype, vision, lora)
    return LoadedPolicy(module, path, vision, image_processor,
                        None if image_token_id is None else int(image_token_id))


def fully_shard_policy(module: torch.nn.Module, device: torch.device | str = "cpu") -> torch.nn.Module:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) over the default process group: every
    decoder layer is its own shard unit, then the root (in place; gloo on CPU, NCCL on GPU).
    Pass it as ``LearnerCore(wrap_model=...)`` on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (torch.distributed.get_world_size(),))
    for layer in [m for m in module.modules() if type(m).__name__.endswith("DecoderLayer")]:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def _image_processor(path: str, model: str) -> Any:
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path)
    except Exception as e:
        raise UnknownModelError(f"vision policy {model!r} has no loadable image processor at {path!r}: {e}") from e


def open_image(uri: str) -> Any:
    """Open a reference image as RGB: a local path, or a URI through fsspec (``s3://``,
    ``file://``). Pixel count capped by PIL's decompression-bomb guard."""
    from PIL import Image

    if "://" in uri:
        import fsspec

        with fsspec.open(uri, "rb") as f:
            with Image.open(f) as im:
                return im.convert("RGB")
    with Image.open(uri) as im:
        return im.convert("RGB")
