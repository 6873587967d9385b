"""Phase 2 of seed 000 in one process: on-policy GRPO (+ lambda * DPO) of the Action policy with
the Critic frozen (pure: no Ray).

Each round samples one *train-split* task (phase 2 with probability ``phase2_frac``, else
phase 1), draws G plans with the Action agent, renders them in the world, scores them with the
(frozen) Critic, optionally writes the episodes to memory, and turns them into a
:class:`~worldagent_ray.schemas.ScoredGroup`. Every ``groups_per_step`` groups whose rewards
are not all equal, :meth:`LearnerCore.step` takes one optimizer step (GRPO, plus the DPO term
when ``learner.dpo_coef > 0``) and the new weights go into the engine (``load_weights``).
Held-out tasks are never drawn. The asynchronous, multi-node form of the same loop is
``jobs/evolve.py --learn`` (buffer actor + Ray Train learner); this one is for the training
pipeline and the learning benchmark on one machine.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..agents.action import ActionAgent
from ..config import ActionConfig
from ..schemas import ActionRequest, Episode, ScoredGroup
from .groups import scored_group

__all__ = ["Phase2Stats", "Phase2Trainer", "save_policy_model"]


@dataclass
class Phase2Stats:
    rounds: int = 0
    samples: int = 0
    valid: int = 0
    success: int = 0
    steps: int = 0
    constant_groups: int = 0
    groups_without_tokens: int = 0
    dpo_pairs: int = 0
    reward_sum: float = 0.0
    gen_s: float = 0.0
    learn_s: float = 0.0
    sync_s: float = 0.0
    trained_s: float = 0.0
    last: dict[str, float] = field(default_factory=dict)


class Phase2Trainer:
    """On-policy GRPO(+DPO) rounds on train tasks.

    Args:
        core: a :class:`~worldagent_ray.rl.learner.LearnerCore` (its model is the policy).
        engine: the inference engine that samples plans (``load_weights`` gets every update).
        world / critic: render and score plans (the critic is not trained here: frozen).
        generator: a :class:`~worldagent_ray.world.sandbox.SandboxTaskGenerator`.
        action_cfg: the Action agent's config (``group_size`` plans per task, temperature).
        vocabulary: the world's admissible actions for a task (constrained decoding).
        memory: an :class:`~worldagent_ray.memory.EpisodeMemory` to write episodes to, or None.
        use_memory: put retrieved (train-split) episodes into the prompts.
        phase2_frac: probability that a round draws a phase-2 task (else phase 1).
        groups_per_step: non-constant groups per optimizer step.
        engine_dtype: dtype the weights are sent to the engine in.
        seed: seeds task sampling and generation.
        say: progress printer.
        learn: False makes rounds without optimizer steps (``core`` may then be None).
    """

    def __init__(self, core: Any, engine: Any, world: Any, critic: Any, generator: Any, action_cfg: ActionConfig,
                 vocabulary: Callable[[Any], list[str]], *, memory: Any = None, use_memory: bool = False,
                 phase2_frac: float = 0.75, groups_per_step: int = 1, engine_dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0, run_id: str = "phase2", out_dir: str = "/tmp", say: Callable[[str], None] = print,
                 learn: bool = True):
        self.core, self.engine, self.world, self.critic, self.gen = core, engine, world, critic, generator
        self.agent = ActionAgent(action_cfg, engine)
        self.vocabulary, self.memory, self.use_memory = vocabulary, memory, use_memory
        self.phase2_frac, self.groups_per_step, self.engine_dtype = phase2_frac, groups_per_step, engine_dtype
        self.rng = random.Random(seed)
        self.run_id, self.out_dir, self.say = run_id, out_dir, say
        self.version = 0
        self.stats = Phase2Stats()
        self._pending: list[ScoredGroup] = []
        self.memory_top_k = action_cfg.memory_top_k
        self.learn = learn  # False: rollouts (and memory writes) only, e.g. to fill memory with the base policy

    def push_weights(self) -> None:
        t0 = time.perf_counter()
        self.version += 1
        state = self.core.export_weights()
        self.engine.load_weights({k: v.to(self.engine_dtype) for k, v in state.items()}, self.version)
        self.stats.sync_s += time.perf_counter() - t0

    def _request(self, task: Any, seed: int) -> ActionRequest:
        hits = self.memory.retrieve(task.goal, k=self.memory_top_k, split="train") if (
            self.use_memory and self.memory is not None) else []
        return ActionRequest(task=task, memory=hits, vocabulary=self.vocabulary(task), seed=seed)

    def round(self) -> str:
        """One task: G plans, rollouts, verdicts, maybe an optimizer step. Returns a progress line."""
        st = self.stats
        phase = 2 if self.rng.random() < self.phase2_frac else 1
        task = self.gen.sample(phase, "train", rng=self.rng)
        if task.split != "train":
            raise AssertionError(f"phase 2 drew a {task.split} task {task.id}")
        tg = time.perf_counter()
        samples = self.agent.act([self._request(task, self.rng.randrange(1 << 30))])[0]
        st.gen_s += time.perf_counter() - tg
        plans = [s.plan for s in samples]
        rollouts = self.world.render(task, plans, str(Path(self.out_dir) / "phase2"), seeds=list(range(len(plans))))
        verdicts = self.critic.score_batch(list(zip([task] * len(plans), plans, rollouts)))
        rid = f"{self.run_id}.r{st.rounds}"
        eps = [Episode.new(rid, task, i, group_id=f"{rid}:{task.id}",
                           status="failed" if (s.plan is None or r.error) else "ok",
                           failure_reason=(s.error or r.error) if (s.plan is None or r.error) else None,
                           plan=s.plan, raw_output=s.completion.text, rollout=r, verdict=v,
                           policy_version=self.version, prompt=s.prompt, created_at=time.time())
               for i, (s, r, v) in enumerate(zip(samples, rollouts, verdicts))]
        if self.memory is not None:
            self.memory.upsert(eps)
        st.rounds += 1
        st.samples += len(samples)
        st.valid += sum(s.plan is not None for s in samples)
        st.success += sum(v.success for v in verdicts)
        st.reward_sum += sum(v.reward for v in verdicts)
        rewards = [v.reward for v in verdicts]
        group = scored_group(task, f"{rid}:{task.id}", samples, rewards, self.version, [e.id for e in eps])
        line = (f"round {st.rounds:3d} p{phase} {task.goal[:40]:40s} rewards {min(rewards):.2f}..{max(rewards):.2f} "
                f"success {sum(v.success for v in verdicts)}/{len(verdicts)}")
        if not self.learn:
            pass
        elif group is None:
            st.groups_without_tokens += 1
        elif max(rewards) - min(rewards) < 1e-9:
            st.constant_groups += 1  # zero advantage everywhere and no DPO pair: no gradient
        else:
            self._pending.append(group)
        if len(self._pending) >= self.groups_per_step:
            tl = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.engine_dtype == torch.bfloat16):
                m = self.core.step(self._pending)
            st.learn_s += time.perf_counter() - tl
            self._pending = []
            st.steps += 1
            st.dpo_pairs += int(m.get("dpo_pairs", 0))
            st.last = m
            self.push_weights()
            line += f" | step {st.steps} loss {m['loss']:+.4f} |g| {m['grad_norm']:.2f} -> v{self.version}"
        return line

    def run(self, *, minutes: float | None = None, max_steps: int | None = None, max_rounds: int | None = None,
            on_minute: Callable[[float], None] | None = None) -> Phase2Stats:
        """Rounds until ``minutes`` of training time (time spent in ``on_minute``, e.g.
        evaluations, excluded), ``max_steps`` optimizer steps or ``max_rounds`` rounds (counted
        over the trainer's life), whichever comes first."""
        if minutes is None and max_steps is None and max_rounds is None:
            raise ValueError("give minutes, max_steps or max_rounds")
        budget = 60.0 * minutes if minutes is not None else float("inf")
        st = self.stats
        while (st.trained_s < budget and (max_steps is None or st.steps < max_steps)
               and (max_rounds is None or st.rounds < max_rounds)):
            t0 = time.perf_counter()
            line = self.round()
            st.trained_s += time.perf_counter() - t0
            self.say(f"  {line}  [{st.trained_s / 60:.1f} min]")
            if on_minute is not None:
                on_minute(st.trained_s / 60.0)
        return st


def save_policy_model(core: Any, base_model_path: str, out_dir: str) -> str:
    """Write the learner's policy as a complete Hugging Face folder (LoRA merged; the base
    model's tokenizer, chat template and generation config copied) that the ``policy`` engine
    loads. Written to ``<out_dir>.tmp`` and renamed, so ``out_dir`` is never half-written."""
    from transformers import AutoConfig, AutoTokenizer

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    module = core.module
    if core.cfg.lora:
        import copy

        module = copy.deepcopy(module).merge_and_unload()
    dtype = getattr(AutoConfig.from_pretrained(base_model_path), "dtype", None)
    dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype or "float32"), torch.float32)
    state = {k: v.detach().to(dtype) for k, v in module.state_dict().items()}
    module.config.use_cache = True
    module.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_model_path).save_pretrained(str(tmp))
    gen_cfg = Path(base_model_path) / "generation_config.json"
    if gen_cfg.exists():
        shutil.copy(gen_cfg, tmp / "generation_config.json")
    (tmp / "train_info.json").write_text(json.dumps({"phase": "grpo", "base_model": base_model_path,
                                                     "steps": core.step_count, "lora": core.cfg.lora}))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return str(out)
