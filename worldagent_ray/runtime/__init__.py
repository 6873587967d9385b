"""The thin Ray shell: Serve deployments (``XxxDeployment`` classes, ``xxx_app(cfg)`` factories),
actors (``XxxActor`` classes, ``create_xxx_actor(...)`` factories), the learner's Ray Train loop,
the Ray adapter of the driver's contract (``services.py``), placement (``placement.py``), every
Ray metric (``metrics.py``) and what the ``jobs/`` entry points share (``job.py``).

The pure cores (``schemas config models engines agents world critic memory rl datasets``) never
import Ray and the driver (``orchestration/``) reaches it only through this package;
``tests/unit/test_layout.py`` keeps that rule.
"""
