"""What the entry points in ``jobs/`` share: the ``--profile``/``--set`` arguments, loading
the config (a bad profile or override is one ``error: ...`` line on stderr and exit status 2),
the process defaults for that config, and joining Ray.

A job sets the quiet defaults first (``apply_env_defaults(offline=False)`` at the top of the
file, before anything imports Ray), then::

    p = job_parser(__doc__, example="training.sft.max_steps=100")
    ...  # its own arguments
    args = p.parse_args(argv)
    cfg = start_job(args.profile, args.overrides)
    if cfg is None:
        return 2

Ray is imported only by :func:`start_job`, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING

from ..config import ConfigError, load_config
from ..env import apply_env_defaults

if TYPE_CHECKING:
    from ..config import Config


def job_parser(doc: str | None, *, example: str) -> argparse.ArgumentParser:
    """A parser with the job's docstring as help and the ``--profile`` and repeatable
    ``--set KEY=VALUE`` arguments (``args.profile``, ``args.overrides``); ``example`` is the
    override shown in ``--set``'s help."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="local-cpu", help="profile name or YAML path (default: local-cpu)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"config override, e.g. {example} (repeatable)")
    return p


def load_job_config(profile: str, overrides: list[str]) -> "Config | None":
    """The validated config with its process defaults applied (``apply_env_defaults(cfg=...)``:
    offline when no model needs the hub), or None after printing ``error: ...`` to stderr."""
    try:
        cfg = load_config(profile, overrides=overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    apply_env_defaults(cfg=cfg)
    return cfg


def start_job(profile: str, overrides: list[str]) -> "Config | None":
    """:func:`load_job_config`, then join Ray (``RAY_ADDRESS``/``resources.ray_address``) or start
    a local one without a dashboard. None when the config is bad (Ray is not touched then)."""
    cfg = load_job_config(profile, overrides)
    if cfg is not None:
        from .cluster import connect

        connect(cfg, dashboard=False)
    return cfg


def timestamped_out(cfg: "Config", kind: str) -> str:
    """``<run.root>/<kind>-<YYYYmmdd-HHMMSS>/model``: where a training job writes its model when
    it is given no ``--out``."""
    return os.path.join(cfg.run.root, f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}", "model")
