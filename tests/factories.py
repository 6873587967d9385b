"""Test data factories shared by several test folders (plain functions, no fixtures)."""

from __future__ import annotations

import contextlib
import json
import math
import random
import subprocess
from typing import Any

from worldagent_ray.schemas import ScoredGroup


def make_groups(seed: int, n_groups: int = 2, group_size: int = 4, version: int = 0) -> list[ScoredGroup]:
    """Deterministic synthetic groups (random ids, rewards and rollout log-probs)."""
    rng = random.Random(seed)
    out = []
    for g in range(n_groups):
        prompt = [rng.randrange(100, 5000) for _ in range(rng.randrange(4, 9))]
        comps = [[rng.randrange(100, 5000) for _ in range(rng.randrange(2, 7))] for _ in range(group_size)]
        out.append(
            ScoredGroup(
                group_id=f"s{seed}-g{g}",
                task_id=f"t{g}",
                policy_version=version,
                prompt_token_ids=prompt,
                completion_token_ids=comps,
                rollout_logprobs=[[-10.8 + rng.uniform(-0.3, 0.3) for _ in c] for c in comps],
                rewards=[rng.random() for _ in comps],
                episode_ids=[f"s{seed}-g{g}-{i}" for i in range(group_size)],
            )
        )
    return out


def scored_group(gid: str, version: int = 0, rewards=(0.0, 1.0), task: str = "t") -> ScoredGroup:
    """One small fixed group: ``len(rewards)`` two-token completions of a three-token prompt."""
    n = len(rewards)
    return ScoredGroup(
        group_id=gid,
        task_id=task,
        policy_version=version,
        prompt_token_ids=[1, 2, 3],
        completion_token_ids=[[10 + i, 20 + i] for i in range(n)],
        rollout_logprobs=[[-0.5, -0.25] for _ in range(n)],
        rewards=list(rewards),
        episode_ids=[f"{gid}-ep{i}" for i in range(n)],
    )


def buffer_entry(gid: str, version: int = 0, rewards=(0.0, 1.0)):
    """The rollout-buffer entry of :func:`scored_group` (its payload ref is ``payload-<gid>``)."""
    from worldagent_ray.rl.buffer import BufferEntry

    return BufferEntry.from_group(scored_group(gid, version, rewards), ref=f"payload-{gid}")



@contextlib.contextmanager
def running_engine(**engine_cfg):
    """A started inference engine for ``EngineConfig(**engine_cfg)`` (through ``build_engine``),
    shut down on exit."""
    from worldagent_ray.config import EngineConfig
    from worldagent_ray.engines.factory import build_engine

    engine = build_engine(EngineConfig(**engine_cfg))
    try:
        yield engine
    finally:
        engine.shutdown()

# --------------------------------------------------------------------------- action training (SFT / DPO data)


def sandbox_episode(task, sample: int, actions, *, success: bool, reward: float, run_id: str = "run-sft",
                    raw_output: str | None = None, group_id: str | None = None):
    """An Episode of a sandbox task with a plan and a verdict (as the driver writes them)."""
    import json

    from worldagent_ray.schemas import Episode, Plan, Scores, Verdict

    scores = Scores(action_following=reward, temporal_consistency=1.0, object_interaction=reward,
                    goal_achievement=1.0 if success else 0.0, physics=1.0)
    plan = Plan.from_actions(list(actions))
    text = raw_output if raw_output is not None else json.dumps(
        {"steps": [{"step": i + 1, "action": a} for i, a in enumerate(actions)]})
    return Episode.new(
        run_id, task, sample, group_id=group_id or f"{run_id}:{task.id}", plan=plan, raw_output=text,
        verdict=Verdict(state_caption="done" if success else "not done", success=success, scores=scores,
                        reward=reward, scorer="verifiable"),
        created_at=1.0 + sample,
    )


# --------------------------------------------------------------------------- memory episodes (work package B)

