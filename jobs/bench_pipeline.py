"""The asynchronous driver vs a lock-step loop on identical parts, and world-replica scaling.

Parts (in one process, ``orchestration/local.py``): the curriculum's task generator, the Action
agent on a real engine (tiny-random-llama, vocabulary-constrained JSON), the sandbox world,
the verifiable critic and LanceDB memory. Only the world is given a latency, because in
production it is the slow stage, a video model on a GPU:

    per-video latency = 16 s / scale   (default scale 8 -> 2.0 s per video)

16 s is FastVideo's published end-to-end time for a 5-second 720P clip from FastWan2.2-TI2V-5B
on one H200 (Hao AI Lab, "FastWan" blog). A world replica renders one video at a time, so a
call for G plans takes G x that (minus the sandbox's own real render time, which is part of
it). The critic is the real verifiable scorer, measured, nothing injected.

Method: a warm-up episode group first; then async and lock-step alternate over ``--repeats``
(order swapped each repeat) and the median is reported; only successful (``ok``) episodes
count; world utilisation is busy replica-time / (replicas x whole wall time), fill and drain
included. Scaling: the async driver with 1, 2 and 4 world replicas at the same per-video
latency; efficiency = eps_k / (k x eps_1).

    python jobs/bench_pipeline.py [--scale 8] [--groups 8] [--repeats 2] [--replicas 1,2,4]

Last line: ``RESULT async_eps=... lockstep_eps=... ratio=... world_util=... eff_2=... eff_4=...``
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time

from worldagent_ray.env import apply_env_defaults

apply_env_defaults(offline=True)

FASTWAN22_5B_H200_S = 16.0  # FastVideo: 5 s 720P clip, FastWan2.2-TI2V-5B, one H200, end to end


class ReplicaPool:
    """``k`` world replicas: a call takes a free replica, renders for real, and holds the
    replica until ``per_video_s x len(plans)`` has passed (one video at a time per GPU)."""

    def __init__(self, world, replicas: int, per_video_s: float):
        self.world, self.per_video_s = world, per_video_s
        self.free: asyncio.Queue[int] | None = None
        self.replicas = replicas
        self.busy_s = 0.0
        self.calls = 0

    async def render(self, task, plans, out_dir, seeds):
        if self.free is None:
            self.free = asyncio.Queue()
            for i in range(self.replicas):
                self.free.put_nowait(i)
        slot = await self.free.get()
        t0 = time.perf_counter()
        try:
            out = await asyncio.to_thread(self.world.render, task, plans, out_dir, None, seeds)
            rest = self.per_video_s * len(plans) - (time.perf_counter() - t0)
            if rest > 0:
                await asyncio.sleep(rest)
            return out
        finally:
            self.busy_s += time.perf_counter() - t0
            self.calls += 1
            self.free.put_nowait(slot)


def make_services(cfg, engine, root: str, replicas: int, per_video_s: float):
    from worldagent_ray.memory import Embedder, EpisodeMemory
    from worldagent_ray.orchestration.local import LocalServices

    memory = EpisodeMemory(f"{root}/memory", embedder=Embedder("minilm", num_threads=1))
    services = LocalServices(cfg, {cfg.agents.action.engine: engine}, memory=memory)
    pool = ReplicaPool(services.world, replicas, per_video_s)
    services.render = pool.render  # the world is the replica pool
    return services, pool


async def lockstep(cfg, run, s) -> None:
    """The naive loop: one task at a time, one stage after the other."""
    from worldagent_ray.schemas import ActionRequest, CurriculumState, Episode, EpisodeRow

    state = CurriculumState(phase=cfg.agents.curriculum.start_phase)
    for rnd in range(cfg.run.iterations):
        prop = await s.propose(state, [], set(), cfg.agents.curriculum.tasks_per_proposal, rnd)
        state = prop.state
        tasks = [t.model_copy(update={"id": f"r{rnd:04d}.{i}.{t.id}"[:200]}) for i, t in enumerate(prop.tasks)]
        run.record_round(rnd, tasks, list(prop.sources))
        for task in tasks:
            hits = await s.recall(task.goal, cfg.agents.action.memory_top_k)
            samples = await s.act(ActionRequest(task=task, memory=hits, vocabulary=s.vocabulary(task)))
            rollouts = await s.render(task, [x.plan for x in samples], f"{run.videos}/{task.id}",
                                      list(range(len(samples))))
            verdicts = await s.score([(task, x.plan, r) for x, r in zip(samples, rollouts)])
            eps = [Episode.new(run.run_id, task, i, plan=x.plan, rollout=r, verdict=v, round=rnd)
                   for i, (x, r, v) in enumerate(zip(samples, rollouts, verdicts))]
            await s.remember(eps)
            run.record_episodes([EpisodeRow(**e.summary().model_dump(), t=time.time()) for e in eps])


def one_run(mode: str, cfg, engine, root: str, replicas: int, per_video_s: float) -> dict:
    from worldagent_ray.orchestration.evolve import EvolveDriver
    from worldagent_ray.orchestration.run_folder import RunFolder

    tag = f"{mode}-{replicas}-{time.monotonic_ns()}"
    run_cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"root": f"{root}/{tag}"})})
    run = RunFolder.create(run_cfg, tag)
    s, pool = make_services(run_cfg, engine, str(run.local), replicas, per_video_s)
    t0 = time.perf_counter()
    if mode == "lockstep":
        asyncio.run(lockstep(run_cfg, run, s))
    else:
        asyncio.run(EvolveDriver(run_cfg, run, s).run_loop())
    wall = time.perf_counter() - t0
    ok = sum(1 for r in run.episode_rows() if r.status == "ok")
    return {"mode": mode, "replicas": replicas, "ok": ok, "wall": wall, "eps": ok / wall,
            "util": pool.busy_s / (replicas * wall), "calls": pool.calls}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=8.0, help="divide FastVideo's 16 s per video by this (default 8)")
    ap.add_argument("--groups", type=int, default=8, help="task groups per run at 1 replica (scaled with replicas)")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--replicas", default="1,2,4", help="replica counts of the scaling mode ('' to skip)")
    ap.add_argument("--backend", default="auto", choices=["auto", "vllm", "transformers"])
    args = ap.parse_args(argv)

    from worldagent_ray.config import load_config
    from worldagent_ray.engines import build_engine

    per_video = FASTWAN22_5B_H200_S / args.scale
    tasks_per_round = 2

    def cfg_for(groups: int, world_workers: int):
        rounds = max(1, groups // tasks_per_round)
        return load_config("local-cpu", overrides=[
            f"run.iterations={rounds}", f"agents.curriculum.tasks_per_proposal={tasks_per_round}",
            f"agents.action.group_size={args.group_size}", "agents.curriculum.use_llm=false",
            "agents.critic.scorers=[verifiable]", "agents.action.max_tokens=96", "run.lookahead_rounds=4",
            "engines.policy.model=tiny-random-llama", f"engines.policy.backend={args.backend}",
            f"run.pipeline={{action: {{workers: 2, queue: 2}}, world: {{workers: {world_workers}, queue: "
            f"{world_workers}}}, critic: {{workers: 2, queue: 2}}}}",
            "world.sandbox.write_gif=false",
        ], environ={})

    cfg = cfg_for(args.groups, 1)
    engine = build_engine(cfg.engines["policy"])
    print(f"engine: {type(engine).__name__} on {cfg.engines['policy'].model}; world: sandbox + "
          f"{per_video:.2f} s per video (FastWan2.2-5B on one H200, {FASTWAN22_5B_H200_S:g} s / {args.scale:g}); "
          f"{args.groups} groups x G={args.group_size}")
    root = tempfile.mkdtemp(prefix="bench-pipeline-")
    try:
        one_run("async", cfg_for(2, 1), engine, root, 1, per_video)  # warm-up: engine, memory, sandbox
        runs: dict[str, list[dict]] = {"async": [], "lockstep": []}
        for rep in range(args.repeats):
            order = ("async", "lockstep") if rep % 2 == 0 else ("lockstep", "async")
            for mode in order:
                r = one_run(mode, cfg, engine, root, 1, per_video)
                runs[mode].append(r)
                print(f"  {mode:9s} repeat {rep}: {r['ok']} ok episodes in {r['wall']:6.1f} s = {r['eps']:.3f} eps/s;"
                      f" world busy {r['util']:.1%} of the wall time ({r['calls']} render calls)")
        a = statistics.median(r["eps"] for r in runs["async"])
        lk = statistics.median(r["eps"] for r in runs["lockstep"])
        util = statistics.median(r["util"] for r in runs["async"])
        result = f"async_eps={a:.3f} lockstep_eps={lk:.3f} ratio={a / lk:.2f} world_util={util:.3f}"
        counts = [int(x) for x in args.replicas.split(",") if x.strip()]
        if counts:
            scaling = {}
            for k in counts:
                # enough groups that every replica stays busy; the driver's world stage has k workers
                r = one_run("async", cfg_for(args.groups * k, k), engine, root, k, per_video)
                scaling[k] = r
                print(f"  scaling: {k} replica(s): {r['ok']} ok episodes in {r['wall']:6.1f} s = {r['eps']:.3f} eps/s;"
                      f" utilisation {r['util']:.1%}")
            base = scaling[counts[0]]["eps"] / counts[0]
            result += "".join(f" eff_{k}={scaling[k]['eps'] / (k * base):.2f}" for k in counts if k != counts[0])
        print(f"RESULT {result}")
    finally:
        engine.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
