"""GRPO groups from one task's samples and verdicts (pure; the driver builds them, the buffer
keeps them, the learner trains on them)."""

from __future__ import annotations

from typing import Sequence

from ..schemas import PlanSample, ScoredGroup, Task


def scored_group(task: Task, group_id: str, samples: Sequence[PlanSample], rewards: Sequence[float],
                 policy_version: int, episode_ids: Sequence[str]) -> ScoredGroup | None:
    """A GRPO group from one task's samples, or None when a sample carries no tokens or no
    log-probs (an engine error): such a group cannot be scored token by token. The task's
    reference image travels with the group (a vision-language learner re-creates the image
    inputs of the prompt from it)."""
    if len(samples) != len(rewards) or len(samples) != len(episode_ids):
        raise ValueError(
            f"group {group_id!r}: {len(samples)} samples, {len(rewards)} rewards, {len(episode_ids)} episode ids"
        )
    if any(not s.completion.token_ids or len(s.completion.logprobs) != len(s.completion.token_ids)
           for s in samples):
        return None
    return ScoredGroup(
        group_id=group_id, task_id=task.id, policy_version=policy_version,
        prompt_token_ids=[list(s.completion.prompt_token_ids) for s in samples],
        completion_token_ids=[list(s.completion.token_ids) for s in samples],
        rollout_logprobs=[list(s.completion.logprobs) for s in samples],
        rewards=[float(r) for r in rewards],
        episode_ids=list(episode_ids),
        reference_image=task.reference_image,
    )
