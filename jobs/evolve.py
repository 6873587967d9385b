"""The main job: run the self-evolving loop.

    python jobs/evolve.py --profile local-cpu                 # starts a local Ray
    ray job submit --working-dir . -- python jobs/evolve.py --profile gpu-cluster
    python jobs/evolve.py --resume runs/evolve-20261122-101500
    python jobs/evolve.py --learn                             # rollouts and GRPO at once

Overrides: ``--set run.iterations=20 --set agents.action.group_size=8`` or environment
variables ``WORLDAGENT__RUN__ITERATIONS=20``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RUST_LOG", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from worldagent_ray.config import ConfigError, load_config  # noqa: E402
from worldagent_ray.orchestration.main import print_summary, run_evolve  # noqa: E402
from worldagent_ray.orchestration.run_folder import RunFolder  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="local-cpu", help="profile name or YAML path (default: local-cpu)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. run.iterations=10 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run folder without duplicating or losing episodes")
    p.add_argument("--learn", action="store_true", help="run the asynchronous GRPO learner alongside the rollouts")
    p.add_argument("--run-name", help="name of the run folder (default: <run.name>-<timestamp>)")
    p.add_argument("--stop-after-episodes", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line too")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.resume:
            run = RunFolder.open(args.resume)
            cfg = run.load_config()
            if args.overrides:
                from worldagent_ray.config import apply_overrides, validate_tree

                tree = cfg.model_dump(mode="json")
                apply_overrides(tree, args.overrides)
                cfg = validate_tree(tree, source="--set")
                run.save_config(cfg)
        else:
            cfg = load_config(args.profile, overrides=args.overrides)
            if args.learn:
                cfg.learner.enabled = True
            run = RunFolder.create(cfg, args.run_name)
    except (ConfigError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = run_evolve(cfg, run, learn=args.learn or cfg.learner.enabled,
                         stop_after_episodes=args.stop_after_episodes)
    print_summary(summary)
    if summary.get("interrupted"):
        print(f"interrupted; continue with: python jobs/evolve.py --resume {run.local}", file=sys.stderr)
    if args.json:
        print("SUMMARY " + json.dumps(summary, default=str))
    return 130 if summary.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