MEMORY_GOALS = {
    "apple": "put the apple in the bowl",
    "fridge": "open the fridge door",
    "plate": "wash the dirty plate in the sink",
    "eggs": "crack two eggs into a pan",
    "lights": "turn off the kitchen lights",
    "bread": "slice the bread on the cutting board",
}


def make_memory_episode(
    task_key: str,
    sample: int = 0,
    *,
    run_id: str = "run-a",
    success: bool = True,
    reward: float = 0.8,
    phase: int = 1,
    goal: str | None = None,
    notes: tuple[str, ...] = ("ok",),
    created_at: float | None = None,
):
    """An episode of task ``task-<task_key>`` (goal from :data:`MEMORY_GOALS` unless given)."""
    import time

    from worldagent_ray.schemas import Episode, Plan, Scores, Task, Verdict

    task = Task(id=f"task-{task_key}", goal=goal or MEMORY_GOALS[task_key], phase=phase)
    scores = Scores(
        action_following=reward,
        temporal_consistency=0.5,
        object_interaction=0.25,
        goal_achievement=1.0 if success else 0.0,
        physics=0.75,
    )
    return Episode.new(
        run_id,
        task,
        sample,
        plan=Plan.from_actions([f"step one of {task_key}", f"step two of {task_key}"]),
        verdict=Verdict(
            state_caption=f"{task_key} {'done' if success else 'not done'}",
            success=success,
            scores=scores,
            reward=reward,
            scorer="verifiable",
            notes=list(notes),
        ),
        created_at=time.time() if created_at is None else created_at,
    )


# ------------------------------------------------------------------ cluster shape (manifests, simulated cluster)
# What a profile reserves (one bundle per replica or worker), what a manifest provides (node
# groups), and a first-fit packing of one into the other: used by tests/unit/test_manifests.py
# and by the simulated multi-node cluster in tests/conftest.py.

GROUP_LABEL = "worldagent-ray/group"
"""The node label every worker group of cluster/rayjob.yaml and cluster/launcher.yaml sets."""


class Bundle:
    """What one replica or worker reserves: ``part`` (e.g. ``engine-policy``, ``world``), CPUs,
    GPUs and Ray custom resources."""

    def __init__(self, part: str, cpus: float, gpus: float, custom: dict[str, float]):
        self.part, self.cpus, self.gpus, self.custom = part, float(cpus), float(gpus), dict(custom)

    def demand(self) -> dict[str, float]:
        return {"CPU": self.cpus, "GPU": self.gpus, **self.custom}

    def __repr__(self) -> str:
        return f"Bundle({self.part}, {self.demand()})"


def profile_bundles(cfg, *, learn: bool = True, world: str = "min") -> list[Bundle]:
    """Every replica and worker a run of ``cfg`` reserves: engines (fixed replicas), the Serve
    parts (autoscaled parts at their ``min`` or ``max`` replicas), the memory actor and, with
    ``learn`` (or ``learner.enabled``), the learner workers (a GPU each when ``use_gpu``, as the
    Ray Train scaling config asks)."""
    from worldagent_ray.config import PartResources, used_engines

    r = cfg.resources

    def count(res, which: str) -> int:
        if res.autoscaling is None:
            return res.replicas
        return res.autoscaling.min_replicas if which == "min" else res.autoscaling.max_replicas

    out = []
    for name in used_engines(cfg):
        res = r.engines.get(name) or PartResources()
        out += [Bundle(f"engine-{name}", res.num_cpus, res.num_gpus, res.custom)] * count(res, "min")
    for part in ("action", "curriculum", "critic", "world"):
        res = getattr(r, part)
        out += [Bundle(part, res.num_cpus, res.num_gpus, res.custom)] * count(res, world if part == "world" else "min")
    if cfg.memory.enabled:
        out.append(Bundle("memory", r.memory.num_cpus, r.memory.num_gpus, r.memory.custom))
    if learn or cfg.learner.enabled:
        lr = r.learner
        gpus = (lr.num_gpus or 1) if cfg.learner.use_gpu else 0.0
        out += [Bundle("learner", lr.num_cpus, gpus, lr.custom)] * cfg.learner.num_workers
    return out


