"""Offline DPO of the Action policy with TRL's DPOTrainer (on Ray Train) on pairs from memory.

    python jobs/train_dpo.py --memory runs/evolve-.../artifacts/memory --model runs/sft/model --out runs/dpo/model

Pairs: in each group of train-split episodes in memory, the best-rewarded completion (chosen)
and the worst (rejected), when their rewards differ by ``training.dpo.margin``; the completions
are what the model wrote. The reference model is ``--model`` itself. Prints ``RESULT``.
"""

from __future__ import annotations

import json
import sys
import time

from worldagent_ray.env import apply_env_defaults  # noqa: E402

apply_env_defaults(offline=False)  # quiet logs now; offline switches once the config is known

from worldagent_ray.runtime.job import job_parser, start_job, timestamped_out  # noqa: E402


def parse_args(argv=None):
    p = job_parser(__doc__, example="training.dpo.beta=0.2")
    p.add_argument("--memory", required=True, help="LanceDB memory URI of a run")
    p.add_argument("--model", help="policy to start from, also the reference (default: the policy engine's model)")
    p.add_argument("--out", help="output model folder (default: <run.root>/dpo-<time>/model)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from worldagent_ray.runtime.sft_trainer import run_dpo

    args = parse_args(argv)
    cfg = start_job(args.profile, args.overrides)
    if cfg is None:
        return 2
    out = args.out or timestamped_out(cfg, "dpo")
    t0 = time.perf_counter()
    try:
        info = run_dpo(cfg, out, memory_uri=args.memory, model=args.model or cfg.engines[cfg.agents.action.engine].model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2, default=str))
    print(f"RESULT model={info['model']} pairs={info['pairs']} steps={info['metrics'].get('steps')} "
          f"minutes={(time.perf_counter() - t0) / 60:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
