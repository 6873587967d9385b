"""Train the Critic from the world's ground truth (seed 000, phase 1): SFT, then a pairwise reward model.

    python jobs/train_critic.py --stage data                    # export the datasets only
    python jobs/train_critic.py --stage sft --set critic_training.lora=true
    python jobs/train_critic.py --stage rm --data runs/critic/data
    ray job submit --working-dir . -- python jobs/train_critic.py --profile gpu-cluster --stage rm

Stages:

* ``data``: Ray Data export of labelled episodes (fresh sandbox rollouts of varied quality and,
  with ``critic_training.memory_uri``, episodes from memory) into SFT examples and preference
  pairs, split into train / held-out by task (``Task.split``); Parquet under
  ``<run.root>/<critic_training.output_dir>/data``.
* ``sft``: TRL ``SFTTrainer`` in Ray Train on the train SFT examples: the judge learns to write
  the ground-truth verdict JSON (caption, success, five scores) from the verdict prompt.
* ``rm``: TRL ``RewardTrainer`` in Ray Train on the train preference pairs (a sequence-
  classification head on the judge's backbone), then a calibration fitted on the train
  episodes (``critic_calibration.json``).

The model folder is ``<run.root>/<critic_training.output_dir>/<stage>/model``: use it as
``engines.judge.model`` with ``agents.critic.text_judge_mode=verdict`` (SFT) or as
``agents.critic.reward_model`` with the ``reward_model`` scorer (RM). Last line:
``RESULT stage=... model=... steps=... train_loss=... minutes=...``.
The package must be importable (``pip install -e .``, or ``PYTHONPATH`` at the repository root).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from worldagent_ray.env import apply_env_defaults  # noqa: E402

apply_env_defaults(offline=False)  # quiet logs now; offline switches once the config is known

from worldagent_ray.runtime.job import job_parser, start_job  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = job_parser(__doc__, example="critic_training.max_steps=50")
    p.add_argument("--stage", required=True, choices=["data", "sft", "rm"])
    p.add_argument("--data", help="reuse a folder written by --stage data instead of exporting again")
    return p.parse_args(argv)


def calibrate(model_dir: str, records: list[dict]) -> dict[str, float]:
    """Fit and save the reward model's calibration on labelled train episodes."""
    from worldagent_ray.critic.reward_model import Calibration, HFRewardModel, fit_calibration
    from worldagent_ray.datasets.critic import rm_conversation

    rm = HFRewardModel(model_dir)
    logits = rm.logits([rm_conversation(r) for r in records])
    cal = fit_calibration(logits, [bool(r["success"]) for r in records])
    cal.save(model_dir)
    acc = sum((Calibration(cal.center, cal.scale).reward(x) >= 0.5) == bool(r["success"])
              for x, r in zip(logits, records)) / len(records)
    return {"center": cal.center, "scale": cal.scale, "train_success_acc": acc}


def main(argv=None) -> int:
    import ray

    from worldagent_ray.runtime.critic_trainer import export_critic_data, launch_critic_trainer
    from worldagent_ray.runtime.train_progress import fit_with_progress, progress_queue

    args = parse_args(argv)
    t0 = time.perf_counter()
    cfg = start_job(args.profile, args.overrides)
    if cfg is None:
        return 2
    root = os.path.join(cfg.run.root, cfg.critic_training.output_dir)
    try:
        data_dir = args.data or os.path.join(root, "data")
        if args.data:
            split = "sft_train" if args.stage == "sft" else "pairs_train"
            data = {"records": ray.data.read_parquet(os.path.join(data_dir, "records")),
                    split: ray.data.read_parquet(os.path.join(data_dir, split))}
        else:
            if os.path.exists(data_dir):
                shutil.rmtree(data_dir)
            data = export_critic_data(cfg, data_dir)
        counts = {k: ds.count() for k, ds in data.items()}
        if "pairs_train" in data and "kind" in data["pairs_train"].schema().names:
            counts["of_which_anchor_pairs_train"] = data["pairs_train"].filter(expr="kind == 'anchor'").count()
        print(f"critic data in {data_dir}: " + ", ".join(f"{k}={n}" for k, n in counts.items()), flush=True)
        if args.stage == "data":
            print(f"RESULT stage=data rows={counts['records']} minutes={(time.perf_counter() - t0) / 60:.1f}")
            return 0
        train = data["sft_train" if args.stage == "sft" else "pairs_train"]
        queue = progress_queue()
        result = fit_with_progress(
            launch_critic_trainer(cfg, args.stage, train, os.path.join(root, args.stage, "ray"), progress=queue),
            queue, f"critic {args.stage}")
        if result.error is not None:
            raise SystemExit(f"critic {args.stage} training failed: {result.error}")
        model_dir = os.path.join(root, args.stage, "model")
        if os.path.exists(model_dir):
            shutil.rmtree(model_dir)
        result.checkpoint.to_directory(model_dir)
        m = dict(result.metrics)
        if args.stage == "rm":
            records = data["records"].filter(lambda r: r["split"] == "train").take_all()
            m.update(calibrate(model_dir, records))
        print(json.dumps({k: v for k, v in m.items() if isinstance(v, (int, float, str))}), flush=True)
        print(f"RESULT stage={args.stage} model={model_dir} steps={m.get('steps')} "
              f"train_loss={m.get('train_loss', float('nan')):.4f} minutes={(time.perf_counter() - t0) / 60:.1f}")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
