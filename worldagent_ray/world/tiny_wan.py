"""Tiny random-weight Wan pipelines, built offline from configs.

They exercise the real diffusers Wan code path (tokenizer -> UMT5 -> transformer -> VAE ->
frames) on a CPU in well under a second, so tests and the embedded default need no model
hub. The output is noise-like video: these models prove plumbing, never quality.

Each builtin is built once into ``<cache_dir>/<name>`` under a file lock, written to a
temporary folder and renamed into place atomically, and then loaded through the same
``from_pretrained`` path a real checkpoint such as ``Wan-AI/Wan2.2-TI2V-5B-Diffusers`` takes.

Builtins:

- ``tiny-wan-t2v``: :class:`~diffusers.WanPipeline`, text-to-video (Wan 2.1 layout).
- ``tiny-wan-i2v``: :class:`~diffusers.WanImageToVideoPipeline` in Wan 2.2 A14B style
  (``image_encoder=None``, two transformers switched at ``boundary_ratio``, transformer
  ``in_channels=36``: noise, image latents and mask).
- ``tiny-wan-ti2v``: :class:`~diffusers.WanPipeline` with ``expand_timesteps=True``, the
  layout of Wan 2.2 TI2V-5B: text-to-video as saved, image-to-video when the same
  components are loaded into :class:`~diffusers.WanImageToVideoPipeline`.
- ``tiny-skyreels-df``: :class:`~diffusers.SkyReelsV2DiffusionForcingPipeline` (the layout of
  ``Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers``); its image-to-video and video-to-video
  siblings load the same components with ``from_pipe``.

And one builtin LoRA file, ``tiny-causvid-lora`` (:func:`ensure_tiny_causvid_lora`): random
weights for the tiny Wan transformers in the *original* key format of the CausVid LoRA for Wan
(``diffusion_model.blocks.N.self_attn.q.lora_down.weight`` / ``lora_up`` / ``diff_b``, norm
``diff`` keys, ``time_projection`` and ``head``), which diffusers' LoRA converter turns into its own
names inside ``WanPipeline.load_lora_weights``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

TINY_WAN_RECIPE_VERSION = 1
"""Bump to rebuild cached tiny pipelines after a recipe change."""

BUILTIN_VIDEO_MODELS: dict[str, str] = {
    "tiny-wan-t2v": "t2v",
    "tiny-wan-i2v": "i2v",
    "tiny-wan-ti2v": "ti2v",
    "tiny-skyreels-df": "skyreels_df",
}
"""Builtin tiny pipeline names and their kind."""

_RECIPE_FILE = "worldagent_recipe.json"
_TEXT_DIM = 32  # UMT5 d_model; must equal the transformer's text_dim
_VOCAB_SIZE = 256
_CORPUS = (
    "a first-person video of a robot in a kitchen goal steps then pick up place put open close "
    "the a an cup mug plate bowl egg eggs apple knife spoon fork pan pot stove oven fridge sink "
    "table counter drawer cabinet shelf water wash cut slice crack pour stir cook boil fry heat "
    "turn on off move into onto from with and robot arm gripper hand left right top bottom red "
    "green blue yellow white black towel bread butter salt sugar milk sponge dish rack microwave"
)


def cache_dir() -> Path:
    """The artefact cache: ``worldagent_ray.models.cache_dir()`` when available, else the same
    rule (env ``WORLDAGENT_CACHE``, default ``~/.cache/worldagent_ray``)."""
    try:
        from ..models import cache_dir as _models_cache_dir  # type: ignore[attr-defined]
    except ImportError:
        root = os.environ.get("WORLDAGENT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "worldagent_ray")
        path = Path(root)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return Path(_models_cache_dir())


def is_builtin(name: str) -> bool:
    return name in BUILTIN_VIDEO_MODELS


def resolve_video_model(name: str) -> str:
    """Return a folder for a builtin tiny pipeline (building it on first use); pass any other
    name (a hub id such as ``Wan-AI/Wan2.2-TI2V-5B-Diffusers``, or a path) through unchanged.

    Args:
        name (`str`):
            A builtin name (see :data:`BUILTIN_VIDEO_MODELS`), a folder, or a hub id.

    Returns:
        `str`: what to pass to ``from_pretrained``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"video model name must be a non-empty string, got {name!r}")
    if is_builtin(name):
        return str(ensure_tiny_wan(name))
    return name


