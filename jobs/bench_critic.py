"""How well does each Critic agree with the ground truth on held-out episodes? And can GRPO learn
from the frozen learned reward model alone?

Held-out episodes: every plan variant (reference, padded, shuffled, truncated, dropped,
corrupted, random) of ``--heldout-tasks`` held-out sandbox tasks per phase (``Task.split``),
rendered once; the same episodes and prompts for every judge, side by side in one run:

* ``prompt``: the base judge model, prompted (text judge, ``verdict`` mode, greedy, JSON-constrained);
* ``sft``: the judge after ``jobs/train_critic.py --stage sft`` (same prompt and decoding);
* ``rm``: the reward model of ``--stage rm`` (calibrated reward; success = reward >= 0.5);
* ``verifiable``: the scorer on the world's ground truth (the ceiling).

Columns besides the measures: ``fallback`` (captions that are the world's own description
because the judge wrote none usable, or wrote none at all: the verifiable scorer and the reward
model), ``malformed`` (judge answers that did not parse: zero scores), seconds per episode.

Measures per judge, against the ground truth: success accuracy (Wilson 95 % CI), AUROC of the
reward for success, pairwise accuracy over same-task pairs whose ground-truth rewards differ by
at least 0.05 (ties count one half; Wilson CI), Spearman of reward vs ground-truth reward, and
caption faithfulness (fraction of the facts a caption states that hold in the final state).

Without ``--sft-model`` / ``--rm-model`` both are trained first by ``jobs/train_critic.py``
with the same config (train-split tasks only). ``--grpo-minutes M`` adds the learned-Critic
GRPO arm: two GRPO runs of M minutes from the same base policy, one rewarded by the
verifiable scorer and one ONLY by the frozen reward model, both evaluated by ground truth on
held-out tasks (the machinery of ``jobs/bench_learning.py``).

    python jobs/bench_critic.py --quick                       # minutes: tiny models, a smoke run
    python jobs/bench_critic.py                               # SmolLM2 judge, full data
    python jobs/bench_critic.py --grpo-minutes 15             # plus the learned-Critic GRPO arm

Last line: ``RESULT prompt_acc=... sft_acc=... rm_acc=... rm_pair_acc=... rm_spearman=...
verifiable_acc=... [grpo_verifiable=... grpo_rm=...] minutes=...``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import tempfile
import time
from typing import Any, Sequence

from worldagent_ray.env import apply_env_defaults, native_bf16_precision  # noqa: E402
from worldagent_ray.stats import wilson

apply_env_defaults(offline=True)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def say(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- statistics



def ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def pair_accuracy(rows: Sequence[dict], rewards: Sequence[float], margin: float = 0.05) -> tuple[float, int]:
    by_task: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_task.setdefault(r["task_id"], []).append(i)
    good = n = 0.0
    for idx in by_task.values():
        for x in range(len(idx)):
            for y in range(x + 1, len(idx)):
                i, j = idx[x], idx[y]
                gap = rows[i]["reward"] - rows[j]["reward"]
                if abs(gap) < margin:
                    continue
                n += 1
                d = rewards[i] - rewards[j]
                good += 0.5 if d == 0 else float((d > 0) == (gap > 0))
    return (good / n if n else float("nan")), int(n)


def measure(name: str, rows: Sequence[dict], verdicts: Sequence[Any]) -> dict[str, Any]:
    from worldagent_ray.critic.captions import (
        cap_length,
        caption_faithfulness,
        sanitize_text,
    )

    truth = [bool(r["success"]) for r in rows]
    rewards = [float(v.reward) for v in verdicts]
    succ = [bool(v.success) for v in verdicts]
    correct = sum(a == b for a, b in zip(succ, truth))
    pa, npairs = pair_accuracy(rows, rewards)
    faith = [caption_faithfulness(v.state_caption, json.loads(r["final_state_json"])) for r, v in zip(rows, verdicts)]
    faith_n = [f for f in faith if f is not None]
    return {
        "judge": name, "n": len(rows), "acc": correct / len(rows), "acc_ci": wilson(correct, len(rows)),
        "auroc": auroc(rewards, truth), "pair_acc": pa, "pair_ci": wilson(pa * npairs, npairs) if npairs else None,
        "pairs": npairs, "spearman": spearman(rewards, [r["reward"] for r in rows]),
        "faithfulness": sum(faith_n) / len(faith_n) if faith_n else float("nan"),
        "captions_with_facts": len(faith_n) / len(rows),
        "fallback_captions": sum(v.state_caption == cap_length(sanitize_text(r["state_description"]), len(v.state_caption))
                                 and v.state_caption.startswith(r["state_description"][:40]) for r, v in zip(rows, verdicts)) / len(rows),
        "malformed": sum(any("malformed" in n for n in v.notes) for v in verdicts) / len(rows),
    }


# --------------------------------------------------------------------------- judges


def heldout_rows(cfg, n_tasks: int, out_dir: str) -> list[dict]:
    from worldagent_ray.datasets.critic import rollouts_for_task
    from worldagent_ray.world.sandbox import SandboxTaskGenerator, SandboxWorld

    sandbox = cfg.world.sandbox.model_copy(update={"write_mp4": False, "write_gif": False, })
    world = SandboxWorld(sandbox)
    gen = SandboxTaskGenerator(seed=cfg.critic_training.seed + 1000)  # other variations than training
    rows: list[dict] = []
    for phase in (1, 2, 3):
        for task in gen.heldout_tasks(phase, n_tasks):
            assert task.split == "heldout"
            rows += rollouts_for_task(task, world, out_dir, seed=7, kinds=cfg.critic_training.plan_kinds,
                                      weights=cfg.agents.critic.reward_weights)
    return rows


def items_of(rows: Sequence[dict], out_dir: str) -> list[tuple]:
    """Rebuild (task, plan, rollout) items from rows (the sandbox is deterministic)."""
    from worldagent_ray.config import SandboxConfig
    from worldagent_ray.schemas import Plan, Task
    from worldagent_ray.world.sandbox import SandboxWorld

    world = SandboxWorld(SandboxConfig(image_size=32, frames_per_step=1, write_mp4=False, write_gif=False), critic_frames=1)
    items = []
    for r in rows:
        task, plan = Task.model_validate_json(r["task_json"]), Plan.from_actions(list(r["plan"]))
        [rollout] = world.render(task, [plan], out_dir)
        assert rollout.ground_truth is not None and rollout.ground_truth.state_description == r["state_description"]
        items.append((task, plan, rollout))
    return items


def judge_with_engine(cfg, model: str, backend: str, items: Sequence[tuple]) -> tuple[list[Any], float]:
    from worldagent_ray.config import EngineConfig
    from worldagent_ray.critic import Critic
    from worldagent_ray.engines.factory import build_engine

    dtype = "float32" if backend == "transformers" else "bfloat16"
    engine = build_engine(EngineConfig(backend=backend, model=model, dtype=dtype, max_model_len=2048,
                                       max_json_retries=1, max_num_seqs=64))
    try:
        ccfg = cfg.agents.critic.model_copy(update={"scorers": ["text_judge"], "text_judge_mode": "verdict",
                                                    "max_tokens": 256})
        critic = Critic(ccfg, {ccfg.engine: engine})
        t0 = time.perf_counter()
        out = []
        for i in range(0, len(items), 32):
            out += critic.score_batch(items[i:i + 32])
        return out, time.perf_counter() - t0
    finally:
        engine.shutdown()


def judge_with(cfg, scorers: list[str], items: Sequence[tuple], reward_model: str | None = None):
    from worldagent_ray.critic import Critic

    ccfg = cfg.agents.critic.model_copy(update={"scorers": scorers, "reward_model": reward_model})
    critic = Critic(ccfg)
    t0 = time.perf_counter()
    return critic.score_batch(list(items)), time.perf_counter() - t0


# --------------------------------------------------------------------------- GRPO arm


def grpo_arm(args, rm_model: str) -> dict[str, float]:
    """GRPO from the same base policy, rewarded by (a) the verifiable scorer, (b) ONLY the frozen
    reward model; both evaluated by ground truth (the verifiable scorer) on the same held-out
    phase-2 tasks with the same prompts and sampling seeds (the machinery of bench_learning)."""
    from worldagent_ray.config import CriticConfig
    from worldagent_ray.critic import Critic
    from worldagent_ray.models import resolve_model

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_learning.py")
    spec = importlib.util.spec_from_file_location("bench_learning", path)
    bl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bl)  # type: ignore[union-attr]
    bargs = bl.parse_args(["--grpo-minutes", str(args.grpo_minutes), "--eval-tasks", str(args.grpo_eval_tasks),
                           "--model", args.policy, "--backend", args.backend])
    out: dict[str, float] = {}
    for arm in ("verifiable", "rm"):
        work = tempfile.mkdtemp(prefix=f"bench-critic-grpo-{arm}-")
        b = bl.Bench(bargs, args.seed, work)
        verifiable = b.critic
        try:
            before = b.evaluate(f"{arm}-before", use_memory=False)["p2"]
            if arm == "rm":  # the trainer's reward: ONLY the frozen reward model
                b.critic = Critic(CriticConfig(scorers=["reward_model"], reward_model=rm_model))
            tr, core = b.phase2(resolve_model(args.policy), 0.0, f"critic-{arm}")
            tr.push_weights()
            st = tr.run(minutes=args.grpo_minutes)
            b.version = tr.version
            b.critic = verifiable  # evaluation is always by ground truth
            after = b.evaluate(f"{arm}-after", use_memory=False)["p2"]
            pb, pa = 100 * sum(before) / len(before), 100 * sum(after) / len(after)
            lo, hi = wilson(sum(after), len(after))
            say(f"  GRPO arm [{arm}]: held-out phase-2 success {pb:.1f}% -> {pa:.1f}% [{100 * lo:.1f}, "
                f"{100 * hi:.1f}] ({st.steps} steps, {st.rounds} rounds, train success "
                f"{100 * st.success / max(1, st.samples):.0f}% by its own reward)")
            out[f"grpo_{arm}"] = pa
            out[f"grpo_{arm}_before"] = pb
            del core
        finally:
            b.engine.shutdown()
            b.memory.close()
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="local-cpu")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quick", action="store_true", help="tiny models and data: a smoke run of every path")
    p.add_argument("--heldout-tasks", type=int, default=16, help="held-out tasks per phase")
    p.add_argument("--sft-model", help="trained SFT judge folder (default: train one now)")
    p.add_argument("--rm-model", help="trained reward-model folder (default: train one now)")
    p.add_argument("--backend", default="auto", choices=["auto", "vllm", "transformers"], help="judge engines")
    p.add_argument("--grpo-minutes", type=float, default=0.0, help="learned-Critic GRPO arm: minutes per arm")
    p.add_argument("--grpo-eval-tasks", type=int, default=16)
    p.add_argument("--policy", default="smollm2-135m-instruct", help="policy of the GRPO arm")
    p.add_argument("--precision", default=native_bf16_precision(), choices=["auto", "bf16", "fp32"],
                   help="critic_training.precision of both stages (default: bf16 autocast where the machine "
                        "multiplies bf16 natively (a GPU, AMX or AVX512-BF16), else fp32)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.heldout_tasks = min(args.heldout_tasks, 2)
        args.backend = "transformers"
        args.policy = "tiny-random-llama"
        args.grpo_eval_tasks = min(args.grpo_eval_tasks, 2)
        args.overrides = ["critic_training.base_model=tiny-random-llama", "critic_training.tasks_per_phase=3",
                          "critic_training.heldout_tasks_per_phase=0", "critic_training.max_steps=2",
                          "critic_training.max_length=512", "world.sandbox.image_size=32",
                          "world.sandbox.frames_per_step=1"] + args.overrides
    return args


def main(argv=None) -> int:
    from worldagent_ray.config import load_config

    args = parse_args(argv)
    t_start = time.perf_counter()
    work = tempfile.mkdtemp(prefix="bench-critic-")
    # Training runs alone, before any judge engine starts: its Ray Train worker gets every core (Ray
    # sets a worker's OMP_NUM_THREADS to its CPU share; the profile's share would train on one thread).
    # A --set of resources.learner.num_cpus still wins (it comes later).
    cores = os.cpu_count() or 1
    overrides = [f"run.root={work}", f"resources.learner.num_cpus={cores}",
                 f"critic_training.precision={args.precision}"] + args.overrides
    cfg = load_config(args.profile, overrides=overrides)
    ct = cfg.critic_training
    budget = f"{ct.max_steps} steps" if ct.max_steps else f"{ct.epochs:g} epoch(s)"
    say(f"bench_critic: judge backbone {ct.base_model}, {args.heldout_tasks} held-out tasks per phase; training "
        f"on {ct.tasks_per_phase} train tasks per phase, {budget} per stage at batch {ct.batch_size}, precision "
        f"{ct.precision}; {os.cpu_count()} CPUs (shared: timings depend on other load)")
    sets = sum([["--set", o] for o in overrides], [])
    import importlib.util as iu

    spec = iu.spec_from_file_location("train_critic", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                   "train_critic.py"))
    tc = iu.module_from_spec(spec)
    spec.loader.exec_module(tc)  # type: ignore[union-attr]
    root = os.path.join(work, ct.output_dir)
    t_train = time.perf_counter()
    if not (args.sft_model and args.rm_model):
        tc.main(["--stage", "data", "--profile", args.profile, *sets])
    sft_model, rm_model = args.sft_model, args.rm_model
    for stage in [s for s, given in (("sft", sft_model), ("rm", rm_model)) if not given]:
        tc.main(["--stage", stage, "--data", f"{root}/data", "--profile", args.profile, *sets])
    sft_model = sft_model or f"{root}/sft/model"
    rm_model = rm_model or f"{root}/rm/model"
    train_min = (time.perf_counter() - t_train) / 60

    rows = heldout_rows(cfg, args.heldout_tasks, os.path.join(work, "heldout"))
    items = items_of(rows, os.path.join(work, "heldout-items"))
    n_succ = sum(r["success"] for r in rows)
    say(f"held-out episodes: {len(rows)} ({n_succ} successful) from {len({r['task_id'] for r in rows})} tasks")
    results = []
    for name, run in (
        ("prompt", lambda: judge_with_engine(cfg, ct.base_model, args.backend, items)),
        ("sft", lambda: judge_with_engine(cfg, sft_model, args.backend, items)),
        ("rm", lambda: judge_with(cfg, ["reward_model"], items, rm_model)),
        ("verifiable", lambda: judge_with(cfg, ["verifiable"], items)),
    ):
        verdicts, secs = run()
        m = measure(name, rows, verdicts)
        m["seconds"] = secs
        results.append(m)
    say("")
    say(f"{'judge':11s} {'success acc (95% CI)':>24s} {'AUROC':>6s} {'pair acc (95% CI)':>24s} {'Spearman':>8s} "
        f"{'faithful':>8s} {'fallback':>8s} {'malformed':>9s} {'s/ep':>6s}")
    for m in results:
        ci = m["acc_ci"]
        pci = m["pair_ci"] or (float("nan"), float("nan"))
        say(f"{m['judge']:11s} {m['acc']:8.3f} [{ci[0]:.3f}, {ci[1]:.3f}]   {m['auroc']:6.3f} "
            f"{m['pair_acc']:8.3f} [{pci[0]:.3f}, {pci[1]:.3f}]   {m['spearman']:8.3f} {m['faithfulness']:8.3f} "
            f"{m['fallback_captions']:8.2f} {m['malformed']:9.2f} {m['seconds'] / max(1, m['n']):6.3f}")
    say(f"(pairs: {results[0]['pairs']} same-task pairs with a ground-truth reward gap >= 0.05; "
        f"training of the SFT judge and the reward model: {train_min:.1f} min)")
    by = {m["judge"]: m for m in results}
    extra = grpo_arm(args, rm_model) if args.grpo_minutes > 0 else {}
    tail = "".join(f" {k}={v:.1f}" for k, v in extra.items() if not k.endswith("_before"))
    say(f"RESULT prompt_acc={by['prompt']['acc']:.3f} sft_acc={by['sft']['acc']:.3f} rm_acc={by['rm']['acc']:.3f} "
        f"rm_pair_acc={by['rm']['pair_acc']:.3f} rm_spearman={by['rm']['spearman']:.3f} "
        f"verifiable_acc={by['verifiable']['acc']:.3f}{tail} minutes={(time.perf_counter() - t_start) / 60:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
