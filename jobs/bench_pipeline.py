"""Asynchronous driver vs a lock-step driver on the same backends.

Both drivers use the same real parts: the curriculum core (sandbox task generator), the
Action agent on a real engine (tiny-random-llama on vLLM when available, constrained to the
world's vocabulary), the sandbox world, the verifiable critic and LanceDB memory. The world
and the critic are each given the same injected latency per call and serve one call at a time,
as one GPU-pinned replica would, so that the comparison is about scheduling, not compute:

- lock-step: for each task, act -> render -> score -> write, one after the other;
- async:    ``EvolveDriver`` (bounded queues, every stage busy at once).

Measured: episodes/s of each, their ratio, and the world stage's utilisation in the async run
(time with a render in flight / wall time between the first and the last render).

    python jobs/bench_pipeline.py [--latency 3.0] [--rounds 4] [--tasks-per-round 3]

The per-stage call times are printed for both runs: the world is meant to be the slowest
stage (as a video model is); if the action stage is slower on a loaded machine, the world
cannot be kept busy and the printout shows why.

Last line: ``RESULT async_eps=… lockstep_eps=… ratio=… world_util=…``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RUST_LOG", "error")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Served:
    """Exposes ``obj.method`` as ``.method.remote(...)`` returning an awaitable, like a Ray handle.

    ``latency`` (s) is injected per call (a test double for a slow GPU stage); ``serial`` makes
    calls queue one at a time like a single replica. Busy intervals are recorded."""

    def __init__(self, obj, latency: float = 0.0, serial: bool = False):
        self._obj, self._latency, self._serial = obj, latency, serial
        self._lock = threading.Lock()
        self.busy: list[tuple[float, float]] = []
        self.by_method: dict[str, list[float]] = {}

    def _run(self, name, args, kwargs):
        def call():
            t0 = time.time()
            out = getattr(self._obj, name)(*args, **kwargs)
            rest = self._latency - (time.time() - t0)
            if rest > 0:
                time.sleep(rest)
            self.busy.append((t0, time.time()))
            self.by_method.setdefault(name, []).append(time.time() - t0)
            return out

        if self._serial:
            with self._lock:
                return call()
        return call()

    def __getattr__(self, name):
        outer = self

        class _M:
            def remote(self, *args, **kwargs):
                return asyncio.to_thread(outer._run, name, args, kwargs)

        return _M()


def utilisation(busy: list[tuple[float, float]]) -> float:
    if not busy:
        return 0.0
    busy = sorted(busy)
    total, (cs, ce) = 0.0, busy[0]
    for s, e in busy[1:]:
        if s > ce:
            total += ce - cs
            cs, ce = s, e
        else:
            ce = max(ce, e)
    total += ce - cs
    return total / (busy[-1][1] - busy[0][0])


def build(cfg, root: str, latency: float, engine):
    from worldagent_ray.agents.action import ActionAgent
    from worldagent_ray.agents.curriculum import CurriculumAgent
    from worldagent_ray.critic import Critic
    from worldagent_ray.memory import Embedder, EpisodeMemory
    from worldagent_ray.orchestration.evolve import Services
    from worldagent_ray.world.sandbox import SandboxWorld
    from worldagent_ray.world.sandbox.tasks import SandboxTaskGenerator

    world = SandboxWorld(cfg.world.sandbox)
    mem = EpisodeMemory(f"{root}/memory", embedder=Embedder("minilm"))
    services = Services(
        action=Served(ActionAgent(cfg.agents.action, engine), serial=True),
        world=Served(world, latency=latency, serial=True),
        critic=Served(Critic(cfg.agents.critic, None), latency=latency, serial=True),
        curriculum=Served(CurriculumAgent(cfg.agents.curriculum, SandboxTaskGenerator(seed=0), None)),
        memory=Served(mem),
        vocabulary=world.admissible_actions,
    )
    return services


async def lockstep(cfg, run, s) -> int:
    """The naive loop: one task at a time, one stage at a time."""
    from worldagent_ray.schemas import ActionRequest
    from worldagent_ray.schemas import Episode

    from worldagent_ray.schemas import CurriculumState

    state = CurriculumState(phase=cfg.agents.curriculum.start_phase)
    n = 0
    for rnd in range(cfg.run.iterations):
        prop = await s.curriculum.propose.remote(state, [], set(), cfg.agents.curriculum.tasks_per_proposal, rnd)
        state = prop.state
        for slot, task in enumerate(prop.tasks):
            task = task.model_copy(update={"id": f"r{rnd:04d}.{slot}.{task.id}"[:200]})
            hits = await s.memory.retrieve.remote(task.goal, cfg.agents.action.memory_top_k)
            [samples] = await s.action.act.remote([ActionRequest(task=task, memory=hits, vocabulary=s.vocabulary(task))])
            rollouts = await s.world.render.remote(task, [x.plan for x in samples], f"{run.videos}/{task.id}")
            verdicts = await s.critic.score_batch.remote([(task, x.plan, r) for x, r in zip(samples, rollouts)])
            eps = [Episode.new(run.run_id, task, i, plan=x.plan, rollout=r, verdict=v)
                   for i, (x, r, v) in enumerate(zip(samples, rollouts, verdicts))]
            await s.memory.upsert.remote(eps)
            n += len(eps)
    return n


class CriticAsScore:
    """The critic deployment's method is ``score``; the core's is ``score_batch``."""

    def __init__(self, served):
        self.served = served

    def __getattr__(self, name):
        return getattr(self.served, "score_batch" if name == "score" else name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", type=float, default=3.0,
                    help="injected seconds per world and per critic call (default 3: the world, a video model, "
                         "is the slow stage in production; keep it above the action stage's measured time)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tasks-per-round", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--backend", default="auto", choices=["auto", "vllm", "transformers"])
    args = ap.parse_args(argv)

    from worldagent_ray.config import load_config
    from worldagent_ray.engines import build_engine
    from worldagent_ray.orchestration.evolve import EvolveDriver
    from worldagent_ray.orchestration.run_folder import RunFolder

    cfg = load_config("local-cpu", overrides=[
        f"run.iterations={args.rounds}", f"agents.curriculum.tasks_per_proposal={args.tasks_per_round}",
        f"agents.action.group_size={args.group_size}", "agents.curriculum.use_llm=false",
        "agents.critic.scorers=[verifiable]", "agents.action.max_tokens=96",
        "engines.policy.model=tiny-random-llama", f"engines.policy.backend={args.backend}",
        "run.pipeline={action: {workers: 2, queue: 2}, world: {workers: 4, queue: 4}, critic: {workers: 4, queue: 4}}",
    ])
    engine = build_engine(cfg.engines["policy"])
    print(f"engine: {type(engine).__name__} on {cfg.engines['policy'].model}; latency {args.latency}s "
          f"per world and critic call; {args.rounds}x{args.tasks_per_round} tasks x G={args.group_size}")
    root = tempfile.mkdtemp(prefix="bench-pipeline-")
    try:
        results = {}
        for mode in ("lockstep", "async"):
            cfg.run.root = f"{root}/{mode}"
            run = RunFolder.create(cfg, mode)
            s = build(cfg, str(run.local), args.latency, engine)
            s.critic = CriticAsScore(s.critic)
            t0 = time.time()
            if mode == "lockstep":
                n = asyncio.run(lockstep(cfg, run, s))
            else:
                summary = asyncio.run(EvolveDriver(cfg, run, s).run_loop())
                n = summary["episodes"]
            dt = time.time() - t0
            results[mode] = (n, dt, utilisation(s.world.busy))
            print(f"{mode:9s}: {n} episodes in {dt:6.2f}s = {n / dt:5.2f} eps/s; world utilisation "
                  f"{results[mode][2]:.1%}")
            stages = {"action": s.action, "world": s.world, "critic": s.critic.served, "memory": s.memory}
            print(f"  {mode} calls (count x mean s): " + ", ".join(
                f"{k}.{m} {len(d)}x{sum(d) / len(d):.2f}" for k, v in stages.items() for m, d in v.by_method.items()))
        a_n, a_t, a_u = results["async"]
        l_n, l_t, _ = results["lockstep"]
        ratio = (a_n / a_t) / (l_n / l_t)
        print(f"RESULT async_eps={a_n / a_t:.3f} lockstep_eps={l_n / l_t:.3f} ratio={ratio:.2f} world_util={a_u:.3f}")
    finally:
        engine.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
