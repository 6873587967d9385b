"""The cluster shape (issue 10, items 1 and 6): the manifests in ``cluster/`` pass Ray's and
KubeRay's own validation and provide the GPUs (and the custom resources that pin each part to
its worker group) that the gpu-cluster profile needs with ``--learn``; cluster-sim differs from
gpu-cluster only in model names, sizes, counts, device settings and the bucket."""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from tests.factories import (
    GROUP_LABEL,
    gpus_by_part,
    launcher_groups,
    pack,
    profile_bundles,
    rayjob_groups,
    sim_nodes,
)
from worldagent_ray.config import load_config
from worldagent_ray.models import is_builtin

ROOT = Path(__file__).resolve().parents[2]
RAYJOB = ROOT / "cluster" / "rayjob.yaml"
LAUNCHER = ROOT / "cluster" / "launcher.yaml"
CRD = ROOT / "tests" / "data" / "kuberay" / "ray.io_rayjobs.yaml"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the vendored CRD is 220 KB


def _yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_Loader)


@pytest.fixture(scope="module")
def gpu():
    return load_config("gpu-cluster", environ={})


@pytest.fixture(scope="module")
def sim():
    return load_config("cluster-sim", environ={})


@pytest.fixture(scope="module")
def crd_schema() -> dict:
    crd = _yaml(CRD)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "RayJob"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


# --------------------------------------------------------------------------- GPUs that fit


def test_gpu_cluster_needs_nine_gpus_with_learn(gpu):
    """The need the issue names: policy 2 + judge 1 + learner 4 + world min 2 = 9 GPUs."""
    assert gpus_by_part(profile_bundles(gpu, learn=True)) == {
        "engine-policy": 2, "engine-judge": 1, "learner": 4, "world": 2}


@pytest.mark.parametrize("manifest", ["rayjob", "launcher"])
def test_manifest_provides_what_gpu_cluster_needs(gpu, manifest):
    """Every replica and learner worker of gpu-cluster --learn finds a node at the groups' MIN
    sizes (CPU, GPU and the custom resource of its group, all on one node), and the world's MAX
    replicas fit at the groups' max sizes; totals are checked too, for a clear message."""
    groups = rayjob_groups(_yaml(RAYJOB)) if manifest == "rayjob" else launcher_groups(_yaml(LAUNCHER))
    need = profile_bundles(gpu, learn=True)
    have_gpus = sum(g.resources.get("GPU", 0) * g.count_min for g in groups)
    assert have_gpus >= sum(b.gpus for b in need), (have_gpus, gpus_by_part(need))
    for res in ("llm_gpu", "video_gpu"):
        have = sum(g.resources.get(res, 0) * g.count_min for g in groups)
        assert have >= sum(b.custom.get(res, 0) for b in need), res
    assert pack(need, groups, at="min") == []
    assert pack(profile_bundles(gpu, learn=True, world="max"), groups, at="max") == []


def test_the_fit_check_fails_on_a_shape_that_does_not_fit(gpu):
    """The check can fail: the pre-fix RayJob shape (llm 3 x 1 GPU, no custom resources) and a
    learner of 8 workers both leave replicas without a node."""
    job = _yaml(RAYJOB)
    llm = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    llm.update(minReplicas=3, resources={})
    llm["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "1"
    left = pack(profile_bundles(gpu, learn=True), rayjob_groups(job))
    assert {b.part for b in left} >= {"learner"}
    big = load_config("gpu-cluster", overrides=["learner.num_workers=8"], environ={})
    left = pack(profile_bundles(big), rayjob_groups(_yaml(RAYJOB)))
    assert sum(b.custom.get("llm_gpu", 0) for b in left) == 2 + 1 + 8 - 8  # 11 llm GPUs asked, 8 there


def test_rayjob_and_launcher_have_the_same_worker_groups():
    """Both manifests describe one cluster: the same groups (by label), per-node GPUs and custom
    resources, node counts; each group declares one custom resource per GPU and its label."""
    job = {g.name: g for g in rayjob_groups(_yaml(RAYJOB))}
    launch = {g.name: g for g in launcher_groups(_yaml(LAUNCHER))}
    assert set(job) == set(launch) == {"head", "llm", "video"}
    assert job["head"].resources["CPU"] == launch["head"].resources["CPU"] == 0  # no work on the head
    for name in ("llm", "video"):
        j, lw = job[name], launch[name]
        assert j.labels == lw.labels == {GROUP_LABEL: name}
        assert j.custom() == lw.custom() == {f"{name}_gpu": j.resources["GPU"]}
        assert j.resources["GPU"] == lw.resources["GPU"] and j.resources["CPU"] <= lw.resources["CPU"]
        assert (j.count_min, j.count_max) == (lw.count_min, lw.count_max)


def test_video_group_scales_like_the_world(gpu):
    """The video group's min/max node counts are the world's autoscaling bounds (one replica
    per video GPU), and the RayJob starts at its minimum."""
    (video,) = [g for g in rayjob_groups(_yaml(RAYJOB)) if g.name == "video"]
    a = gpu.resources.world.autoscaling
    per_node = video.resources["video_gpu"] / gpu.resources.world.custom["video_gpu"]
    assert (video.count_min * per_node, video.count_max * per_node) == (a.min_replicas, a.max_replicas)


# --------------------------------------------------------------------------- Ray's and KubeRay's own validation


def test_launcher_passes_rays_own_config_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_yaml(LAUNCHER)))


