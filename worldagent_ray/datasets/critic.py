"""Critic training data from the world's ground truth (pure core: no Ray).

The sandbox knows, for every episode, which steps ran and whether the goal holds. This module
turns episodes into labelled rows, then into the two training sets of seed 000's Critic:

* **episodes of varied quality** (:func:`variant_plans`): the task's reference plan, a
  reference plan with one extra admissible step, and corrupted ones (shuffled, truncated,
  one step dropped, one step replaced by another admissible action, random admissible
  actions); plus episodes from memory (:func:`record_from_episode`);
* **records** (:func:`episode_record`): one row per episode with the judge's observation
  (the world's scene description and step outcomes for a text judge on CPU; the sampled
  frame URIs for a VLM), and the ground-truth target: a grounded caption, the five
  verifiable scores, success and the reward;
* **SFT examples** (:func:`sft_example`): a conversational prompt (the judge's exact verdict
  prompt, :func:`~worldagent_ray.critic.text_judge.verdict_messages`) and the target verdict
  JSON as the assistant's completion, the format of TRL's ``SFTTrainer``;
* **preference pairs** (:func:`preference_pairs`): two episodes of the same task, the better
  one by ground-truth reward as ``chosen`` (implicit-prompt conversational format of TRL's
  ``RewardTrainer``); plus **anchor pairs** (:func:`anchor_pairs`): a successful episode
  against a failed one of another task, so that the reward's level means success across tasks.

Every row is a flat dict of JSON-friendly values (nested values as JSON strings) so that Ray
Data moves it unchanged. The held-out split is the task's own ``Task.split`` (the sandbox
generator's split by task composition); rows of held-out tasks are never training rows.
"""

from __future__ import annotations

import itertools
import json
import random
from typing import Any, Iterable, Mapping, Sequence

from ..critic.combine import reward_of
from ..critic.text_judge import observation_text, scene_text, verdict_messages
from ..critic.verifiable import VerifiableScorer
from ..critic.vlm_judge import judge_messages
from ..schemas import SCORE_DIMENSIONS, Episode, GroundTruth, Plan, Rollout, Task

PLAN_KINDS: tuple[str, ...] = ("reference", "padded", "shuffled", "truncated", "dropped", "corrupted", "random")
"""Plan variants per task: two that usually succeed, five that usually fail."""

DEFAULT_WEIGHTS: dict[str, float] = {
    "action_following": 0.15, "temporal_consistency": 0.15, "object_interaction": 0.1,
    "goal_achievement": 0.5, "physics": 0.1,
}


def variant_plans(task: Task, reference: Plan, vocabulary: Sequence[str], rng: random.Random,
                  kinds: Sequence[str] = PLAN_KINDS) -> list[tuple[str, Plan]]:
    """Plans of varied quality for ``task``: ``(kind, plan)`` for each kind that applies
    (``shuffled``, ``truncated`` and ``dropped`` need two or more reference steps; the
    admissible-action kinds need a vocabulary). Deterministic for a seeded ``rng``."""
    bad = sorted(set(kinds) - set(PLAN_KINDS))
    if bad:
        raise ValueError(f"unknown plan kinds {bad}; known: {list(PLAN_KINDS)}")
    ref = list(reference.actions)
    vocab = sorted(set(vocabulary))
    out: list[tuple[str, list[str]]] = []
    for kind in kinds:
        steps: list[str] | None = None
        if kind == "reference" and ref:
            steps = list(ref)
        elif kind == "padded" and ref and vocab:
            steps = list(ref)
            steps.insert(rng.randrange(len(steps) + 1), rng.choice(vocab))
        elif kind == "shuffled" and len(ref) >= 2:
            steps = list(ref)
            while steps == ref:
                rng.shuffle(steps)
        elif kind == "truncated" and len(ref) >= 2:
            steps = ref[: rng.randrange(1, len(ref))]
        elif kind == "dropped" and len(ref) >= 2:
            k = rng.randrange(len(ref))
            steps = ref[:k] + ref[k + 1:]
        elif kind == "corrupted" and ref and len(vocab) >= 2:
            steps = list(ref)
            k = rng.randrange(len(steps))
            steps[k] = rng.choice([a for a in vocab if a != steps[k]])
        elif kind == "random" and vocab:
            steps = [rng.choice(vocab) for _ in range(rng.randint(1, max(1, min(8, len(ref) + 2))))]
        if steps:
            out.append((kind, steps))
    return [(k, Plan.from_actions(s)) for k, s in out]


