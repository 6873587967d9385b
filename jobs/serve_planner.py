"""Serve the planner (``plan`` mode): plan by imagination over HTTP.

    python jobs/serve_planner.py --profile local-cpu          # serves until Ctrl-C
    curl -s -X POST http://127.0.0.1:8000/plan -d '{"goal": "Crack an egg into the bowl and whisk it"}'
    python jobs/serve_planner.py --once "Wash and slice the tomato" --set planner.method=best_of_n

The route binds to ``planner.http_host:planner.http_port`` (127.0.0.1:8000 by default) at
``planner.route_prefix``; budgets come from the ``planner`` section (``--set planner.iterations=5``).
With ``--once`` the job plans one goal through the service, prints the result as JSON and exits.
"""

from __future__ import annotations

import json
import signal
import sys
import threading

from worldagent_ray.runtime.job import job_parser, start_job


def main(argv=None) -> int:
    p = job_parser(__doc__, example="planner.iterations=5")
    p.add_argument("--once", metavar="GOAL", help="plan this goal, print the PlanResult JSON and exit")
    args = p.parse_args(argv)
    cfg = start_job(args.profile, args.overrides)
    if cfg is None:
        return 2
    from ray import serve

    from worldagent_ray.runtime.planner_deployment import serve_planner

    try:
        handle = serve_planner(cfg)
        url = f"http://{cfg.planner.http_host}:{cfg.planner.http_port}{cfg.planner.route_prefix}"
        if args.once:
            res = handle.plan.remote({"goal": args.once}).result(timeout_s=cfg.planner.time_budget_s + 600)
            print(json.dumps(res.model_dump(mode="json"), indent=2))
            return 0
        print(f"planner ready: POST {url}  (Ctrl-C stops it)", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(3600):
                pass
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        serve.shutdown()


if __name__ == "__main__":
    sys.exit(main())
