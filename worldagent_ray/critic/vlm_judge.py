"""A vision-language judge: sampled frames + goal + plan -> the five scores and a caption.

The engine is constrained to :meth:`~worldagent_ray.schemas.Verdict.decoding_schema`; its
output is data (parsed by the total :func:`~worldagent_ray.critic.parsing.parse_judgement`,
never run). Malformed output gives zero scores and a note; a degenerate caption (a loop,
leaked prompt text) is dropped with a note (the critic then uses the world's description).

Frames. The world writes ``agents.critic.num_frames`` PNG frames per rollout under the run
root (a local folder or a URI such as ``s3://...``); the judge reads them through
:mod:`worldagent_ray.storage` (deadline and retries for remote URIs, pixel cap checked before
decoding), so frames written on one node are judged on another, and hands the engine decoded
images. The task's reference image (its starting scene), when it has one, comes first.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from ..config import CriticConfig
from ..engines.base import InferenceEngine
from ..schemas import Plan, Rollout, SamplingParams, Scores, Task, Verdict
from ..world.media import sample_indices
from ..world.reference import MAX_FRAME_PIXELS, ImageLoadError, open_image
from .captions import ground_caption
from .parsing import JudgeParseError, parse_judgement

__all__ = ["SYSTEM", "VLMJudge", "judge_messages", "parse_judgement"]

READ_THREADS = 8
"""Frames read at once (remote reads overlap; local reads are cheap either way)."""

SYSTEM = (
    "You are a strict judge of robot videos. Given frames of a video, the goal and the plan, "
    "rate from 0 to 1: action_following (the video follows the plan's steps), "
    "temporal_consistency (steps happen in a sensible order), object_interaction (objects are "
    "handled plausibly), goal_achievement (the goal is reached), physics (nothing impossible "
    "happens). Describe the final state in state_caption. Answer only with JSON."
)


def judge_messages(task: Task, plan: Plan | None, frames: Sequence[Any], reference: Any = None) -> list[dict[str, Any]]:
    """The judge's chat: the starting scene (if any), the frames in order, goal and plan.
    ``frames`` and ``reference`` are images as the engine takes them (PIL images here)."""
    parts: list[dict[str, Any]] = []
    if reference is not None:
        parts += [{"type": "text", "text": "The starting scene:"}, {"type": "image", "image": reference},
                  {"type": "text", "text": "Frames of the video, in order:"}]
    parts += [{"type": "image", "image": f} for f in frames]
    steps = plan.as_text() if plan is not None else "(no plan)"
    parts.append({"type": "text", "text": f"Goal: {task.goal}\nPlan:\n{steps}\nJudge the video."})
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": parts}]


class VLMJudge:
    """Judges rollouts from their sampled frames with a vision-language engine."""

    name = "vlm_judge"

    def __init__(self, engine: InferenceEngine | None, cfg: CriticConfig):
        self.engine = engine
        self.cfg = cfg

    def frames_for(self, rollout: Rollout) -> list[str]:
        """The frame locations judged: ``num_frames`` of the rollout's, evenly spread."""
        uris = rollout.frame_uris
        return [uris[i] for i in sample_indices(len(uris), self.cfg.num_frames)]

    def _read(self, pool: ThreadPoolExecutor, task: Task, rollout: Rollout,
              refs: dict[str, Any]) -> tuple[list[Any], Any, list[str]]:
        """``(frames, reference image or None, notes)``; raises ``ImageLoadError`` when a frame
        cannot be read (an unreadable reference image is only noted). ``refs`` caches
        reference images by location within one batch (a task's G rollouts share one)."""
        uris = self.frames_for(rollout)
        notes = []
        if uris and len(uris) < self.cfg.num_frames and rollout.num_frames > len(uris):
            notes.append(f"vlm_judge: judged {len(uris)} of the {self.cfg.num_frames} frames asked "
                         f"(the world wrote {len(uris)} of {rollout.num_frames})")
        frames = list(pool.map(lambda u: open_image(u, MAX_FRAME_PIXELS), uris))
        reference = None
        if task.reference_image:
            if task.reference_image not in refs:
                try:
                    refs[task.reference_image] = open_image(task.reference_image, MAX_FRAME_PIXELS)
                except ImageLoadError as e:
                    refs[task.reference_image] = e
            reference = refs[task.reference_image]
            if isinstance(reference, ImageLoadError):
                notes.append(f"vlm_judge: reference image left out ({str(reference)[:300]})")
                reference = None
        return frames, reference, notes

    def judge_batch(
        self, items: Sequence[tuple[Task, Plan | None, Rollout]]
    ) -> list[tuple[Scores | None, str, list[str]]]:
        """One ``(scores or None, caption, notes)`` per item; never raises. ``None`` scores
        mean the judge could not look (no engine, no frames, frames that cannot be read);
        malformed output gives zeros."""
        out: list[tuple[Scores | None, str, list[str]]] = [(None, "", []) for _ in items]
        if self.engine is None:
            return [(None, "", ["vlm_judge: no engine"]) for _ in items]
        todo = []
        read_notes: dict[int, list[str]] = {}
        refs: dict[str, Any] = {}
        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            for k, (task, plan, r) in enumerate(items):
                if not r.frame_uris:
                    out[k] = (None, "", ["vlm_judge: the rollout has no frames to judge"])
                    continue
                try:
                    frames, reference, read_notes[k] = self._read(pool, task, r, refs)
                except ImageLoadError as e:
                    out[k] = (None, "", [f"vlm_judge: could not read the frames ({str(e)[:300]})"])
                    continue
                todo.append((k, judge_messages(task, plan, frames, reference)))
        if not todo:
            return out
        params = SamplingParams(temperature=0.0, max_tokens=self.cfg.max_tokens, n=1, seed=0, logprobs=False)
        try:
            gens = self.engine.generate([m for _, m in todo], params, json_schema=Verdict.decoding_schema(self.cfg.caption_max_chars))
        except Exception as e:
            for k, _ in todo:
                out[k] = (Scores.zeros(), "", read_notes.get(k, []) + [
                    f"vlm_judge: engine failed ({type(e).__name__}: {str(e)[:200]}); scores 0"])
            return out
        for (k, _), g in zip(todo, list(gens) + [[]] * (len(todo) - len(gens))):
            try:
                if not g:
                    raise JudgeParseError("no completion returned")
                if g[0].finish_reason == "error":
                    raise JudgeParseError("engine could not produce valid JSON")
                scores, cap = parse_judgement(g[0].text, self.cfg.caption_max_chars)
                cap, notes = ground_caption(cap, "", self.cfg.caption_max_chars, source="vlm_judge") if cap else ("", [])
                out[k] = (scores, cap, read_notes.get(k, []) + notes)
            except JudgeParseError as e:
                out[k] = (Scores.zeros(), "", read_notes.get(k, []) + [f"vlm_judge: malformed output ({e}); scores 0"])
        return out
