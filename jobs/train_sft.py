"""Phase 1 of seed 000: supervised fine-tuning of the Action policy (TRL SFTTrainer on Ray Train).

    python jobs/train_sft.py --profile local-cpu --out runs/sft/model
    python jobs/train_sft.py --memory runs/evolve-20261122-101500/artifacts/memory --set training.sft.lora=true
    ray job submit --working-dir . -- python jobs/train_sft.py --profile gpu-cluster --out s3://bucket/sft/model

Data (Ray Data): every train-split composition of ``training.sft.phases`` with its reference
plan, in the Action agent's exact prompt format, plus (``--memory``) successful train-split
episodes of a run's memory. The output folder is a complete Hugging Face model: use it as the
policy with ``python jobs/evolve.py --set engines.policy.model=<out>``. Running the same command
again resumes from TRL's checkpoints in ``<out>.work``. Prints ``RESULT`` with the output folder.
"""

from __future__ import annotations

import json
import sys
import time

from worldagent_ray.env import apply_env_defaults  # noqa: E402

apply_env_defaults(offline=False)  # quiet logs now; offline switches once the config is known

from worldagent_ray.runtime.job import job_parser, start_job, timestamped_out  # noqa: E402


def parse_args(argv=None):
    p = job_parser(__doc__, example="training.sft.max_steps=100")
    p.add_argument("--out", help="output model folder (default: <run.root>/sft-<time>/model)")
    p.add_argument("--memory", help="LanceDB memory URI of a run to add successful episodes from")
    p.add_argument("--model", help="base model (default: engines.<action engine>.model)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from worldagent_ray.runtime.sft_trainer import run_sft

    args = parse_args(argv)
    cfg = start_job(args.profile, args.overrides)
    if cfg is None:
        return 2
    out = args.out or timestamped_out(cfg, "sft")
    t0 = time.perf_counter()
    info = run_sft(cfg, out, memory_uri=args.memory, model=args.model)
    print(json.dumps(info, indent=2, default=str))
    print(f"RESULT model={info['model']} examples={info['examples']} steps={info['metrics'].get('steps')} "
          f"loss={info['metrics'].get('train_loss')} minutes={(time.perf_counter() - t0) / 60:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
