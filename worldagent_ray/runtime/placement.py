"""Placement options for Serve deployments and actors, from one ``PartResources`` section."""

from __future__ import annotations

from typing import Any

from ..config import PartResources


def actor_options(res: PartResources) -> dict[str, Any]:
    """``num_cpus``, ``num_gpus`` and custom ``resources`` of one replica or actor."""
    opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.custom:
        opts["resources"] = dict(res.custom)
    return opts


def deployment_options(res: PartResources) -> dict[str, Any]:
    """Serve ``.options(...)`` of a deployment: per-replica resources, and either a fixed
    replica count or an autoscaling config, and the ongoing-request limit."""
    opts: dict[str, Any] = {
        "ray_actor_options": actor_options(res),
        "max_ongoing_requests": res.max_ongoing_requests,
    }
    if res.autoscaling is not None:
        a = res.autoscaling
        opts["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                      "target_ongoing_requests": a.target_ongoing_requests}
    else:
        opts["num_replicas"] = res.replicas
    return opts
