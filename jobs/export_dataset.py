"""Export video-action pairs (goal, plan, per-step actions with frame ranges, scores, success,
policy version, and the mp4s) from world memory, with Ray Data.

    python jobs/export_dataset.py --run runs/evolve-20261122-101500 --phase 2 --phase 3 --success
    ray job submit --working-dir . -- python jobs/export_dataset.py --profile gpu-cluster \\
        --run runs/evolve-20261122-101500 --out s3://bucket/datasets/kitchen-v1 --min-reward 0.5

Filters and sharding come from the ``export`` config section (``--set export.rows_per_file=500``);
the flags below are shortcuts for them. Read the result with
``worldagent_ray.datasets.video_action.VideoActionDataset(out)``. Last line:
``RESULT rows=... selected=... out=...``.
"""

from __future__ import annotations

import sys

from worldagent_ray.runtime.job import job_parser, start_job


def parse_args(argv=None):
    p = job_parser(__doc__, example="export.video_shards=64")
    p.add_argument("--run", dest="runs", action="append", default=[], metavar="RUN_DIR",
                   help="run folder whose memory is exported (repeatable)")
    p.add_argument("--memory", dest="memory_uris", action="append", default=[], metavar="URI",
                   help="a memory table to export too: <memory uri>/<table>.lance (repeatable)")
    p.add_argument("--out", help="output folder or URI (default: export.out or <run.root>/datasets/video_action)")
    p.add_argument("--phase", dest="phases", action="append", type=int, help="keep this phase (repeatable)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--success", dest="success", action="store_const", const=True, help="successes only")
    g.add_argument("--failures", dest="success", action="store_const", const=False, help="failures only")
    p.add_argument("--min-reward", type=float, help="keep episodes with reward >= this")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.phases:
        overrides.append(f"export.phases=[{','.join(map(str, args.phases))}]")
    if args.success is not None:
        overrides.append(f"export.success={'true' if args.success else 'false'}")
    if args.min_reward is not None:
        overrides.append(f"export.min_reward={args.min_reward}")
    cfg = start_job(args.profile, overrides)
    if cfg is None:
        return 2
    from worldagent_ray.runtime.dataset_export import export_video_action

    try:
        manifest = export_video_action(cfg, runs=args.runs, memory_uris=args.memory_uris, out=args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {manifest['rows']} video-action pairs ({manifest['skipped']} selected episodes had no video) "
          f"to {manifest['out']} in {manifest['elapsed_s']:.1f}s")
    print(f"RESULT rows={manifest['rows']} selected={manifest['episodes_selected']} out={manifest['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
