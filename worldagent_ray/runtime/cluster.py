"""Connecting the driver to Ray: join the cluster named by ``RAY_ADDRESS`` / the config (what
``ray job submit`` sets), or start a local Ray bound to 127.0.0.1 with its dashboard.

The job's runtime environment forwards only an allowlist of variables (offline switches, cache
locations, vLLM and log settings). Secrets never travel: a variable whose name looks like a
credential (``*TOKEN*``, ``*SECRET*``, ``*KEY*``, ``*PASSWORD*``, ``*CREDENTIAL*``) is never
forwarded, whatever the allowlist says; workers get credentials from their own environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import ray

from ..config import Config

NAMESPACE = "worldagent"
FORWARDED_PREFIXES = (
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_DISABLE_TELEMETRY",
    "VLLM_", "WORLDAGENT_CACHE", "RUST_LOG", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS",
)
SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "CREDENTIAL", "KEY")


def job_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables forwarded into the job's workers (see the module docstring)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items()
            if k.startswith(FORWARDED_PREFIXES) and not any(m in k.upper() for m in SECRET_MARKERS)}


@dataclass
class ClusterInfo:
    address: str
    dashboard_url: str | None
    started_locally: bool


def connect(cfg: Config, *, dashboard: bool = True) -> ClusterInfo:
    """Join or start Ray (idempotent: an initialised Ray is reused)."""
    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        return ClusterInfo(ctx.gcs_address, _dashboard_url(), False)
    address = cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": job_env()}
    if address:
        ray.init(address=address, namespace=NAMESPACE, runtime_env=runtime_env, log_to_driver=False)
        return ClusterInfo(ray.get_runtime_context().gcs_address, _dashboard_url(), False)
    ctx = ray.init(num_cpus=cfg.resources.ray_num_cpus, namespace=NAMESPACE, include_dashboard=dashboard,
                   dashboard_host="127.0.0.1", runtime_env=runtime_env, log_to_driver=False,
                   _node_ip_address="127.0.0.1")
    url = getattr(ctx, "dashboard_url", None) or None
    return ClusterInfo(ray.get_runtime_context().gcs_address, f"http://{url}" if url and "://" not in url else url,
                       True)


def _dashboard_url() -> str | None:
    try:
        url = ray.worker.get_dashboard_url()
    except Exception:
        return None
    return f"http://{url}" if url and "://" not in url else (url or None)


def shutdown(started_locally: bool) -> None:
    """Disconnect; a locally started Ray is stopped."""
    if ray.is_initialized():
        ray.shutdown()
