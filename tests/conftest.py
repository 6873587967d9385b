"""Shared pytest fixtures. Keep this small; component fixtures live in their test files.
Shared plain helpers (test data factories) live in ``tests/factories.py``."""

from __future__ import annotations

import os

import pytest

from worldagent_ray.env import apply_env_defaults

apply_env_defaults(offline=True)  # tests never reach a model hub


@pytest.fixture(scope="session")
def tiny_llama_path() -> str:
    """Local folder of the builtin ``tiny-random-llama`` (built once into the cache)."""
    from worldagent_ray.models import resolve_model

    return resolve_model("tiny-random-llama")


@pytest.fixture(scope="session")
def tiny_engine(tiny_llama_path):
    """A session-wide transformers engine on ``tiny-random-llama`` (loads in about 1 s).

    Do not load weights into it; build your own engine for that.
    """
    from worldagent_ray.config import EngineConfig
    from worldagent_ray.engines.hf import TransformersEngine

    engine = TransformersEngine(
        EngineConfig(backend="transformers", model="tiny-random-llama", dtype="float32", max_json_retries=1)
    )
    yield engine
    engine.shutdown()


# --------------------------------------------------------------------------- simulated multi-node cluster (cluster shape)
# The gpu-cluster shape on this machine: a head with no work and one node per worker group of
# cluster/rayjob.yaml (labels and custom resources of the group, sized for the cluster-sim
# profile; see tests.factories.sim_nodes / start_sim_cluster). One cluster per test module
# (about 1 GB and 10 s to start); always torn down.
#
# Token auth everywhere: Ray 2.60 reads RAY_AUTH_MODE once per process (later changes are not
# seen) and turns token auth on only for clusters it starts itself, never when joining an
# address; so it is set here, before any test imports Ray. Local `ray.init()` clusters use token
# auth by default in 2.60 anyway, with the same ~/.ray/auth_token.
os.environ.setdefault("RAY_AUTH_MODE", "token")


@pytest.fixture(scope="module")
def sim_cluster():
    """A running simulated cluster (:class:`tests.factories.SimCluster`): ``gcs``,
    ``dashboard``, ``env`` (token auth for client processes) and ``nodes`` ({"head", "llm",
    "video"}: node id)."""
    from pathlib import Path

    import yaml

    from tests.factories import rayjob_groups, sim_nodes, start_sim_cluster, stop_sim_cluster
    from worldagent_ray.config import load_config

    root = Path(__file__).resolve().parents[1]
    groups = rayjob_groups(yaml.safe_load((root / "cluster" / "rayjob.yaml").read_text()))
    nodes = sim_nodes(load_config("cluster-sim", environ={}), groups)
    # Ray workers import this checkout (also when the test runs from another folder)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    cluster = start_sim_cluster(nodes, env=env)
    try:
        yield cluster
    finally:
        stop_sim_cluster(cluster)