def test_rays_validation_rejects_a_node_type_without_resources():
    """The failure the launcher had: a node type with no ``resources``."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    conf = _yaml(LAUNCHER)
    del conf["available_node_types"]["video"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="'resources' is a required property"):
        validate_config(prepare_config(conf))


def _strict(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever it lists ``properties`` and does
    not keep unknown fields: Kubernetes silently prunes unknown fields of a CRD object, so a
    misspelt key (``enableInTreeAutoScaling``) would validate and then do nothing."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _errors(schema: dict, doc: dict) -> list[str]:
    import jsonschema

    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}"
            for e in jsonschema.Draft4Validator(schema).iter_errors(doc)]


def test_rayjob_validates_against_the_kuberay_crd(crd_schema):
    job = _yaml(RAYJOB)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert _errors(crd_schema, job) == []
    assert _errors(_strict(crd_schema), job) == []  # and no field Kubernetes would silently drop


@pytest.mark.parametrize("path, value, needle", [
    (("spec", "rayClusterSpec", "authOptions", "mode"), "tokens", "is not one of ['disabled', 'token']"),
    (("spec", "rayClusterSpec", "workerGroupSpecs", 1, "minReplicas"), "2", "is not of type 'integer'"),
    (("spec", "rayClusterSpec", "enableInTreeAutoScaling"), True, "Additional properties are not allowed"),
])
def test_the_crd_check_catches_mistakes(crd_schema, path, value, needle):
    job = _yaml(RAYJOB)
    node = job
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    assert any(needle in e for e in _errors(_strict(crd_schema), job)), _errors(_strict(crd_schema), job)


def test_rayjob_autoscales_and_requires_a_token():
    spec = _yaml(RAYJOB)["spec"]
    rc = spec["rayClusterSpec"]
    assert rc["enableInTreeAutoscaling"] is True
    head = rc["headGroupSpec"]["rayStartParams"]
    if head.get("dashboard-host", "127.0.0.1") not in ("127.0.0.1", "localhost"):
        assert rc.get("authOptions", {}).get("mode") == "token", "dashboard on the network without token auth"
    assert head.get("num-cpus") == "0"
    args = shlex.split(spec["entrypoint"])
    assert args[:2] == ["python", "jobs/evolve.py"] and "--learn" in args
    load_config(args[args.index("--profile") + 1], environ={})  # the profile exists and validates


def test_launcher_keeps_the_dashboard_local_and_requires_a_token():
    conf = _yaml(LAUNCHER)
    head, workers = " ".join(conf["head_start_ray_commands"]), " ".join(conf["worker_start_ray_commands"])
    assert "0.0.0.0" not in head + workers
    assert re.search(r"ray start --head .*--dashboard-host=127\.0\.0\.1", head)
    for cmds in (head, workers):
        starts = [c for c in cmds.split(";") if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), cmds
    assert "~/.ray/auth_token" in conf["file_mounts"]  # one token on every node


# --------------------------------------------------------------------------- cluster-sim mirrors gpu-cluster

MISSING = object()

ALLOWED_DIFFERENCES = {
    # model names
    "engines.*.model": "model", "world.diffusers.model": "model", "memory.embedder": "model",
    # device settings
    "engines.*.backend": "device", "engines.*.dtype": "device", "engines.*.enforce_eager": "device",
    "world.diffusers.dtype": "device", "learner.backend": "device", "learner.use_gpu": "device",
    "resources.*num_gpus": "device",
    # sizes
    "engines.*.max_model_len": "size", "engines.*.max_num_seqs": "size", "agents.action.max_steps": "size",
    "agents.action.max_tokens": "size", "agents.critic.max_tokens": "size",
    "agents.action.max_action_chars": "size", "agents.critic.caption_max_chars": "size",
    "world.diffusers.num_inference_steps": "size", "world.diffusers.height": "size",
    "world.diffusers.width": "size", "world.diffusers.num_frames": "size", "resources.*num_cpus": "size",
    # counts
    "agents.action.group_size": "count", "agents.curriculum.window": "count",
    "agents.curriculum.tasks_per_proposal": "count",
    "learner.groups_per_step": "count", "learner.num_workers": "count", "resources.*replicas": "count",
    "run.iterations": "count", "run.pipeline.*.workers": "count", "run.pipeline.*.queue": "count",
    # where things are stored: the same scheme and key path, another bucket (checked below)
    "run.root": "bucket", "memory.uri": "bucket",
    "profile": "name",
}
"""Field paths (fnmatch patterns) in which cluster-sim may differ from gpu-cluster; every other
field must be equal. ``resources.*replicas`` covers ``replicas`` and the autoscaling bounds."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if tree else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def profile_differences(a, b) -> dict[str, tuple[Any, Any]]:
    fa, fb = _flatten(a.model_dump(mode="json")), _flatten(b.model_dump(mode="json"))
    return {k: (fa.get(k, MISSING), fb.get(k, MISSING)) for k in sorted(set(fa) | set(fb))
            if fa.get(k, MISSING) != fb.get(k, MISSING)}


