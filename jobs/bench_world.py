"""World-model and critic throughput, measured side by side in one run.

Measured, in this order, on the same machine:

- **sandbox**: render ``--tasks`` generator tasks (phases 1-3) with their reference plans,
  ``--group`` copies each (one ``render`` call per task, as the world deployment receives
  them): episodes/s and video frames/s, artefact writing (mp4, GIF, PNG frames) included;
- **tiny Wan**: the real diffusers Wan path on the builtin ``tiny-wan-t2v`` pipeline
  (random weights, so only latency means anything): seconds per video, one video per call
  and ``--group`` videos batched into one call;
- **critic**: the default verifiable scorer on the sandbox rollouts above: ms per verdict.

Not a test: the numbers depend on the machine. Run it directly or with ``ray job submit``::

    python jobs/bench_world.py [--tasks 24] [--group 4] [--videos 6]

Last line: ``RESULT sandbox_eps=… sandbox_fps=… tinywan_s=… tinywan_batched_s=… critic_ms=…``
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
import time

from worldagent_ray.env import apply_env_defaults

apply_env_defaults(offline=True)


def bench_sandbox(tasks: int, group: int, out_dir: str):
    """Returns (episodes/s, frames/s, [(task, plan, rollout)])."""
    from worldagent_ray.config import SandboxConfig
    from worldagent_ray.world.sandbox import SandboxTaskGenerator, SandboxWorld, reference_plan

    world = SandboxWorld(SandboxConfig())
    gen = SandboxTaskGenerator(seed=0)
    batch = [gen.sample(phase=1 + i % 3, index=i) for i in range(tasks)]
    world.render(batch[0], [reference_plan(batch[0])], os.path.join(out_dir, "warmup"))
    triples, frames = [], 0
    t0 = time.perf_counter()
    for task in batch:
        plan = reference_plan(task)
        rollouts = world.render(task, [plan] * group, os.path.join(out_dir, "sandbox"), seeds=list(range(group)))
        for r in rollouts:
            if r.error:
                raise RuntimeError(f"sandbox failed on its own reference plan for {task.id}: {r.error}")
            frames += r.num_frames
            triples.append((task, plan, r))
    dt = time.perf_counter() - t0
    solved = sum(bool(r.ground_truth and r.ground_truth.goal_achieved) for _, _, r in triples)
    print(f"sandbox : {len(triples)} episodes, {frames} frames in {dt:.2f}s "
          f"({solved}/{len(triples)} reference plans reach the goal)")
    return len(triples) / dt, frames / dt, triples


def bench_tiny_wan(videos: int, group: int, out_dir: str):
    """Returns (s per video one at a time, s per video batched by ``group``)."""
    from worldagent_ray.config import DiffusersConfig
    from worldagent_ray.schemas import Plan, Task
    from worldagent_ray.world.diffusers_world import DiffusersWorld

    t0 = time.perf_counter()
    world = DiffusersWorld(DiffusersConfig(model="tiny-wan-t2v"))
    load_s = time.perf_counter() - t0
    task = Task(id="bench-wan", goal="Make a cup of tea", phase=2)
    plan = Plan.from_actions(["Fill the kettle", "Boil water", "Pour water into the cup"])
    world.render(task, [plan], os.path.join(out_dir, "warmup"), seeds=[0])
    singles = []
    for i in range(videos):
        t = time.perf_counter()
        (r,) = world.render(task, [plan], os.path.join(out_dir, "wan1"), seeds=[i])
        singles.append(time.perf_counter() - t)
        if r.error:
            raise RuntimeError(f"tiny Wan failed: {r.error}")
    t = time.perf_counter()
    n_batched = 0
    for i in range(max(1, videos // group)):
        rs = world.render(task, [plan] * group, os.path.join(out_dir, "wanG"), seeds=[i * group + k for k in range(group)])
        n_batched += sum(r.error is None for r in rs)
    batched = (time.perf_counter() - t) / max(1, n_batched)
    c = world.cfg
    print(f"tiny Wan: load {load_s:.2f}s; {c.height}x{c.width}x{c.num_frames} frames, {c.num_inference_steps} steps; "
          f"median {statistics.median(singles):.3f}s/video alone, {batched:.3f}s/video in batches of {group}")
    return statistics.median(singles), batched


def bench_critic(triples):
    """Returns ms per verdict of the default verifiable scorer."""
    from worldagent_ray.config import CriticConfig
    from worldagent_ray.critic import Critic

    critic = Critic(CriticConfig(scorers=["verifiable"]), None)
    critic.score_batch(triples[:1])
    t0 = time.perf_counter()
    verdicts = critic.score_batch(triples)
    dt = time.perf_counter() - t0
    ok = sum(v.success for v in verdicts)
    print(f"critic  : {len(verdicts)} verdicts in {dt * 1000:.1f}ms ({ok} successes, "
          f"mean reward {statistics.fmean(v.reward for v in verdicts):.3f})")
    return 1000 * dt / len(verdicts)


def _try(label: str, fn, *args):
    try:
        return fn(*args)
    except ImportError as e:  # a part of the project that is not installed / landed
        print(f"{label}: skipped ({e})")
        return None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=24, help="sandbox tasks (phases 1-3)")
    ap.add_argument("--group", type=int, default=4, help="plans per task / videos per batched call")
    ap.add_argument("--videos", type=int, default=8, help="tiny Wan videos rendered one at a time")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default). On a shared, loaded CPU 1 is often faster")
    ap.add_argument("--out", default=None, help="artefact folder (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    nan = float("nan")
    out_dir = args.out or tempfile.mkdtemp(prefix="wa-bench-world-")
    import torch

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else nan
    print(f"machine : {os.cpu_count()} CPUs, load average {load:.1f}, torch threads {torch.get_num_threads()}, "
          f"cuda {torch.cuda.is_available()}")
    try:
        sb = _try("sandbox ", bench_sandbox, args.tasks, args.group, out_dir)
        wan = _try("tiny Wan", bench_tiny_wan, args.videos, args.group, out_dir)
        critic_ms = _try("critic  ", bench_critic, sb[2]) if sb else None
    finally:
        if args.out is None:
            shutil.rmtree(out_dir, ignore_errors=True)
    eps, fps = (sb[0], sb[1]) if sb else (nan, nan)
    wan_s, wan_b = wan if wan else (nan, nan)
    critic_ms = nan if critic_ms is None else critic_ms
    if not math.isnan(wan_s) and not math.isnan(eps):
        print(f"ratio   : one sandbox episode takes {1 / eps:.4f}s, one tiny-Wan video {wan_s:.4f}s "
              f"({wan_s * eps:.1f}x)")
    print(f"RESULT sandbox_eps={eps:.2f} sandbox_fps={fps:.1f} tinywan_s={wan_s:.4f} "
          f"tinywan_batched_s={wan_b:.4f} critic_ms={critic_ms:.3f}")


if __name__ == "__main__":
    main()
