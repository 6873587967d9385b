"""The diffusers video world: Wan 2.1 / 2.2 text-to-video, image-to-video and TI2V.

A plan becomes one prompt (its steps joined in temporal order through
``DiffusersConfig.prompt_template``), the prompt becomes a video, and the video is written as
mp4, GIF and a few PNG frames for the critic. Plans of one shape are batched into a single
pipeline call, each with its own ``torch.Generator`` so a video depends only on its seed.

How a Wan checkpoint conditions on an image (diffusers 0.42):

- Wan 2.1 / 2.2 A14B image-to-video: :class:`~diffusers.WanImageToVideoPipeline`
  (``model_index.json`` names it); the transformer takes noise + image latents + mask.
- Wan 2.2 TI2V-5B: saved as :class:`~diffusers.WanPipeline` with ``expand_timesteps=True``.
  ``WanPipeline.__call__`` takes no image: text-to-video runs it as saved, and
  image-to-video loads the *same components* into ``WanImageToVideoPipeline`` (which keeps
  ``expand_timesteps`` and pins the first latent frame to the image). This module does that
  with ``from_pipe``, sharing the weights.

A video model knows nothing about the world's state, so every Rollout has
``ground_truth=None``; the critic judges the frames.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..config import DiffusersConfig
from ..schemas import Plan, Rollout, Task
from . import media
from .base import coerce_plan
from .pipelines import PipelineWorld, checkpoint_index
from .reference import ReferenceScenes, reference_or_error

logger = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass
class RenderRequest:
    """One ``render`` call, so that several calls can share pipeline batches."""

    task: Task
    plans: Sequence[Plan | None]
    out_dir: str
    reference_image: str | None = None
    seeds: Sequence[int] | None = None


@dataclass
class _Job:
    """One plan waiting for a pipeline call."""

    request_index: int
    plan_index: int
    prompt: str
    seed: int
    out_dir: str
    stem: str
    task_id: str


@dataclass
class _Group:
    mode: str  # "t2v" or "i2v"
    image: Any = None  # PIL image for i2v
    jobs: list[_Job] = field(default_factory=list)


def default_seed(task_id: str, plan_index: int) -> int:
    """Deterministic per-plan seed when the caller gives none (same task and index, same video)."""
    digest = hashlib.sha256(f"{task_id}\x1f{plan_index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def plan_to_prompt(task: Task, plan: Plan, template: str, joiner: str) -> str:
    """Join a plan's steps, in temporal order, into one prompt.

    Args:
        task (`Task`): gives ``{goal}``.
        plan (`Plan`): its actions, in step order, give ``{steps}`` (trailing ``.``/``;`` dropped).
        template (`str`): a ``str.format`` template with the fields ``goal`` and ``steps``.
        joiner (`str`): put between consecutive steps, e.g. ``", then "``.
    """
    ordered = sorted(plan.steps, key=lambda s: s.step)
    steps = joiner.join(s.action.strip().rstrip(".;").strip() for s in ordered)
    return template.format(goal=task.goal.rstrip("."), steps=steps)


def _safe_stem(task_id: str, plan_index: int) -> str:
    return f"{task_id.replace(':', '_')}.p{plan_index:02d}"


class DiffusersWorld(PipelineWorld):
    """A world model backed by a diffusers Wan pipeline (implements ``WorldModel``).

    Args:
        cfg (`DiffusersConfig`):
            ``model`` (builtin tiny name, folder or hub id), ``pipeline`` (``"auto"``,
            ``"WanPipeline"`` or ``"WanImageToVideoPipeline"``), ``dtype``, shape
            (``height``/``width``/``num_frames``), ``num_inference_steps``,
            ``guidance_scale``, ``fps``, the prompt template and batching limits.
        device (`str`, *optional*):
            Torch device; default ``"cuda"`` when available, else ``"cpu"``.
        critic_frames (`int`, *optional*):
            PNG frames written per video for the critic; pass ``agents.critic.num_frames``
            (the default is that field's default).
        scenes (`ReferenceScenes`, *optional*):
            gives proposed tasks their starting scene (letterboxed to the video's shape) as
            reference image in :meth:`prepare_task`, so image-to-video conditions on it.

    Videos and frames are written through :mod:`worldagent_ray.storage` under each
    request's ``out_dir`` (a path or a URI such as ``s3://bucket/run/videos/<task>``), and
    reference images are read through it (capped in bytes and pixels, with a deadline for
    remote URIs), so a replica on any node reads and writes the run root alike.

    ``pipeline="auto"`` conditions on the reference image when one is given and the model
    can (an I2V checkpoint, or a TI2V one with ``expand_timesteps``); otherwise it runs
    text-to-video. An I2V-only checkpoint without a reference image yields ``Rollout.error``.
    """

    name = "diffusers"

    def __init__(self, cfg: DiffusersConfig, device: str | None = None, critic_frames: int | None = None,
                 scenes: ReferenceScenes | None = None):
        super().__init__(cfg, cfg.model, device, critic_frames, scenes, "world.diffusers.prompt_template",
                         goal="g", steps="s")

    # ------------------------------------------------------------------ loading

    def _load(self) -> None:
        import torch
        from diffusers import WanImageToVideoPipeline, WanPipeline

        class_name, index = checkpoint_index(self.model_path)
        expand = bool(index.get("expand_timesteps", False))
        self.checkpoint_class = class_name
        dtype = getattr(torch, _DTYPES[self.cfg.dtype])
        wanted = self.cfg.pipeline
        if wanted == "auto":
            cls = {"WanPipeline": WanPipeline, "WanImageToVideoPipeline": WanImageToVideoPipeline}.get(class_name)
            if cls is None:
                raise ValueError(
                    f"world.diffusers.model {self.cfg.model!r} is a {class_name or 'unknown'} checkpoint; "
                    "supported: WanPipeline, WanImageToVideoPipeline"
                )
        else:
            cls = WanPipeline if wanted == "WanPipeline" else WanImageToVideoPipeline
        with warnings.catch_warnings():  # newer diffusers prefer `dtype`; older ones only know `torch_dtype`
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = cls.from_pretrained(self.model_path, torch_dtype=dtype)
        self._place(pipe)
        self.supports_text = isinstance(pipe, WanPipeline)
        self.supports_image = isinstance(pipe, WanImageToVideoPipeline) or (
            wanted == "auto" and expand and isinstance(pipe, WanPipeline)
        )
        self._pipes["t2v" if isinstance(pipe, WanPipeline) else "i2v"] = pipe
        logger.info(
            "DiffusersWorld: %s (%s) on %s; text=%s image=%s",
            self.cfg.model, type(pipe).__name__, self.device, self.supports_text, self.supports_image,
        )

    def _place(self, pipe: Any) -> None:
        pipe.set_progress_bar_config(disable=True)
        if self.cfg.enable_cpu_offload and self.device.startswith("cuda"):
            pipe.enable_model_cpu_offload()
        else:
            pipe.to(self.device)

    def _pipe(self, mode: str) -> Any:
        if mode not in self._pipes:  # TI2V: the image pipeline shares the text pipeline's weights
            from diffusers import WanImageToVideoPipeline

            self._pipes["i2v"] = WanImageToVideoPipeline.from_pipe(self._pipes["t2v"])
            self._pipes["i2v"].set_progress_bar_config(disable=True)
        return self._pipes[mode]

    # ------------------------------------------------------------------ protocol

    def prepare_task(self, task: Task, out_dir: str) -> Task:
        """A proposed task with its starting scene as ``reference_image`` (a PNG under
        ``out_dir``) when this world has ``scenes``; else unchanged."""
        return self.scenes.attach(task, out_dir) if self.scenes is not None else task

    def admissible_actions(self, task: Task) -> list[str] | None:
        """A video model takes free text."""
        return None

    def info(self) -> dict[str, Any]:
        return {
            "world": self.name,
            "model": self.cfg.model,
            "checkpoint_class": self.checkpoint_class,
            "device": self.device,
            "supports_text": self.supports_text,
            "supports_image": self.supports_image,
            "shape": list(self.shape_key()),
        }

    def shape_key(self) -> tuple[int, int, int]:
        """Videos with the same key can share a pipeline call: (height, width, num_frames)."""
        return (self.cfg.height, self.cfg.width, self.cfg.num_frames)

    def render_plans(self, task: Task, plans: Sequence[Plan | None], out_dir: str, ref: str | None,
                     seeds: Sequence[int] | None) -> list[Rollout]:
        """Render each plan as a video (see :meth:`WorldModel.render`). Never raises for bad input.
        ``seeds`` default to :func:`default_seed` of the task id and plan index."""
        return self.render_batch([RenderRequest(task, plans, out_dir, ref, seeds)])[0]

    def render_batch(self, requests: Sequence[RenderRequest]) -> list[list[Rollout]]:
        """Render several requests, sharing pipeline calls between plans of the same mode and
        reference image. Returns one list of Rollouts per request, in order."""
        results: list[list[Rollout | None]] = []
        groups: "OrderedDict[tuple, _Group]" = OrderedDict()
        for ri, req in enumerate(requests):
            results.append(self._plan_request(ri, req, groups))
        for group in groups.values():
            for start in range(0, len(group.jobs), self.cfg.max_videos_per_call):
                chunk = group.jobs[start : start + self.cfg.max_videos_per_call]
                for job, rollout in zip(chunk, self._run_chunk(group, chunk)):
                    results[job.request_index][job.plan_index] = rollout
        return [[r for r in rs if r is not None] for rs in results]

    # ------------------------------------------------------------------ internals

    def _error(self, task_id: str, plan_index: int, seed: int | None, msg: str) -> Rollout:
        return Rollout(task_id=task_id, plan_index=plan_index, world=self.name, seed=seed, error=msg)

    def _plan_request(self, ri: int, req: RenderRequest, groups: "OrderedDict[tuple, _Group]") -> list[Rollout | None]:
        task = req.task
        n = len(req.plans)
        out: list[Rollout | None] = [None] * n
        seeds = list(req.seeds) if req.seeds is not None else [default_seed(task.id, i) for i in range(n)]
        if len(seeds) != n:
            msg = f"seeds has {len(seeds)} entries but there are {n} plans"
            return [self._error(task.id, i, None, msg) for i in range(n)]
        mode, image, req_error = self._choose_mode(req)
        try:
            out_dir = media.normalize(req.out_dir)
        except ValueError as e:
            out_dir, req_error = "", req_error or f"out_dir: {e}"
        for i, plan in enumerate(req.plans):
            if req_error is not None:
                out[i] = self._error(task.id, i, seeds[i], req_error)
            elif plan is None:
                out[i] = self._error(task.id, i, seeds[i], "no plan: the action agent produced none")
            elif isinstance(plan, str) or (plan := coerce_plan(plan)) is None:
                out[i] = self._error(task.id, i, seeds[i], f"plans[{i}] is not a Plan: {req.plans[i]!r:.200}")
            elif not plan.steps:
                out[i] = self._error(task.id, i, seeds[i], "plan has no steps; nothing to render")
            else:
                prompt = plan_to_prompt(task, plan, self.cfg.prompt_template, self.cfg.step_joiner)
                key = (mode, id(image) if image is not None else None)
                group = groups.setdefault(key, _Group(mode=mode, image=image))
                group.jobs.append(
                    _Job(ri, i, prompt, int(seeds[i]), out_dir, _safe_stem(task.id, i), task.id)
                )
        return out

    def _choose_mode(self, req: RenderRequest) -> tuple[str, Any, str | None]:
        """Return (mode, PIL image or None, error for every plan or None)."""
        uri = req.reference_image if req.reference_image is not None else req.task.reference_image
        image, error = reference_or_error(uri, self.cfg.max_reference_pixels)
        if error is not None:
            return "t2v", None, error
        if image is not None and self.supports_image:
            return "i2v", image, None
        if not self.supports_text:
            return "i2v", None, (
                f"world.diffusers.model {self.cfg.model!r} is image-to-video only and the task has no "
                "reference_image"
            )
        if image is not None:
            logger.info("model %s cannot condition on an image; rendering task %s from text", self.cfg.model, req.task.id)
        return "t2v", None, None

    def _run_chunk(self, group: _Group, jobs: list[_Job]) -> list[Rollout]:
        import torch

        cfg = self.cfg
        kwargs: dict[str, Any] = dict(
            prompt=[j.prompt for j in jobs],
            height=cfg.height,
            width=cfg.width,
            num_frames=cfg.num_frames,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            generator=[torch.Generator(device="cpu").manual_seed(j.seed) for j in jobs],
            output_type="np",
        )
        if group.mode == "i2v":
            kwargs["image"] = group.image
        t0 = time.perf_counter()
        try:
            with self._lock, torch.inference_mode():
                videos = self._pipe(group.mode)(**kwargs).frames
        except Exception as e:  # a failed call fails its videos, not the worker
            logger.exception("pipeline call failed for %d video(s)", len(jobs))
            msg = f"{group.mode} pipeline call failed: {type(e).__name__}: {e}"
            return [self._error(j.task_id, j.plan_index, j.seed, msg[:2000]) for j in jobs]
        elapsed = time.perf_counter() - t0
        return [self._write(j, videos[k], elapsed) for k, j in enumerate(jobs)]

    def _write(self, job: _Job, frames: Any, elapsed: float) -> Rollout:
        try:
            uris = media.write_video_artifacts(
                frames, job.out_dir, job.stem, fps=self.cfg.fps, sample_frames=self.critic_frames
            )
        except Exception as e:
            return self._error(job.task_id, job.plan_index, job.seed, f"writing video to {job.out_dir!r} failed: {type(e).__name__}: {e}")
        return Rollout(
            task_id=job.task_id,
            plan_index=job.plan_index,
            video_uri=uris["video_uri"],
            gif_uri=uris["gif_uri"],
            frame_uris=list(uris["frame_uris"]),
            num_frames=int(len(frames)),
            ground_truth=None,
            world=self.name,
            seed=job.seed,
            latency_s=elapsed,
        )