def target_caption(gt: GroundTruth) -> str:
    """The grounded caption a judge should write: the final scene, then whether the goal holds."""
    done = "The goal is reached." if gt.goal_achieved else "The goal is not reached."
    return f"{scene_text(gt)} {done}".strip()


def target_verdict(gt: GroundTruth, weights: Mapping[str, float] = DEFAULT_WEIGHTS) -> dict[str, Any]:
    """The ground-truth verdict of one episode: caption, success, the five scores, reward."""
    scores, _ = VerifiableScorer().score(gt)
    return {
        "state_caption": target_caption(gt),
        "success": bool(gt.goal_achieved),
        "scores": {k: round(v, 2) for k, v in scores.as_dict().items()},
        "reward": reward_of(scores, weights),
    }


def episode_record(task: Task, plan: Plan, rollout: Rollout, kind: str,
                   weights: Mapping[str, float] = DEFAULT_WEIGHTS) -> dict[str, Any] | None:
    """One labelled row, or None when the world recorded no ground truth (or an error)."""
    gt = rollout.ground_truth
    if gt is None or rollout.error:
        return None
    target = target_verdict(gt, weights)
    return {
        "task_id": task.id,
        "split": task.split,
        "phase": task.phase,
        "family": (task.world_spec or {}).get("family") or "",
        "goal": task.goal,
        "kind": kind,
        "task_json": task.model_dump_json(),
        "plan": list(plan.actions),
        "observation": observation_text(gt),
        "frame_uris": list(rollout.frame_uris),
        "final_state_json": json.dumps(gt.final_state, sort_keys=True),
        "state_description": gt.state_description,
        "caption": target["state_caption"],
        "success": target["success"],
        "scores_json": json.dumps(target["scores"]),
        "reward": float(target["reward"]),
    }


def record_from_episode(ep: Episode, weights: Mapping[str, float] = DEFAULT_WEIGHTS) -> dict[str, Any] | None:
    """A row from an episode in memory (None unless it has a plan and a ground truth)."""
    if ep.plan is None or ep.rollout is None or not ep.plan.steps:
        return None
    return episode_record(ep.task, ep.plan, ep.rollout, "memory", weights)


def _task(row: Mapping[str, Any]) -> Task:
    return Task.model_validate_json(row["task_json"])