def disallowed(diffs: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    bad = {}
    for path, (x, y) in diffs.items():
        kind = next((v for p, v in ALLOWED_DIFFERENCES.items() if fnmatch.fnmatchcase(path, p)), None)
        if kind is None or MISSING in (x, y):
            bad[path] = (x, y)
        elif kind == "bucket":
            ux, uy = urlparse(str(x)), urlparse(str(y))
            if (ux.scheme, ux.path) != (uy.scheme, uy.path) or ux.scheme != "s3":
                bad[path] = (x, y)
    return bad


def test_cluster_sim_differs_from_gpu_cluster_only_where_allowed(gpu, sim):
    diffs = profile_differences(gpu, sim)
    assert disallowed(diffs) == {}
    # and it is the gpu-cluster shape: the same parts on the same custom resources
    assert {p for p in diffs if p.startswith("resources.") and ".custom." in p} == set()
    assert {"engines.policy.model", "world.diffusers.model", "learner.num_workers"} <= set(diffs)


def test_the_profile_check_catches_a_difference(gpu):
    other = load_config("cluster-sim", overrides=["learner.loss_type=grpo", "resources.world.custom={}",
                                                  "run.root=s3://b/elsewhere", "memory.uri=/local/memory"],
                        environ={})
    assert set(disallowed(profile_differences(gpu, other))) == {
        "learner.loss_type", "resources.world.custom", "resources.world.custom.video_gpu", "run.root", "memory.uri"}


def test_cluster_sim_has_the_cluster_features(sim):
    assert sim.engines["policy"].model == sim.engines["judge"].model == "tiny-random-qwen2.5-vl"
    assert sim.agents.critic.scorers == ["vlm_judge"] and sim.world.backend == "diffusers"
    assert sim.world.diffusers.model == "tiny-wan-ti2v"
    assert sim.learner.lora and sim.learner.num_workers == 2 and sim.learner.sync_method == "collective"
    assert sim.learner.backend == "gloo" and not sim.learner.use_gpu
    assert urlparse(sim.run.root).scheme == "s3"
    assert "AWS" not in json.dumps(sim.model_dump(mode="json"))  # endpoint and keys come from the environment


@pytest.mark.skipif(not is_builtin("tiny-random-qwen2.5-vl"),
                    reason="the tiny-random-qwen2.5-vl builtin arrives with the learner work (branch wp-learner)")
def test_cluster_sim_models_are_all_built_offline(sim):
    from worldagent_ray.env import config_models, needs_hub

    assert not needs_hub(config_models(sim))


def test_sim_nodes_mirror_the_rayjob_groups_and_fit_cluster_sim(sim):
    """The simulated cluster's nodes (tests/conftest.py) carry the RayJob groups' labels and
    custom resources, sized so that cluster-sim --learn fits at the world's max replicas."""
    from tests.factories import NodeGroup

    groups = rayjob_groups(_yaml(RAYJOB))
    nodes = sim_nodes(sim, groups)
    assert set(nodes) == {"llm", "video"}
    assert nodes["llm"]["labels"] == {GROUP_LABEL: "llm"} and nodes["video"]["labels"] == {GROUP_LABEL: "video"}
    assert nodes["llm"]["resources"]["llm_gpu"] == 5 and nodes["video"]["resources"]["video_gpu"] == 2
    sim_groups = [NodeGroup("head", 1, 1, {"CPU": 0}, {})] + [
        NodeGroup(n, 1, 1, d["resources"], d["labels"]) for n, d in nodes.items()]
    assert pack(profile_bundles(sim, learn=True, world="max"), sim_groups) == []
    # the pinning is real: without the video node the world has nowhere to go
    assert {b.part for b in pack(profile_bundles(sim), sim_groups[:2])} == {"world"}


def test_strict_schema_helper_leaves_open_maps_open():
    schema = {"type": "object", "properties": {"a": {"type": "object", "additionalProperties": {"type": "string"}}}}
    assert _errors(_strict(schema), {"a": {"anything": "x"}}) == []
    assert _errors(_strict(schema), {"b": 1}) != []
    assert copy.deepcopy(schema) == schema


# --------------------------------------------------------------------------- documented commands = tested ones


def _doc_block(heading: str) -> list[str]:
    text = (ROOT / "cluster" / "local.md").read_text()
    block = text.split(heading, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [ln for ln in block.splitlines() if ln.strip()]


def _env_and_argv(line: str) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(line)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    return env, words


def test_local_md_documents_the_commands_the_simulated_cluster_runs(sim):
    """cluster/local.md's `ray start` lines are exactly the commands tests.factories.start_sim_cluster
    runs (it adds only free ports, temp folders and --block), and its `ray job submit` runs the
    job of tests/e2e/test_cluster_sim.py."""
    from tests.factories import SIM_JOB, sim_start_commands

    lines = [_env_and_argv(ln) for ln in _doc_block("## The gpu-cluster shape, simulated")]
    starts = [(env, argv) for env, argv in lines if argv[:2] == ["ray", "start"]]
    expected = [(extra, argv) for _, argv, extra in sim_start_commands(sim_nodes(sim, rayjob_groups(_yaml(RAYJOB))))]
    assert starts == expected
    submits = [argv for _, argv in lines if argv[:3] == ["ray", "job", "submit"]]
    assert submits == [["ray", "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".", "--",
                        *SIM_JOB]]
    assert ({}, ["export", "RAY_AUTH_MODE=token"]) in lines


def test_the_documented_token_command_creates_the_cluster_token(tmp_path):
    """`ray get-auth-token --generate` (cluster/local.md, cluster/launcher.yaml) writes the token
    every node and client shares; run here with a throw-away HOME."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)
    p = subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token", "--generate"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    token = (tmp_path / ".ray" / "auth_token").read_text()
    assert len(token) >= 32 and p.stdout.strip() == token


# A stand-in for `ray start --block` (a fault injected): gives up on its first start, as Ray does
# when its node does not register within 30 s, and registers on the next.
FLAKY_NODE = """
import os, sys, time
marker = sys.argv[1]
if not os.path.exists(marker):
    open(marker, "w").close()
    print("Exception: The current node timed out during startup.", flush=True)
    sys.exit(1)
print("Ray runtime started.", flush=True)
time.sleep(60)
"""


def test_a_node_that_gives_up_is_started_again(tmp_path):
    """tests.factories.start_node restarts a `ray start` that exits before its node registered,
    and returns the running one; a node that never registers fails with its log."""
    import os
    import sys

    from tests.factories import kill_group, start_node

    cmd = [sys.executable, "-c", FLAKY_NODE, str(tmp_path / "tried")]
    proc = start_node("llm", cmd, dict(os.environ), tmp_path, deadline_s=60)
    try:
        assert proc.poll() is None
        log = (tmp_path / "llm.log").read_text()
        assert log.count("=== ") == 2 and "timed out during startup" in log and "Ray runtime started." in log
    finally:
        kill_group(proc)
    never = [sys.executable, "-c", "import sys; print('no luck'); sys.exit(1)"]
    with pytest.raises(RuntimeError, match="(?s)the video node of the simulated cluster did not start.*no luck"):
        start_node("video", never, dict(os.environ), tmp_path, deadline_s=60)
    assert (tmp_path / "video.log").read_text().count("=== ") == 3  # three attempts in all
