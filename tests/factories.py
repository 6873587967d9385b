"""Test data factories shared by several test folders (plain functions, no fixtures)."""

from __future__ import annotations

import random

from worldagent_ray.schemas import ScoredGroup


def make_groups(seed: int, n_groups: int = 2, group_size: int = 4, version: int = 0) -> list[ScoredGroup]:
    """Deterministic synthetic groups (random ids, rewards and rollout log-probs)."""
    rng = random.Random(seed)
    out = []
    for g in range(n_groups):
        prompt = [rng.randrange(100, 5000) for _ in range(rng.randrange(4, 9))]
        comps = [[rng.randrange(100, 5000) for _ in range(rng.randrange(2, 7))] for _ in range(group_size)]
        out.append(
            ScoredGroup(
                group_id=f"s{seed}-g{g}",
                task_id=f"t{g}",
                policy_version=version,
                prompt_token_ids=prompt,
                completion_token_ids=comps,
                rollout_logprobs=[[-10.8 + rng.uniform(-0.3, 0.3) for _ in c] for c in comps],
                rewards=[rng.random() for _ in comps],
                episode_ids=[f"s{seed}-g{g}-{i}" for i in range(group_size)],
            )
        )
    return out