def prompt_messages(row: Mapping[str, Any], modality: str = "text", num_frames: int = 4) -> list[dict[str, Any]]:
    """The judge's prompt for a row: the verdict prompt with the observation text, or (VLM) the
    frames-judge prompt with up to ``num_frames`` of the row's frames."""
    plan = Plan.from_actions(list(row["plan"])) if row["plan"] else None
    if modality == "text":
        return verdict_messages(_task(row), plan, row["observation"])
    if modality == "vlm":
        frames = list(row["frame_uris"])
        if not frames:
            raise ValueError(f"row of task {row['task_id']!r} has no frames for a VLM judge")
        step = max(1, len(frames) // max(1, num_frames))
        return judge_messages(_task(row), plan, frames[::step][:num_frames])
    raise ValueError(f"modality must be 'text' or 'vlm', got {modality!r}")


def verdict_json(row: Mapping[str, Any]) -> str:
    """The assistant's target answer, in the key order of ``Verdict.decoding_schema``."""
    return json.dumps({"state_caption": row["caption"], "success": bool(row["success"]),
                       "scores": json.loads(row["scores_json"])})


def sft_example(row: Mapping[str, Any], modality: str = "text", num_frames: int = 4) -> dict[str, Any]:
    """A conversational prompt-completion example (messages as JSON strings for Ray Data)."""
    return {
        "prompt_json": json.dumps(prompt_messages(row, modality, num_frames)),
        "completion_json": json.dumps([{"role": "assistant", "content": verdict_json(row)}]),
        "task_id": row["task_id"],
        "split": row["split"],
    }


def rm_conversation(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The conversation the reward model scores for a row (the same as the critic's scorer)."""
    plan = Plan.from_actions(list(row["plan"])) if row["plan"] else None
    return verdict_messages(_task(row), plan, row["observation"])


def _pair_row(good: Mapping[str, Any], bad: Mapping[str, Any], task_id: str, kind: str) -> dict[str, Any]:
    """One preference pair in the reward model's format (``chosen`` = ``good``)."""
    return {
        "chosen_json": json.dumps(rm_conversation(good)),
        "rejected_json": json.dumps(rm_conversation(bad)),
        "reward_gap": float(good["reward"] - bad["reward"]),
        "task_id": task_id,
        "split": good["split"],
        "kind": kind,
    }


def preference_pairs(rows: Iterable[Mapping[str, Any]], margin: float = 0.05, max_pairs_per_task: int = 16,
                     seed: int = 0) -> list[dict[str, Any]]:
    """Pairs of episodes of one task whose ground-truth rewards differ by at least ``margin``;
    the better one is ``chosen`` (``kind="task"``). At most ``max_pairs_per_task`` per task (a seeded sample)."""
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_task.setdefault(r["task_id"], []).append(r)
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for task_id in sorted(by_task):
        group = by_task[task_id]
        cands = [(a, b) if a["reward"] >= b["reward"] else (b, a)
                 for a, b in itertools.combinations(group, 2) if abs(a["reward"] - b["reward"]) >= margin]
        if len(cands) > max_pairs_per_task:
            cands = rng.sample(cands, max_pairs_per_task)
        out += [_pair_row(good, bad, task_id, "task") for good, bad in cands]
    return out


def anchor_pairs(rows: Iterable[Mapping[str, Any]], per_task: int = 4, margin: float = 0.05,
                 seed: int = 0) -> list[dict[str, Any]]:
    """Pairs across tasks that tie the reward's level to success: a successful episode of one
    task (``chosen``) against a failed episode of another task among ``rows`` (``rejected``),
    the chosen one's ground-truth reward at least ``margin`` higher; up to ``per_task`` per
    task that has a success (seeded random draws, distinct pairs). ``task_id`` is the chosen
    episode's task; ``kind="anchor"``.

    Pairs of one task (:func:`preference_pairs`) only rank that task's episodes, so a reward
    model may give each task its own offset: it ranks well within a task and one threshold
    then separates successes from failures badly across tasks. These pairs rule the offsets
    out. Give rows of one split (pairs never mix splits: a mixed input raises)."""
    rows = list(rows)
    if len({r["split"] for r in rows}) > 1:
        raise ValueError(f"anchor_pairs: rows of one split only, got {sorted({r['split'] for r in rows})}")
    if per_task <= 0:
        return []
    rng = random.Random(seed)

    def order(r: Mapping[str, Any]) -> tuple:  # the input order must not matter (Ray Data's is not fixed)
        return r["task_id"], r["kind"], r["reward"], list(r["plan"])

    failed = sorted((r for r in rows if not r["success"]), key=order)
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for r in sorted((r for r in rows if r["success"]), key=order):
        by_task.setdefault(r["task_id"], []).append(r)
    out: list[dict[str, Any]] = []
    for task_id in sorted(by_task):
        goods, picked = by_task[task_id], {}
        for _ in range(20 * per_task if failed else 0):  # random draws: linear in the rows, not quadratic
            gi, bi = rng.randrange(len(goods)), rng.randrange(len(failed))
            good, bad = goods[gi], failed[bi]
            if bad["task_id"] != task_id and good["reward"] - bad["reward"] >= margin:
                picked.setdefault((gi, bi), (good, bad))
                if len(picked) == per_task:
                    break
        out += [_pair_row(good, bad, task_id, "anchor") for good, bad in picked.values()]
    return out


def split_rows(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Rows by split (``train`` / ``heldout``)."""
    out: dict[str, list[Mapping[str, Any]]] = {"train": [], "heldout": []}
    for r in rows:
        out.setdefault(r["split"], []).append(r)
    return out


def rollouts_for_task(task: Task, world: Any, out_dir: str, seed: int, kinds: Sequence[str] = PLAN_KINDS,
                      weights: Mapping[str, float] = DEFAULT_WEIGHTS) -> list[dict[str, Any]]:
    """Render every plan variant of ``task`` in ``world`` (a sandbox ``WorldModel``) and
    return their records. The reference comes from the task's ``world_spec``."""
    from ..world.sandbox.tasks import reference_plan

    rng = random.Random(f"{seed}:{task.id}")
    plans = variant_plans(task, reference_plan(task), world.admissible_actions(task) or [], rng, kinds)
    rollouts = world.render(task, [p for _, p in plans], out_dir, seeds=[seed + i for i in range(len(plans))])
    recs = [episode_record(task, p, r, kind, weights) for (kind, p), r in zip(plans, rollouts)]
    return [r for r in recs if r is not None]


def score_dims(row: Mapping[str, Any]) -> dict[str, float]:
    """The five ground-truth scores of a row."""
    d = json.loads(row["scores_json"])
    return {k: float(d[k]) for k in SCORE_DIMENSIONS}
