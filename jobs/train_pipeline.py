"""Seed 000's three training phases of the Action agent as one command, with resume.

    python jobs/train_pipeline.py --profile local-cpu --out runs/pipeline
    python jobs/train_pipeline.py --out runs/pipeline --resume          # continue where it stopped
    ray job submit --working-dir . -- python jobs/train_pipeline.py --profile gpu-cluster --out /shared/pipeline

1. **SFT** (``<out>/sft/model``): TRL's SFTTrainer on Ray Train over the train-split reference
   plans (``training.sft.*``; see ``jobs/train_sft.py``), plus successful episodes of
   ``--memory`` if given.
2. **GRPO (+ lambda * DPO) with the Critic frozen** (``<out>/grpo/model``): on-policy rounds on
   train tasks from the SFT model (:class:`worldagent_ray.rl.phase2.Phase2Trainer`), scored by the
   verifiable critic, which is not trained; ``learner.*`` sets the loss (``learner.dpo_coef`` is
   lambda). The learner state is checkpointed every ``--checkpoint-every`` steps to
   ``<out>/grpo/learner`` and a resumed run continues from it.
3. **The curriculum loop** (``<out>/curriculum``): ``jobs/evolve.py`` from the phase-2 model
   (``--set engines.policy.model=<out>/grpo/model``) for ``--iterations`` iterations, with the
   online learner when ``--learn``; a resumed run continues the same run folder.

``<out>/pipeline.json`` records each finished phase and its output; ``--resume`` skips finished
phases. The last line is ``RESULT sft=<model> grpo=<model> curriculum=<run folder> minutes=<N>``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from worldagent_ray.env import apply_env_defaults  # noqa: E402

apply_env_defaults(offline=False)  # quiet logs now; offline switches once the config is known
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from worldagent_ray.runtime.job import job_parser  # noqa: E402

PHASES = ("sft", "grpo", "curriculum")


def say(msg: str) -> None:
    print(msg, flush=True)


def parse_args(argv=None):
    p = job_parser(__doc__, example="learner.dpo_coef=0.1, applied to every phase")
    p.add_argument("--out", required=True, help="pipeline folder (phases write below it)")
    p.add_argument("--resume", action="store_true", help="skip finished phases, continue the unfinished one")
    p.add_argument("--memory", help="memory URI whose successful train episodes join the SFT data")
    p.add_argument("--grpo-steps", type=int, default=20, help="phase 2 optimizer steps")
    p.add_argument("--grpo-minutes", type=float, default=10.0, help="phase 2 time limit (training time)")
    p.add_argument("--checkpoint-every", type=int, default=5, help="phase 2 learner checkpoint every k steps")
    p.add_argument("--phase2-frac", type=float, default=0.75, help="share of phase-2 tasks in phase 2 rounds")
    p.add_argument("--iterations", type=int, default=2, help="curriculum iterations in phase 3")
    p.add_argument("--learn", action="store_true", help="run phase 3 with the online GRPO learner")
    p.add_argument("--stop-after", choices=PHASES, help="stop after this phase (resume later)")
    args = p.parse_args(argv)
    if args.grpo_steps < 0 or args.checkpoint_every < 1 or args.iterations < 0 or args.grpo_minutes <= 0:
        p.error("--grpo-steps and --iterations must be >= 0, --checkpoint-every >= 1, --grpo-minutes > 0")
    return args


class Ledger:
    """``<out>/pipeline.json``: finished phases and their outputs (rewritten atomically)."""

    def __init__(self, out: Path, resume: bool, args: argparse.Namespace):
        self.path = out / "pipeline.json"
        if self.path.exists() and not resume:
            raise FileExistsError(f"{out} already holds a pipeline; pass --resume to continue it")
        if resume and not self.path.exists():
            raise FileNotFoundError(f"nothing to resume: {self.path} does not exist")
        self.state: dict[str, Any] = json.loads(self.path.read_text()) if resume else {
            "profile": args.profile, "overrides": args.overrides, "phases": {}}
        if resume and (self.state["profile"], self.state["overrides"]) != (args.profile, args.overrides):
            say(f"note: resuming with --profile/--set of the first run: {self.state['profile']} {self.state['overrides']}")
        out.mkdir(parents=True, exist_ok=True)
        self.save()

    def done(self, phase: str) -> dict[str, Any] | None:
        return self.state["phases"].get(phase)

    def finish(self, phase: str, info: dict[str, Any]) -> None:
        self.state["phases"][phase] = dict(info, finished_at=time.time())
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2, default=str))
        os.replace(tmp, self.path)


def phase_sft(cfg, out: Path, memory: str | None) -> dict[str, Any]:
    import ray

    from worldagent_ray.runtime.cluster import connect
    from worldagent_ray.runtime.sft_trainer import run_sft

    connect(cfg, dashboard=False)
    try:
        info = run_sft(cfg, str(out / "sft" / "model"), memory_uri=memory)
    finally:
        ray.shutdown()  # phase 2 runs in this process; free Ray's workers first
    return {"model": info["model"], "examples": info["examples"], "metrics": info["metrics"]}


def phase_grpo(cfg, out: Path, sft_model: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from worldagent_ray.config import CriticConfig
    from worldagent_ray.critic import Critic
    from worldagent_ray.engines.factory import build_engine
    from worldagent_ray.rl.learner import LearnerCore
    from worldagent_ray.rl.phase2 import Phase2Trainer, save_policy_model
    from worldagent_ray.world.sandbox import SandboxTaskGenerator, SandboxWorld

    root = out / "grpo"
    ckpt = root / "learner"
    ecfg = cfg.engines[cfg.agents.action.engine].model_copy(update={"model": sft_model})
    engine = build_engine(ecfg)
    try:
        engine_dtype = torch.float32 if ecfg.dtype == "float32" else torch.bfloat16
        core = LearnerCore(cfg.learner, sft_model, temperature=cfg.agents.action.temperature or 1.0)
        world = SandboxWorld(cfg.world.sandbox)
        critic = Critic(CriticConfig(scorers=["verifiable"]), None)  # frozen: scores, never trained
        trainer = Phase2Trainer(core, engine, world, critic, SandboxTaskGenerator(cfg.run.seed), cfg.agents.action,
                                world.admissible_actions, phase2_frac=args.phase2_frac,
                                groups_per_step=cfg.learner.groups_per_step, engine_dtype=engine_dtype,
                                seed=cfg.learner.seed, run_id="pipeline-grpo", out_dir=str(root), say=say)
        if (ckpt / "learner_state.json").exists():
            extra = core.load_checkpoint(ckpt)
            trainer.stats.steps = int(extra.get("steps", core.step_count))
            trainer.rng.seed(f"{cfg.learner.seed}:{core.step_count}")
            trainer.push_weights()
            say(f"  resumed phase 2 at step {core.step_count}")
        while trainer.stats.steps < args.grpo_steps:
            target = min(args.grpo_steps, (trainer.stats.steps // args.checkpoint_every + 1) * args.checkpoint_every)
            left = args.grpo_minutes - trainer.stats.trained_s / 60
            if left <= 0:
                break
            trainer.run(max_steps=target, minutes=left)
            core.save_checkpoint(ckpt, extra={"steps": trainer.stats.steps})
        model = save_policy_model(core, sft_model, str(root / "model"))
    finally:
        engine.shutdown()
    st = trainer.stats
    return {"model": model, "steps": st.steps, "rounds": st.rounds, "dpo_pairs": st.dpo_pairs,
            "train_success": st.success / max(1, st.samples), "minutes": st.trained_s / 60}


def curriculum_command(args: argparse.Namespace, out: Path, model: str, resume_dir: Path | None) -> list[str]:
    """The ``jobs/evolve.py`` command of phase 3 (a new run under ``<out>``, or ``--resume``)."""
    evolve = str(Path(__file__).resolve().with_name("evolve.py"))
    if resume_dir is not None:
        return [sys.executable, evolve, "--resume", str(resume_dir)]
    cmd = [sys.executable, evolve, "--profile", args.profile, "--run-name", "curriculum"]
    for o in list(args.overrides) + [f"engines.policy.model={model}", f"run.iterations={args.iterations}",
                                     f"run.root={out}"]:
        cmd += ["--set", o]
    return cmd + (["--learn"] if args.learn else [])


def phase_curriculum(args: argparse.Namespace, out: Path, model: str) -> dict[str, Any]:
    run_dir = out / "curriculum"
    cmd = curriculum_command(args, out, model, run_dir if run_dir.exists() else None)
    say("  " + " ".join(cmd))
    rc = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))).returncode
    if rc != 0:
        raise RuntimeError(f"the curriculum loop exited with {rc}; continue with --resume")
    return {"run": str(run_dir)}


def main(argv=None) -> int:
    from worldagent_ray.config import ConfigError, load_config

    args = parse_args(argv)
    out = Path(args.out)
    try:
        ledger = Ledger(out, args.resume, args)
        cfg = load_config(ledger.state["profile"], overrides=ledger.state["overrides"])
        apply_env_defaults(cfg=cfg)
    except (ConfigError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    for phase in PHASES:
        if ledger.done(phase):
            say(f"phase {phase}: done before ({ledger.done(phase).get('model') or ledger.done(phase).get('run')})")
        else:
            say(f"phase {phase}")
            if phase == "sft":
                info = phase_sft(cfg, out, args.memory)
            elif phase == "grpo":
                info = phase_grpo(cfg, out, ledger.done("sft")["model"], args)
            else:
                info = phase_curriculum(args, out, ledger.done("grpo")["model"])
            ledger.finish(phase, info)
            say(f"phase {phase}: {json.dumps(info, default=str)}")
        if args.stop_after == phase:
            say(f"stopped after {phase}; continue with --resume")
            return 0
    ph = ledger.state["phases"]
    say(f"RESULT sft={ph['sft']['model']} grpo={ph['grpo']['model']} curriculum={ph['curriculum']['run']} "
        f"minutes={(time.perf_counter() - t0) / 60:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