def ensure_tiny_wan(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Build the builtin ``name`` under ``root`` (default :func:`cache_dir`) if it is missing or
    stale, and return its folder. Safe to call from several processes at once.

    Raises:
        ValueError: ``name`` is not a builtin.
    """
    if name not in BUILTIN_VIDEO_MODELS:
        raise ValueError(f"unknown tiny video model {name!r}; builtins: {sorted(BUILTIN_VIDEO_MODELS)}")
    from filelock import FileLock

    base = Path(root) if root is not None else cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    target = base / name
    with FileLock(str(base / f".{name}.lock")):
        if _is_current(target):
            return target
        tmp = base / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        pipe = build_tiny_wan_pipeline(BUILTIN_VIDEO_MODELS[name])
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / _RECIPE_FILE).write_text(json.dumps({"name": name, "version": TINY_WAN_RECIPE_VERSION}))
        if target.exists():  # stale recipe: move aside, then drop
            stale = base / f".{name}.stale-{os.getpid()}"
            os.replace(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, target)
    return target


def _is_current(folder: Path) -> bool:
    try:
        meta = json.loads((folder / _RECIPE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("version") == TINY_WAN_RECIPE_VERSION and (folder / "model_index.json").exists()


# --------------------------------------------------------------------------- components


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer trained locally on a small kitchen vocabulary, wrapped as
    :class:`~transformers.PreTrainedTokenizerFast` (pad ``<pad>`` = 0, eos ``</s>`` = 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def _text_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(
        vocab_size=vocab_size,
        d_model=_TEXT_DIM,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(cfg).eval()


def _vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


def _transformer(in_channels: int, skyreels: bool = False):
    from diffusers import SkyReelsV2Transformer3DModel, WanTransformer3DModel

    cls = SkyReelsV2Transformer3DModel if skyreels else WanTransformer3DModel
    return cls(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=in_channels,
        out_channels=16,
        text_dim=_TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def _scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def build_tiny_wan_pipeline(kind: str, seed: int = 0):
    """Build a tiny Wan pipeline with random weights (deterministic in ``seed``).

    Args:
        kind (`str`): ``"t2v"``, ``"i2v"`` (Wan 2.2 A14B style), ``"ti2v"`` (Wan 2.2 TI2V-5B style) or
            ``"skyreels_df"`` (SkyReels-V2 diffusion forcing).
        seed (`int`): seeds the weight initialisation.

    Returns:
        `diffusers.WanPipeline`, `diffusers.WanImageToVideoPipeline` or
        `diffusers.SkyReelsV2DiffusionForcingPipeline` on CPU in float32.
    """
    import torch
    from diffusers import WanImageToVideoPipeline, WanPipeline

    if kind not in ("t2v", "i2v", "ti2v", "skyreels_df"):
        raise ValueError(f"kind must be 't2v', 'i2v', 'ti2v' or 'skyreels_df', got {kind!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_tiny_tokenizer()
        common = dict(
            tokenizer=tokenizer,
            text_encoder=_text_encoder(len(tokenizer)),
            vae=_vae(),
            scheduler=_scheduler(),
        )
        if kind == "t2v":
            return WanPipeline(transformer=_transformer(16), **common)
        if kind == "ti2v":
            return WanPipeline(transformer=_transformer(16), expand_timesteps=True, **common)
        if kind == "skyreels_df":
            from diffusers import SkyReelsV2DiffusionForcingPipeline

            return SkyReelsV2DiffusionForcingPipeline(transformer=_transformer(16, skyreels=True), **common)
        return WanImageToVideoPipeline(
            transformer=_transformer(36),
            transformer_2=_transformer(36),
            image_encoder=None,
            image_processor=None,
            boundary_ratio=0.875,
            **common,
        )


# --------------------------------------------------------------------------- a CausVid-format LoRA

TINY_CAUSVID_LORA = "tiny-causvid-lora"
_LORA_RANK = 4
_INNER = 24  # num_attention_heads (2) * attention_head_dim (12) of the tiny transformers
_FFN = 32
_FREQ = 256
_OUT = 16 * 4  # out_channels * patch (1 * 2 * 2)


def tiny_causvid_lora_state_dict(num_layers: int = 2, rank: int = _LORA_RANK, seed: int = 0) -> dict:
    """Random LoRA weights for the tiny Wan transformers, in CausVid's original key format.

    Per block: ``self_attn`` and ``cross_attn`` ``q/k/v/o`` and ``ffn.0``/``ffn.2`` with
    ``lora_down.weight`` (rank x in), ``lora_up.weight`` (out x rank) and ``diff_b`` (out);
    ``norm3.diff``/``diff_b`` (which diffusers drops: CausVid's norm diffs are zeros); plus
    ``time_projection.1`` and ``head.head``. All keys start with ``diffusion_model.``.
    """
    import torch

    g = torch.Generator().manual_seed(seed)

    def pair(prefix: str, d_in: int, d_out: int) -> dict:
        return {
            f"{prefix}.lora_down.weight": torch.randn(rank, d_in, generator=g) * 0.5,
            f"{prefix}.lora_up.weight": torch.randn(d_out, rank, generator=g) * 0.5,
            f"{prefix}.diff_b": torch.randn(d_out, generator=g) * 0.05,
        }

    sd: dict = {}
    for i in range(num_layers):
        b = f"diffusion_model.blocks.{i}"
        for attn in ("self_attn", "cross_attn"):
            for o in ("q", "k", "v", "o"):
                sd.update(pair(f"{b}.{attn}.{o}", _INNER, _INNER))
        sd.update(pair(f"{b}.ffn.0", _INNER, _FFN))
        sd.update(pair(f"{b}.ffn.2", _FFN, _INNER))
        sd[f"{b}.norm3.diff"] = torch.zeros(_INNER)
        sd[f"{b}.norm3.diff_b"] = torch.zeros(_INNER)
    sd.update(pair("diffusion_model.time_projection.1", _INNER, _INNER * 6))
    sd.update(pair("diffusion_model.head.head", _INNER, _OUT))
    return {k: v.contiguous() for k, v in sd.items()}


def ensure_tiny_causvid_lora(root: str | os.PathLike[str] | None = None) -> Path:
    """Write :func:`tiny_causvid_lora_state_dict` as safetensors under ``root`` (default
    :func:`cache_dir`) once, atomically and under a file lock; return the file."""
    from filelock import FileLock
    from safetensors.torch import save_file

    base = Path(root) if root is not None else cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    target = base / f"{TINY_CAUSVID_LORA}-v{TINY_WAN_RECIPE_VERSION}.safetensors"
    with FileLock(str(base / f".{TINY_CAUSVID_LORA}.lock")):
        if not target.exists():
            tmp = base / f".{TINY_CAUSVID_LORA}.tmp-{os.getpid()}"
            save_file(tiny_causvid_lora_state_dict(), str(tmp), metadata={"format": "pt", "origin": "worldagent_ray tiny"})
            os.replace(tmp, target)
    return target


def resolve_lora(name: str) -> str:
    """The builtin ``tiny-causvid-lora`` file (built on first use), or ``name`` (a path or URI) unchanged."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"LoRA name must be a non-empty string, got {name!r}")
    return str(ensure_tiny_causvid_lora()) if name == TINY_CAUSVID_LORA else name
