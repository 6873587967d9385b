"""SFT and DPO examples for the Action agent, in its exact prompt format (pure: no Ray, no TRL).

Every example's prompt is :func:`worldagent_ray.agents.action.build_messages` of the task with the
world's admissible actions and *no* memory context (the same prompt the held-out evaluation
uses without memory), so what SFT teaches is what the agent is later asked. Completions are the
plan as the agent writes it: ``{"steps": [{"step": 1, "action": "..."}, ...]}`` (``json.dumps``,
the shape shown in the prompt), optionally after one reasoning line (see
:func:`reasoning_line`; off by default because the agent decodes schema-constrained JSON).

Examples are TRL's conversational formats: prompt-completion for ``SFTTrainer``
(``{"prompt": [system, user], "completion": [assistant]}``) and preference pairs for
``DPOTrainer`` (``{"prompt": ..., "chosen": [assistant], "rejected": [assistant]}``), plus
``task_id`` / ``source`` / ``split`` columns for provenance. Sources:

- the task generator: one example per train-split composition (reference plans);
- memory rows: successful train-split episodes (rejection-sampling fine-tuning) and the
  best/worst episodes of each group (DPO pairs). Held-out episodes are refused.
"""

from __future__ import annotations

import json
import random
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..agents.action import build_messages
from ..config import ActionConfig
from ..schemas import ActionRequest, Episode, Task

__all__ = [
    "dpo_pairs_from_rows",
    "generator_sft_examples",
    "memory_sft_examples",
    "plan_completion",
    "reasoning_line",
    "sft_example",
]

Vocabulary = Callable[[Task], list[str]]


def plan_completion(actions: Sequence[str], reasoning: str | None = None) -> str:
    """The assistant text for a plan: the JSON the agent writes (after a reasoning line if given)."""
    if not actions:
        raise ValueError("a plan completion needs at least one action")
    plan = json.dumps({"steps": [{"step": i + 1, "action": a} for i, a in enumerate(actions)]})
    return f"{reasoning}\n{plan}" if reasoning else plan


def reasoning_line(task: Task, actions: Sequence[str]) -> str:
    """One short line that decomposes the goal: what must be opened first, then the actions."""
    opens = [a for a in actions if a.startswith("open the ")]
    rest = [a for a in actions if a not in opens]
    head = f"First {' and '.join(opens)} to reach what is inside; then " if opens else "Steps: "
    return f"Reasoning: {head}{', then '.join(rest) if rest else 'nothing else'}."


def _prompt(cfg: ActionConfig, task: Task, vocabulary: Sequence[str]) -> list[dict[str, Any]]:
    req = ActionRequest(task=task, memory=[], vocabulary=list(vocabulary))
    return build_messages(cfg.model_copy(update={"use_memory": False}), req)


def sft_example(cfg: ActionConfig, task: Task, actions: Sequence[str], vocabulary: Sequence[str],
                source: str, reasoning: bool = False) -> dict[str, Any]:
    """One prompt-completion example in the Action agent's prompt format."""
    if len(actions) > cfg.max_steps:
        raise ValueError(f"task {task.id!r}: plan of {len(actions)} steps exceeds max_steps={cfg.max_steps}")
    text = plan_completion(actions, reasoning_line(task, actions) if reasoning else None)
    return {
        "prompt": _prompt(cfg, task, vocabulary),
        "completion": [{"role": "assistant", "content": text}],
        "task_id": task.id,
        "source": source,
        "split": task.split,
    }


def generator_sft_examples(
    tasks: Iterable[Task], cfg: ActionConfig, vocabulary: Vocabulary, *, reasoning: bool = False,
    reference: Callable[[Task], list[str]],
) -> list[dict[str, Any]]:
    """Examples from generator tasks with their reference plans. Held-out tasks are refused.

    Raises:
        ValueError: a task of the held-out split (it would leak into training).
    """
    out = []
    for t in tasks:
        if t.split != "train":
            raise ValueError(f"task {t.id!r} is in split {t.split!r}: only train tasks may be trained on")
        out.append(sft_example(cfg, t, reference(t), vocabulary(t), "generator", reasoning))
    return out


def _episodes(rows: Iterable[Mapping[str, Any]]) -> Iterable[Episode]:
    for r in rows:
        raw = r.get("episode_json")
        if raw:
            yield Episode.model_validate_json(raw)


def memory_sft_examples(
    rows: Iterable[Mapping[str, Any]], cfg: ActionConfig, vocabulary: Vocabulary, *, min_reward: float,
    reasoning: bool = False,
) -> list[dict[str, Any]]:
    """Rejection-sampling fine-tuning examples: successful train-split episodes with a plan and
    ``reward >= min_reward`` (memory rows need an ``episode_json`` column). One example per
    (task, plan): repeats of the same plan for the same task add nothing."""
    out, seen = [], set()
    for ep in _episodes(rows):
        if ep.task.split != "train" or not ep.success or ep.plan is None or ep.reward < min_reward:
            continue
        actions = ep.plan.actions[: cfg.max_steps]
        key = (ep.task.id, tuple(actions))
        if key in seen:
            continue
        seen.add(key)
        out.append(sft_example(cfg, ep.task, actions, vocabulary(ep.task), "memory", reasoning))
    return out


def _completion_text(ep: Episode) -> str | None:
    if ep.raw_output:
        return ep.raw_output
    return plan_completion(ep.plan.actions) if ep.plan is not None and ep.plan.actions else None


def dpo_pairs_from_rows(
    rows: Iterable[Mapping[str, Any]], cfg: ActionConfig, vocabulary: Vocabulary, *, margin: float,
    max_pairs: int | None = None, seed: int = 0,
) -> list[dict[str, Any]]:
    """Preference pairs from memory: in each group (``group_id``) of train-split episodes, the
    best-rewarded completion is chosen and the worst rejected when the rewards differ by at
    least ``margin``. Completions are the model's raw outputs (what it actually wrote). At most
    ``max_pairs`` pairs, sampled with ``seed`` when there are more."""
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin!r}")
    groups: dict[str, list[Episode]] = {}
    for ep in _episodes(rows):
        if ep.task.split == "train" and _completion_text(ep) is not None:
            groups.setdefault(ep.group_id or f"{ep.run_id}:{ep.task.id}", []).append(ep)
    out = []
    for gid in sorted(groups):
        eps = sorted(groups[gid], key=lambda e: e.sample_index)
        best = max(eps, key=lambda e: e.reward)
        worst = min(eps, key=lambda e: e.reward)
        if best.reward - worst.reward < margin:
            continue
        chosen, rejected = _completion_text(best), _completion_text(worst)
        if chosen == rejected:
            continue
        out.append({
            "prompt": _prompt(cfg, best.task, vocabulary(best.task)),
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "task_id": best.task.id,
            "source": "memory",
            "split": "train",
        })
    if max_pairs is not None and len(out) > max_pairs:
        out = random.Random(seed).sample(out, max_pairs)
    return out
