"""The main job: run the self-evolving loop (the same as ``worldagent run``).

    python jobs/evolve.py --profile local-cpu                 # starts a local Ray (dashboard on 127.0.0.1)
    ray job submit --working-dir . -- python jobs/evolve.py --profile gpu-cluster --learn
    python jobs/evolve.py --resume runs/evolve-20261122-101500
    python jobs/evolve.py --profile local-cpu --attach        # use apps started with `serve deploy`

Overrides: ``--set run.iterations=20 --set agents.action.group_size=8`` or environment
variables ``WORLDAGENT__RUN__ITERATIONS=20``. ``python jobs/evolve.py --help`` lists every flag.
"""

from __future__ import annotations

import sys

from worldagent_ray.cli import app

if __name__ == "__main__":
    sys.exit(app(["run", *sys.argv[1:]], prog_name="jobs/evolve.py"))
