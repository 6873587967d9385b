"""Step-wise world rendering: a plan becomes a video one step at a time.

Each step's action text drives one pipeline call, and every call after the first is conditioned
on the video made so far, so step ``k`` shows its action *from the state the earlier steps left*.
Each step's frame range is kept in :attr:`~worldagent_ray.schemas.Rollout.step_frames` (with the
step's last frame written as a PNG), so a critic can judge action following step by step.

Two methods (``StepwiseConfig.method``), both in diffusers 0.42:

- ``skyreels_df`` -- SkyReels-V2 diffusion forcing. Step 1 is
  :class:`~diffusers.SkyReelsV2DiffusionForcingPipeline` (text-to-video) or its
  ``ImageToVideo`` sibling when the task has a reference image. Every later step is
  :class:`~diffusers.SkyReelsV2DiffusionForcingVideoToVideoPipeline`: the last
  ``overlap_history`` frames are encoded as clean prefix latents and the pipeline denoises a
  ``clip_frames`` window that starts with them (``ar_step``, ``causal_block_size`` and
  ``addnoise_condition`` pass through). The window's first frames re-decode that prefix and are
  dropped, so each later step adds ``clip_frames - overlap_history`` new frames.
- ``wan_i2v_chain`` -- Wan image-to-video chained from the last frame: step 1 is text-to-video
  (or image-to-video from the reference image), every later step is
  :class:`~diffusers.WanImageToVideoPipeline` from the previous step's last frame, whose own
  first frame (that same image) is dropped: ``clip_frames - 1`` new frames per later step. It
  needs a checkpoint that does both: Wan 2.2 TI2V (``WanPipeline`` with ``expand_timesteps``,
  loaded into the image pipeline with ``from_pipe``), or an image-to-video checkpoint when every
  task has a reference image.

Frames already made are never re-generated: the video is the concatenation of each step's new
frames, so a plan's first ``k`` steps render the same frames whatever comes after them.

``lora`` loads a LoRA into the transformer before the sibling pipelines are made (they share
it): CausVid's LoRA for Wan (its original keys convert inside ``load_lora_weights``) gives
few-step generation (e.g. 4 steps, ``guidance_scale=1``). The file is read as safetensors only.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from typing import Any, Sequence

import numpy as np

from ..config import StepwiseConfig
from ..schemas import Plan, Rollout, StepFrames, Task
from . import media
from .base import coerce_plan
from .pipelines import PipelineWorld, checkpoint_index
from .reference import reference_or_error
from .tiny_wan import resolve_lora

logger = logging.getLogger(__name__)

DEFAULT_MODELS = {"skyreels_df": "tiny-skyreels-df", "wan_i2v_chain": "tiny-wan-ti2v"}
"""The model of each method when ``StepwiseConfig.model`` is unset."""
LORA_ADAPTER = "stepwise_lora"


def step_seed(seed: int, step: int) -> int:
    """The noise seed of one step: depends only on the plan's seed and the step's index."""
    digest = hashlib.sha256(f"{seed}\x1f{step}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def plan_seed(task_id: str, plan_index: int) -> int:
    """The seed of a plan when the caller gives none (same task and index, same video)."""
    return step_seed(int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:4], "big"), plan_index)


def prefix_frames(overlap_history: int, causal_block_size: int, temporal: int = 4) -> int:
    """Frames at the start of a video-to-video window that re-decode the conditioning history.

    The pipeline encodes ``overlap_history`` frames into ``(overlap_history - 1) // temporal + 1``
    latent frames, cuts them to a multiple of ``causal_block_size``, and a causal VAE decodes
    ``L`` latent frames into ``1 + temporal * (L - 1)`` frames.
    """
    latents = (overlap_history - 1) // temporal + 1
    latents -= latents % causal_block_size
    return 0 if latents <= 0 else 1 + temporal * (latents - 1)


def _uint8(frames: Any) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return arr


class StepwiseWorld(PipelineWorld):
    """A world model that renders a plan step by step (implements ``WorldModel``).

    Args:
        cfg (`StepwiseConfig`): method, model, shape, diffusion-forcing knobs, LoRA, prompt template.
        device (`str`, *optional*): torch device; default ``"cuda"`` when available, else ``"cpu"``.

    Raises:
        ValueError: the checkpoint cannot do what the method needs (named in the message), or the
            prompt template uses fields other than ``{goal}``, ``{step}`` and ``{action}``.
    """

    name = "stepwise"

    def __init__(self, cfg: StepwiseConfig, device: str | None = None, critic_frames: int | None = None,
                 scenes: Any = None):
        self.model = cfg.model or DEFAULT_MODELS[cfg.method]
        super().__init__(cfg, self.model, device, critic_frames, scenes, "world.stepwise.prompt_template",
                         goal="g", step=1, action="a")

    # ------------------------------------------------------------------ loading

    def _load(self) -> None:
        import torch

        cls_name, index = checkpoint_index(self.model_path)
        self.checkpoint_class = cls_name
        dtype = getattr(torch, self.cfg.dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            if self.cfg.method == "skyreels_df":
                self._load_skyreels(cls_name, dtype)
            else:
                self._load_wan(cls_name, bool(index.get("expand_timesteps", False)), dtype)
        for pipe in self._pipes.values():
            pipe.set_progress_bar_config(disable=True)
        logger.info("StepwiseWorld: %s (%s, %s) on %s; lora=%s", self.model, cls_name, self.cfg.method,
                    self.device, self.cfg.lora)

    def _load_skyreels(self, cls_name: str, dtype: Any) -> None:
        from diffusers import (
            SkyReelsV2DiffusionForcingImageToVideoPipeline,
            SkyReelsV2DiffusionForcingPipeline,
            SkyReelsV2DiffusionForcingVideoToVideoPipeline,
        )

        if not cls_name.startswith("SkyReelsV2DiffusionForcing"):
            raise ValueError(
                f"world.stepwise.method=skyreels_df needs a SkyReels-V2 diffusion-forcing checkpoint; "
                f"{self.model!r} is a {cls_name or 'unknown'} checkpoint"
            )
        base = SkyReelsV2DiffusionForcingPipeline.from_pretrained(self.model_path, torch_dtype=dtype)
        base.to(self.device)
        self._maybe_lora(base)
        self._pipes["first"] = base
        self._pipes["first_image"] = SkyReelsV2DiffusionForcingImageToVideoPipeline.from_pipe(base)
        self._pipes["next"] = SkyReelsV2DiffusionForcingVideoToVideoPipeline.from_pipe(base)
        self.block = self.cfg.causal_block_size or int(base.transformer.config.num_frame_per_block)
        self.temporal = int(base.vae_scale_factor_temporal)

    def _load_wan(self, cls_name: str, expand: bool, dtype: Any) -> None:
        from diffusers import WanImageToVideoPipeline, WanPipeline

        if cls_name == "WanPipeline":
            if not expand:
                raise ValueError(
                    f"world.stepwise.method=wan_i2v_chain needs image-to-video after step 1; {self.model!r} is a "
                    "text-to-video-only WanPipeline (use a TI2V checkpoint such as Wan-AI/Wan2.2-TI2V-5B-Diffusers, "
                    "or an image-to-video one with reference images)"
                )
            base = WanPipeline.from_pretrained(self.model_path, torch_dtype=dtype)
            base.to(self.device)
            self._maybe_lora(base)
            self._pipes["first"] = base
            self._pipes["next"] = WanImageToVideoPipeline.from_pipe(base)
        elif cls_name == "WanImageToVideoPipeline":
            base = WanImageToVideoPipeline.from_pretrained(self.model_path, torch_dtype=dtype)
            base.to(self.device)
            self._maybe_lora(base)
            self._pipes["next"] = base
        else:
            raise ValueError(
                f"world.stepwise.method=wan_i2v_chain needs a Wan checkpoint; {self.model!r} is a "
                f"{cls_name or 'unknown'} checkpoint"
            )
        self._pipes["first_image"] = self._pipes["next"]
        self.block, self.temporal = 1, 4

    def _maybe_lora(self, pipe: Any) -> None:
        if not self.cfg.lora:
            return
        from safetensors.torch import load as load_safetensors

        uri = resolve_lora(self.cfg.lora)
        try:
            state = load_safetensors(media.read_bytes(uri))  # safetensors only: never a pickle
        except Exception as e:
            raise ValueError(f"world.stepwise.lora {self.cfg.lora!r}: cannot read {uri!r} as safetensors "
                             f"({type(e).__name__}: {e})") from None
        pipe.load_lora_weights(state, adapter_name=LORA_ADAPTER)
        pipe.set_adapters([LORA_ADAPTER], [self.cfg.lora_scale])

    # ------------------------------------------------------------------ protocol

    def prepare_task(self, task: Task, out_dir: str) -> Task:
        """A proposed task with its starting scene as ``reference_image`` when this world has
        ``scenes``; else unchanged."""
        return self.scenes.attach(task, out_dir) if self.scenes is not None else task

    def admissible_actions(self, task: Task) -> list[str] | None:
        """A video model takes free text."""
        return None

    def info(self) -> dict[str, Any]:
        return {"world": self.name, "method": self.cfg.method, "model": self.model, "device": self.device,
                "checkpoint_class": self.checkpoint_class, "lora": self.cfg.lora,
                "shape": [self.cfg.height, self.cfg.width, self.cfg.clip_frames]}

    def new_frames_per_step(self) -> int:
        """Frames each step after the first adds."""
        if self.cfg.method == "skyreels_df":
            return self.cfg.clip_frames - prefix_frames(self.cfg.overlap_history, self.block, self.temporal)
        return self.cfg.clip_frames - 1

    def render_plans(self, task: Task, plans: Sequence[Plan | None], out_dir: str, ref: str | None,
                     seeds: Sequence[int] | None) -> list[Rollout]:
        """Render each plan step by step (see :meth:`WorldModel.render`); plan ``k``'s seed defaults
        to :func:`plan_seed`. Never raises for bad input."""
        image, ref_error = reference_or_error(ref, self.cfg.max_reference_pixels)
        out = []
        for k, raw in enumerate(plans):
            seed = int(seeds[k]) if seeds is not None and k < len(seeds) else plan_seed(task.id, k)
            base = dict(task_id=task.id, plan_index=k, world=self.name, seed=seed)
            plan = coerce_plan(raw)
            if ref_error:
                out.append(Rollout(**base, error=ref_error))
            elif raw is None:
                out.append(Rollout(**base, error="no plan: the action agent produced none"))
            elif plan is None:
                out.append(Rollout(**base, error=f"plans[{k}] is not a Plan: {raw!r:.200}"))
            elif not plan.steps:
                out.append(Rollout(**base, error="plan has no steps; nothing to render"))
            else:
                out.append(self._render_plan(task, plan, k, seed, out_dir, image))
        return out

    # ------------------------------------------------------------------ internals

    def _render_plan(self, task: Task, plan: Plan, k: int, seed: int, out_dir: str, image: Any) -> Rollout:
        t0 = time.perf_counter()
        base = dict(task_id=task.id, plan_index=k, world=self.name, seed=seed)
        digest = hashlib.sha256(plan.as_text().encode()).hexdigest()[:8]
        stem = f"{task.id.replace(':', '_')}.p{k:02d}.s{seed}.{digest}"
        frames: list[np.ndarray] = []
        spans: list[StepFrames] = []
        try:
            for s in plan.steps:
                prompt = self.cfg.prompt_template.format(goal=task.goal.rstrip("."), step=s.step,
                                                         action=s.action.strip().rstrip("."))
                new = self.extend(prompt, frames, image, step_seed(seed, s.step))
                start = len(frames)
                frames.extend(new)
                png = media.write_bytes(media.join(out_dir, f"{stem}.step{s.step:02d}.png"), media.encode_png(frames[-1]))
                spans.append(StepFrames(step=s.step, action=s.action, start=start, stop=len(frames), frame_uri=png))
            arts = media.write_video_artifacts(np.stack(frames), out_dir, stem, fps=self.cfg.fps,
                                               sample_frames=self.critic_frames)
        except Exception as e:  # a failed step fails this plan, not the replica
            logger.exception("step-wise rendering failed for %s plan %d", task.id, k)
            return Rollout(**base, error=f"step-wise rendering failed at step {len(spans) + 1}: "
                                         f"{type(e).__name__}: {e}"[:2000], latency_s=time.perf_counter() - t0)
        return Rollout(
            **base, video_uri=arts["video_uri"], gif_uri=arts["gif_uri"],  # type: ignore[arg-type]
            frame_uris=list(arts["frame_uris"]), num_frames=len(frames),  # type: ignore[arg-type]
            ground_truth=None, latency_s=time.perf_counter() - t0, step_frames=spans,
        )

    def extend(self, prompt: str, history: Sequence[np.ndarray], image: Any = None, seed: int = 0) -> list[np.ndarray]:
        """The new frames (uint8 HxWx3) of one step with ``prompt``, conditioned on ``history`` (the
        frames so far) when it has any, else on ``image`` (a PIL reference image) or text alone."""
        import torch
        from PIL import Image

        cfg = self.cfg
        common: dict[str, Any] = dict(
            prompt=prompt, height=cfg.height, width=cfg.width, num_frames=cfg.clip_frames,
            num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
            generator=torch.Generator(device="cpu").manual_seed(seed), output_type="np",
        )
        df = cfg.method == "skyreels_df"
        if df:
            common.update(base_num_frames=max(cfg.base_num_frames, cfg.clip_frames), ar_step=cfg.ar_step,
                          causal_block_size=cfg.causal_block_size, addnoise_condition=cfg.addnoise_condition)
        with self._lock, torch.inference_mode():
            if not history:
                if image is not None:
                    out = self._pipes["first_image"](image=image, **common).frames[0]
                elif "first" in self._pipes:
                    out = self._pipes["first"](**common).frames[0]
                else:
                    raise ValueError(f"{self.model!r} is image-to-video only and the task has no reference_image")
                return list(_uint8(out))
            history = [np.asarray(f, dtype=np.uint8) for f in history]
            if df:
                tail = history[-cfg.overlap_history:]
                out = self._pipes["next"](video=[Image.fromarray(f) for f in tail],
                                          overlap_history=cfg.overlap_history, **common).frames[0]
                skip = len(tail) + prefix_frames(cfg.overlap_history, self.block, self.temporal)
            else:
                out = self._pipes["next"](image=Image.fromarray(history[-1]), **common).frames[0]
                skip = 1
            return list(_uint8(out)[skip:])