def gpus_by_part(bundles: list[Bundle]) -> dict[str, float]:
    out: dict[str, float] = {}
    for b in bundles:
        out[b.part] = out.get(b.part, 0.0) + b.gpus
    return {k: v for k, v in out.items() if v}


class NodeGroup:
    """Nodes of one kind in a manifest: ``count_min``..``count_max`` nodes, each with
    ``resources`` (CPU, GPU and custom resources) and ``labels``."""

    def __init__(self, name: str, count_min: int, count_max: int, resources: dict[str, float],
                 labels: dict[str, str]):
        self.name, self.count_min, self.count_max = name, count_min, count_max
        self.resources, self.labels = dict(resources), dict(labels)

    def custom(self) -> dict[str, float]:
        return {k: v for k, v in self.resources.items() if k not in ("CPU", "GPU", "memory")}

    def __repr__(self) -> str:
        return f"NodeGroup({self.name}, {self.count_min}..{self.count_max} x {self.resources}, {self.labels})"


def _k8s_quantity(q) -> float:
    """A Kubernetes CPU/GPU quantity ("44", 4, "500m") as a number."""
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def rayjob_groups(job: dict) -> list[NodeGroup]:
    """The node groups of a KubeRay RayJob: the head (one node, CPUs from ``num-cpus``) and
    each worker group (``minReplicas``..``maxReplicas`` nodes; CPU/GPU from the Ray container's
    limits unless ``rayStartParams`` overrides them; custom resources from the group's
    ``resources`` and ``rayStartParams.resources``; the group's ``labels``)."""
    import json

    spec = job["spec"]["rayClusterSpec"]

    def node(group: dict) -> dict[str, float]:
        limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        params = group.get("rayStartParams") or {}
        res = {"CPU": _k8s_quantity(params.get("num-cpus", limits.get("cpu", 0))),
               "GPU": _k8s_quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
        res.update({k: float(v) for k, v in (group.get("resources") or {}).items()})
        if "resources" in params:  # the rayStartParams way: JSON, often quoted once more for the shell
            extra = json.loads(params["resources"])
            res.update({k: float(v) for k, v in (json.loads(extra) if isinstance(extra, str) else extra).items()})
        return res

    head = spec["headGroupSpec"]
    out = [NodeGroup("head", 1, 1, node(head), head.get("labels") or {})]
    for g in spec.get("workerGroupSpecs") or []:
        out.append(NodeGroup(g["groupName"], int(g.get("minReplicas", 0)), int(g.get("maxReplicas", 2**31 - 1)),
                             node(g), g.get("labels") or {}))
    return out


def launcher_groups(conf: dict) -> list[NodeGroup]:
    """The node types of a Ray cluster launcher config (the head type: exactly one node)."""
    out = []
    for name, t in conf["available_node_types"].items():
        head = name == conf["head_node_type"]
        out.append(NodeGroup(name, 1 if head else int(t.get("min_workers", 0)),
                             1 if head else int(t.get("max_workers", 0)),
                             {k: float(v) for k, v in t.get("resources", {}).items()}, t.get("labels") or {}))
    return out


def pack(bundles: list[Bundle], groups: list[NodeGroup], *, at: str = "min") -> list[Bundle]:
    """First-fit-decreasing packing of ``bundles`` onto the nodes of ``groups`` (each group at
    its ``min`` or ``max`` node count), the way Ray must place them: every bundle on ONE node
    with enough of each resource it asks for. Returns the bundles that found no node ([] when
    everything fits)."""
    free = [dict(g.resources) for g in groups for _ in range(g.count_min if at == "min" else g.count_max)]
    left = []
    order = sorted(bundles, key=lambda b: (b.gpus, sum(b.custom.values()), b.cpus), reverse=True)
    for b in order:
        need = {k: v for k, v in b.demand().items() if v > 0}
        for node in free:
            if all(node.get(k, 0.0) >= v - 1e-9 for k, v in need.items()):
                for k, v in need.items():
                    node[k] -= v
                break
        else:
            left.append(b)
    return left


def sim_nodes(cfg, groups: list[NodeGroup]) -> dict[str, dict]:
    """One simulated node per worker group of a manifest, sized for ``cfg`` (the cluster-sim
    profile): the group's labels and custom resources, each custom resource as much as the
    profile asks for at the world's MAX replicas, and CPUs for the parts pinned there plus every
    unpinned part (Serve agents, memory), which may land on any node. No GPUs: the custom
    resources stand in for them. ``{group name: {"resources": {...}, "labels": {...}}}``."""
    bundles = profile_bundles(cfg, learn=True, world="max")
    floating = sum(b.cpus for b in bundles if not b.custom)
    out = {}
    for g in groups:
        if g.name == "head":
            continue
        names = set(g.custom())
        mine = [b for b in bundles if names & set(b.custom)]
        res = {"CPU": float(math.ceil(sum(b.cpus for b in mine) + floating))}  # `ray start --num-cpus` takes an int
        for n in sorted(names):
            res[n] = sum(b.custom.get(n, 0.0) for b in bundles)
        out[g.name] = {"resources": res, "labels": dict(g.labels)}
    return out


class SimCluster:
    """A running simulated cluster: ``gcs`` (``127.0.0.1:port``), ``dashboard`` (its URL),
    ``env`` (what a client process needs: token auth, no proxy), ``nodes`` ({group: node id},
    ``head`` included, read through Ray's state API once every node was up) and ``log_dir``."""

    def __init__(self, gcs: str, dashboard: str, env: dict[str, str], log_dir):
        self.gcs, self.dashboard, self.env, self.log_dir = gcs, dashboard, env, log_dir
        self.nodes: dict[str, str] = {}


_NODES_UP = """
import json, sys, time
from ray.util.state import list_nodes
want, deadline = int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while True:
    try:
        alive = [n for n in list_nodes(address=sys.argv[1], timeout=10) if n.state == "ALIVE"]
    except Exception as e:  # the dashboard is still starting
        alive, err = [], e
    if len(alive) >= want or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print("NODES " + json.dumps([{"id": n.node_id, "head": n.is_head_node, "labels": n.labels,
                              "resources": n.resources_total} for n in alive]))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_NODE_START_ATTEMPTS = 3
_STARTED = "Ray runtime started."  # what `ray start` prints once its node has registered


def _spawn_node(group: str, cmd: list[str], env: dict[str, str], log_dir) -> Any:
    """One `ray start --block` in its own process group, appending to ``log_dir/<group>.log``."""

    with open(log_dir / f"{group}.log", "a") as log:
        log.write(f"\n=== {json.dumps(cmd)}\n")  # one line: JSON escapes any newline
        log.flush()
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _node_started(log_dir, group: str) -> bool:
    """Whether the latest `ray start` of ``group`` registered its node (its log says so)."""
    text = (log_dir / f"{group}.log").read_text(errors="replace")
    latest = text.rsplit("\n=== ", 1)[-1].split("\n", 1)  # [header line, what that start printed]
    return len(latest) == 2 and _STARTED in latest[1]


def kill_group(proc: Any) -> None:
    """SIGKILL the process group of ``proc`` (a `ray start --block` and its children) and reap
    ``proc`` (at most 10 s)."""
    import os
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def start_node(group: str, cmd: list[str], env: dict[str, str], log_dir, deadline_s: float) -> Any:
    """Start one node and wait until it registered; a start that gives up (Ray's fixed 30 s
    registration wait) is retried, up to ``_NODE_START_ATTEMPTS`` in all."""
    import time

    deadline = time.monotonic() + deadline_s
    for _ in range(_NODE_START_ATTEMPTS):
        proc = _spawn_node(group, cmd, env, log_dir)
        while proc.poll() is None and not _node_started(log_dir, group) and time.monotonic() < deadline:
            time.sleep(0.5)
        if _node_started(log_dir, group) and proc.poll() is None:
            return proc
        kill_group(proc)
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"the {group} node of the simulated cluster did not start: "
                       f"{(log_dir / f'{group}.log').read_text(errors='replace')[-2000:]}")


SIM_JOB = ["python", "jobs/evolve.py", "--profile", "cluster-sim", "--learn"]
"""The job the simulated cluster runs (cluster/local.md, tests/e2e/test_cluster_sim.py)."""


def sim_start_commands(nodes: dict[str, dict], gcs_port: int = 6379) -> list[tuple[str, list[str], dict[str, str]]]:
    """``(group, argv, extra env)`` of each ``ray start`` of the simulated cluster, as
    cluster/local.md documents them: a head with no work (``--num-cpus 0``, dashboard on
    127.0.0.1) and one node per entry of ``nodes`` ({group: {"resources": {"CPU": n,
    custom...}, "labels": {...}}}, from :func:`sim_nodes`) with ``RAY_NODE_TYPE_NAME=<group>``,
    which KubeRay sets in every pod, so Ray labels it ``ray.io/node-group=<group>``."""
    import json

    out = [("head", ["ray", "start", "--head", "--num-cpus", "0", "--num-gpus", "0", "--port", str(gcs_port),
                     "--dashboard-host", "127.0.0.1", "--disable-usage-stats"], {})]
    for group, spec in nodes.items():
        res = dict(spec["resources"])
        cpus = int(res.pop("CPU"))
        labels = ",".join(f"{k}={v}" for k, v in spec.get("labels", {}).items())
        out.append((group, ["ray", "start", "--address", f"127.0.0.1:{gcs_port}", "--num-cpus", str(cpus),
                            "--num-gpus", "0", "--resources", json.dumps(res), "--labels", labels,
                            "--disable-usage-stats"], {"RAY_NODE_TYPE_NAME": group}))
    return out


def ensure_auth_token() -> str:
    """The token file of Ray's token auth (``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``),
    created if missing: `ray start` in token mode refuses to start without one, which on a fresh
    machine failed the first tests that start a head. Created atomically (O_EXCL), so two xdist
    workers never write different tokens."""
    import os
    import secrets

    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def start_sim_cluster(nodes: dict[str, dict], *, env: dict[str, str] | None = None,
                      timeout_s: float = 180.0, system_config: dict | None = None) -> SimCluster:
    """Start the simulated multi-node cluster of :func:`sim_start_commands` on this machine,
    with token auth (``RAY_AUTH_MODE=token``; the token is ``~/.ray/auth_token``). Added for
    tests: every port chosen free and bound to 127.0.0.1, a temp folder per node, a small object
    store, ``--block`` in its own process group. ``env`` is the nodes' environment (e.g. S3
    endpoint and credentials: Ray workers inherit them; jobs never forward them). The head starts
    first, then the workers; a node whose ``ray start`` gives up is started again (up to 3 times).
    Returns once every node is alive (``timeout_s``). ``system_config`` goes to the head's
    ``--system-config``. Stop it with :func:`stop_sim_cluster` (never
    ``ray stop``, which kills every Ray on the machine)."""
    import json
    import os
    import sys
    import tempfile
    import time
    from pathlib import Path

    ensure_auth_token()
    ray_bin = str(Path(sys.executable).parent / "ray")
    base = dict(os.environ if env is None else env)
    base.update(RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", NO_PROXY="127.0.0.1,localhost",
                no_proxy="127.0.0.1,localhost", PATH=f"{Path(sys.executable).parent}:{base.get('PATH', '')}")
    base.pop("RAY_ADDRESS", None)
    log_dir = Path(tempfile.mkdtemp(prefix="wa-sim-"))  # short: Ray's socket paths must stay < 108 chars
    gcs, dash = _free_port(), _free_port()
    cluster = SimCluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", base, log_dir)
    cluster._procs = []
    specs = []
    for group, argv, extra in sim_start_commands(nodes, gcs):
        test_flags = ["--block", "--node-ip-address=127.0.0.1", "--object-store-memory=300000000",
                      "--min-worker-port=0", "--max-worker-port=0", f"--temp-dir={log_dir / group}",
                      *(f"--{flag}={_free_port()}" for flag in (
                          "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                          "runtime-env-agent-port", "node-manager-port", "object-manager-port"))]
        if group == "head":
            test_flags += ["--include-dashboard=true", f"--dashboard-port={dash}",
                           f"--ray-client-server-port={_free_port()}"]
            if system_config:
                test_flags.append(f"--system-config={json.dumps(system_config)}")
        specs.append((group, [ray_bin, *argv[1:], *test_flags], {**base, **extra}))
    try:
        # The head first, then the workers; a `ray start` that gives up is started again: Ray
        # waits a fixed 30 s for a starting node to register, which a loaded 2-core machine
        # (another test's engines loading beside it) can exceed.
        head, workers = specs[0], specs[1:]
        procs = {"head": start_node(*head, log_dir, deadline_s=timeout_s)}
        cluster._procs = [procs["head"]]
        for group, cmd, node_env in workers:
            procs[group] = _spawn_node(group, cmd, node_env, log_dir)
        cluster._procs = [procs[g] for g, _, _ in specs]
        restarts = dict.fromkeys(procs, 0)
        deadline = time.monotonic() + timeout_s
        for group, cmd, node_env in workers:
            while not _node_started(log_dir, group):
                if procs[group].poll() is not None:  # gave up (or crashed): start it again
                    if restarts[group] >= _NODE_START_ATTEMPTS - 1:
                        break
                    restarts[group] += 1
                    kill_group(procs[group])
                    procs[group] = _spawn_node(group, cmd, node_env, log_dir)
                    cluster._procs = [procs[g] for g, _, _ in specs]
                if time.monotonic() > deadline or procs["head"].poll() is not None:
                    break
                time.sleep(0.5)
        p = subprocess.run([sys.executable, "-c", _NODES_UP, cluster.dashboard, str(len(specs)),
                            str(max(10.0, deadline - time.monotonic()))],
                           env=base, capture_output=True, text=True, timeout=timeout_s + 60)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("NODES ")]
        found = json.loads(line[0][6:]) if line else []
        for n in found:
            group = "head" if n["head"] else n["labels"].get("ray.io/node-group", "?")
            cluster.nodes[group] = n["id"]
        if set(cluster.nodes) != {"head", *nodes}:
            logs = "\n".join(f"--- {g}\n{(log_dir / f'{g}.log').read_text()[-1500:]}" for g, _, _ in specs)
            raise RuntimeError(f"simulated cluster did not come up within {timeout_s}s (restarts {restarts}): "
                               f"nodes {found}\n{p.stderr[-2000:]}\n{logs}")
    except BaseException:
        stop_sim_cluster(cluster)
        raise
    return cluster


def stop_sim_cluster(cluster: SimCluster, timeout_s: float = 3.0) -> None:
    """SIGTERM every node's process group (workers first, the head last), give them ``timeout_s``
    in all to exit, SIGKILL whatever is left in those groups, then delete the cluster's temp
    folder (its logs). (``ray start --block`` takes over 10 s to exit on SIGTERM; nothing of a
    test cluster needs a graceful end.)"""
    import os
    import shutil
    import signal
    import time

    procs = list(reversed(getattr(cluster, "_procs", [])))
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:  # stragglers (raylet, workers) in the node's group
        kill_group(proc)
    shutil.rmtree(cluster.log_dir, ignore_errors=True)
