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


# --------------------------------------------------------------------------- action training (SFT / DPO data)


def sandbox_episode(task, sample: int, actions, *, success: bool, reward: float, run_id: str = "run-sft",
                    raw_output: str | None = None, group_id: str | None = None):
    """An Episode of a sandbox task with a plan and a verdict (as the driver writes them)."""
    import json

    from worldagent_ray.schemas import Episode, Plan, Scores, Verdict

    scores = Scores(action_following=reward, temporal_consistency=1.0, object_interaction=reward,
                    goal_achievement=1.0 if success else 0.0, physics=1.0)
    plan = Plan.from_actions(list(actions))
    text = raw_output if raw_output is not None else json.dumps(
        {"steps": [{"step": i + 1, "action": a} for i, a in enumerate(actions)]})
    return Episode.new(
        run_id, task, sample, group_id=group_id or f"{run_id}:{task.id}", plan=plan, raw_output=text,
        verdict=Verdict(state_caption="done" if success else "not done", success=success, scores=scores,
                        reward=reward, scorer="verifiable"),
        created_at=1.0 + sample,
    )


# --------------------------------------------------------------------------- memory episodes (work package B)

MEMORY_GOALS = {
    "apple": "put the apple in the bowl",
    "fridge": "open the fridge door",
    "plate": "wash the dirty plate in the sink",
    "eggs": "crack two eggs into a pan",
    "lights": "turn off the kitchen lights",
    "bread": "slice the bread on the cutting board",
}


def make_memory_episode(
    task_key: str,
    sample: int = 0,
    *,
    run_id: str = "run-a",
    success: bool = True,
    reward: float = 0.8,
    phase: int = 1,
    goal: str | None = None,
    notes: tuple[str, ...] = ("ok",),
    created_at: float | None = None,
):
    """An episode of task ``task-<task_key>`` (goal from :data:`MEMORY_GOALS` unless given)."""
    import time

    from worldagent_ray.schemas import Episode, Plan, Scores, Task, Verdict

    task = Task(id=f"task-{task_key}", goal=goal or MEMORY_GOALS[task_key], phase=phase)
    scores = Scores(
        action_following=reward,
        temporal_consistency=0.5,
        object_interaction=0.25,
        goal_achievement=1.0 if success else 0.0,
        physics=0.75,
    )
    return Episode.new(
        run_id,
        task,
        sample,
        plan=Plan.from_actions([f"step one of {task_key}", f"step two of {task_key}"]),
        verdict=Verdict(
            state_caption=f"{task_key} {'done' if success else 'not done'}",
            success=success,
            scores=scores,
            reward=reward,
            scorer="verifiable",
            notes=list(notes),
        ),
        created_at=time.time() if created_at is None else created_at,
    )
