"""Learner batches: padding scored groups into tensors, sharding rows across data-parallel
ranks, and the vision inputs of image prompts (no Ray).

A step's batch is built identically on every rank from *all* the step's groups (so group
advantages and loss normalisers are those of one process holding the whole batch); each rank
then trains on its own slice of rows (:func:`shard_rows`). See
:meth:`worldagent_ray.rl.learner.LearnerCore.step` for how the per-rank losses add up to the
single-process loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["ImageInputs", "LearnerBatch", "collate_groups", "shard_rows"]


@dataclass
class LearnerBatch:
    """Tensors of one learner step. ``B`` completions, prompts left-padded to ``P``,
    completions right-padded to ``T``; sequences are ``[pad.., prompt, completion, pad..]``.

    Attributes:
        input_ids (`Tensor`): ``[B, P + T]`` token ids (padding is ``pad_token_id``).
        attention_mask (`Tensor`): ``[B, P + T]``, 1 on real tokens.
        position_ids (`Tensor`): ``[B, P + T]``, 0 at each prompt's first real token.
        completion_mask (`Tensor`): ``[B, T]``, 1 on completion tokens.
        rollout_logps (`Tensor`): ``[B, T]``, the sampling engine's log-probs (NaN where it
            reported none, 0 on padding).
        rewards (`Tensor`): ``[B]``.
        group_index (`Tensor`): ``[B]``, index of each completion's group in the step.
        staleness (`list[int]`): per group, learner version minus the group's policy version.
        group_ids (`list[str]`): per row, the id of its group (for error messages).
        images (`list[str | None]`): per row, its group's reference image (path or URI), if any.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    completion_mask: Tensor
    rollout_logps: Tensor
    rewards: Tensor
    group_index: Tensor
    staleness: list[int]
    group_ids: list[str] = field(default_factory=list)
    images: list[str | None] = field(default_factory=list)

    @property
    def completion_len(self) -> int:
        return int(self.completion_mask.shape[1])

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, index: Sequence[int]) -> "LearnerBatch":
        """The sub-batch of rows ``index`` (same padding widths; ``staleness`` stays per group)."""
        idx = torch.as_tensor(list(index), dtype=torch.long)
        return replace(
            self,
            input_ids=self.input_ids[idx],
            attention_mask=self.attention_mask[idx],
            position_ids=self.position_ids[idx],
            completion_mask=self.completion_mask[idx],
            rollout_logps=self.rollout_logps[idx],
            rewards=self.rewards[idx],
            group_index=self.group_index[idx],
            group_ids=[self.group_ids[i] for i in idx.tolist()] if self.group_ids else [],
            images=[self.images[i] for i in idx.tolist()] if self.images else [],
        )


def collate_groups(groups: Sequence[Any], policy_version: int, pad_token_id: int = 0) -> LearnerBatch:
    """Pad a list of :class:`~worldagent_ray.schemas.ScoredGroup` into one :class:`LearnerBatch`.

    Args:
        groups: scored groups; each has ``prompt_token_ids`` (one prompt, or one per sample),
            ``completion_token_ids`` (one list per sample), ``rollout_logprobs`` (one list per
            sample, or empty lists), ``rewards`` (one per sample), ``policy_version`` and
            optionally ``reference_image``.
        policy_version (`int`): the learner's current version (for staleness).
        pad_token_id (`int`): id written on padding positions (masked out everywhere).

    Raises:
        ValueError: empty input, or a group whose lists disagree in length (names the group).
    """
    if not groups:
        raise ValueError("groups is empty: a learner step needs at least one scored group")
    prompts: list[list[int]] = []
    completions: list[list[int]] = []
    roll: list[list[float]] = []
    rewards: list[float] = []
    gidx: list[int] = []
    gids: list[str] = []
    images: list[str | None] = []
    staleness: list[int] = []
    for g_i, g in enumerate(groups):
        gid = getattr(g, "group_id", g_i)
        n = len(g.completion_token_ids)
        if n == 0:
            raise ValueError(f"group {gid!r} has no completions")
        if len(g.rewards) != n:
            raise ValueError(f"group {gid!r}: {len(g.rewards)} rewards for {n} completions")
        lps = list(g.rollout_logprobs) if g.rollout_logprobs else [[] for _ in range(n)]
        if len(lps) != n:
            raise ValueError(f"group {gid!r}: {len(lps)} rollout_logprobs lists for {n} completions")
        if not g.prompt_token_ids:
            raise ValueError(f"group {gid!r} has an empty prompt_token_ids")
        per_sample = isinstance(g.prompt_token_ids[0], (list, tuple))
        sample_prompts = [list(p) for p in g.prompt_token_ids] if per_sample else [list(g.prompt_token_ids)] * n
        if len(sample_prompts) != n or any(not p for p in sample_prompts):
            raise ValueError(f"group {gid!r}: need one non-empty prompt, or one per completion ({n})")
        staleness.append(int(policy_version) - int(g.policy_version))
        image = getattr(g, "reference_image", None)
        for j in range(n):
            comp = list(g.completion_token_ids[j])
            if not comp:
                raise ValueError(f"group {gid!r}: completion {j} is empty")
            lp = list(lps[j])
            if lp and len(lp) != len(comp):
                raise ValueError(
                    f"group {gid!r}: completion {j} has {len(comp)} tokens but {len(lp)} rollout logprobs"
                )
            prompts.append(sample_prompts[j])
            completions.append(comp)
            roll.append(lp if lp else [math.nan] * len(comp))
            rewards.append(float(g.rewards[j]))
            gidx.append(g_i)
            gids.append(str(gid))
            images.append(image)
    B = len(prompts)
    P = max(len(p) for p in prompts)
    T = max(len(c) for c in completions)
    input_ids = torch.full((B, P + T), pad_token_id, dtype=torch.long)
    attention = torch.zeros((B, P + T), dtype=torch.long)
    cmask = torch.zeros((B, T), dtype=torch.float32)
    rlp = torch.zeros((B, T), dtype=torch.float32)
    for i, (p, c, lp) in enumerate(zip(prompts, completions, roll)):
        input_ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        input_ids[i, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
        attention[i, P - len(p) : P + len(c)] = 1
        cmask[i, : len(c)] = 1.0
        rlp[i, : len(c)] = torch.tensor(lp, dtype=torch.float32)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return LearnerBatch(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=position_ids,
        completion_mask=cmask,
        rollout_logps=rlp,
        rewards=torch.tensor(rewards, dtype=torch.float32),
        group_index=torch.tensor(gidx, dtype=torch.long),
        staleness=staleness,
        group_ids=gids,
        images=images,
    )


def shard_rows(num_rows: int, rank: int, world_size: int) -> list[int]:
    """The rows rank ``rank`` of ``world_size`` trains on: contiguous chunks whose sizes differ
    by at most one (the first ``num_rows % world_size`` ranks get one more). Empty when there
    are fewer rows than ranks and ``rank`` comes last."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    base, extra = divmod(num_rows, world_size)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (1 if rank < extra else 0)))


# --------------------------------------------------------------------------- vision


class ImageInputs:
    """Re-creates a vision-language policy's image inputs for the log-prob recomputation.

    The engine expanded each image placeholder of the prompt into one image token per merged
    patch; the learner re-runs the model's image processor on the group's reference image and
    checks that it yields exactly that many tokens (a mismatch means the engine processed the
    image differently, so the recomputed log-probs would be wrong: it is an error, never
    silently ignored).

    Args:
        image_processor: the model's image processor (Qwen-VL: ``pixel_values`` and
            ``image_grid_thw`` out, ``merge_size`` attribute).
        image_token_id (`int`): the placeholder token id (``config.image_token_id``).
        open_image (`Callable[[str], PIL.Image.Image]`): reads a reference image (path or URI).
    """

    def __init__(self, image_processor: Any, image_token_id: int, open_image: Callable[[str], Any]):
        self.processor = image_processor
        self.image_token_id = int(image_token_id)
        self.open_image = open_image
        self.merge = int(getattr(image_processor, "merge_size", 1) or 1)

    def _features(self, uri: str, cache: dict[str, Mapping[str, Tensor]]) -> Mapping[str, Tensor]:
        if uri not in cache:
            feats = self.processor(images=[self.open_image(uri)], return_tensors="pt")
            cache[uri] = {"pixel_values": feats["pixel_values"], "image_grid_thw": feats["image_grid_thw"]}
        return cache[uri]

    def __call__(self, batch: LearnerBatch) -> dict[str, Tensor] | None:
        """Model keyword arguments for ``batch`` (``pixel_values``, ``image_grid_thw``,
        ``mm_token_type_ids``), or ``None`` when no row's prompt holds image tokens.

        Raises:
            ValueError: a row has image tokens but its group no ``reference_image``, more than
                one image, or a token count that the processed image does not match (names the group).
        """
        is_image = batch.input_ids == self.image_token_id
        if not bool(is_image.any()):
            return None
        cache: dict[str, Mapping[str, Tensor]] = {}
        pixels: list[Tensor] = []
        grids: list[Tensor] = []
        for r in range(batch.num_rows):
            n_tokens = int(is_image[r].sum())
            if n_tokens == 0:
                continue
            gid = batch.group_ids[r] if batch.group_ids else r
            runs = int((is_image[r, 1:] & ~is_image[r, :-1]).sum()) + int(is_image[r, 0])
            if runs != 1:
                raise ValueError(f"group {gid!r}: the prompt holds {runs} images; the learner supports one per prompt")
            uri = batch.images[r] if batch.images else None
            if not uri:
                raise ValueError(
                    f"group {gid!r}: the prompt holds {n_tokens} image tokens but the group has no "
                    "reference_image to recompute them from"
                )
            feats = self._features(uri, cache)
            expected = int(feats["image_grid_thw"].prod(-1).sum()) // (self.merge * self.merge)
            if expected != n_tokens:
                raise ValueError(
                    f"group {gid!r}: the prompt holds {n_tokens} image tokens but {uri!r} processes to "
                    f"{expected}; the engine and the learner must use the same image processor settings"
                )
            pixels.append(feats["pixel_values"])
            grids.append(feats["image_grid_thw"])
        return {
            "pixel_values": torch.cat(pixels, 0),
            "image_grid_thw": torch.cat(grids, 0),
            "mm_token_type_ids": is_image.to(torch.int32),
        }
