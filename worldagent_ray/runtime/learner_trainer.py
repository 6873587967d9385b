"""The learner's Ray Train shell: runs :class:`~worldagent_ray.rl.learner.LearnerCore` under a
``TorchTrainer``.

Rank 0 decides, every rank follows. Rank 0 alone talks to the buffer actor: it pulls the next
batch and broadcasts one *plan* to every rank (``torch.distributed.broadcast_object_list``):
``step`` with the groups (every rank steps on its own rows of them), ``wait`` (nothing yet;
sent at least every ``batch_timeout_s`` so that no rank sits in a collective for long), or
``stop`` (``max_steps`` reached, the producer closed the buffer and it is drained, or the
buffer stayed empty for ``idle_timeout_s``). No rank decides alone to stop, so none can be
left inside an all-reduce that the others never enter.

At-least-once learning. A group handed out by the buffer stays in flight there until rank 0
acknowledges it, right after ``ray.train.report`` returned with a checkpoint that includes its
step (the upload is synchronous: the checkpoint is in storage). The ack carries that
checkpoint's path, and a (re)starting learner restores *that* checkpoint (the buffer's
:meth:`~worldagent_ray.runtime.buffer_actor.BufferActor.durable_checkpoint`; Ray Train's own
latest checkpoint when the buffer has none), marks the group ids it has trained as acknowledged
and requeues every other in-flight group, which is then trained again. The weights that survive
therefore contain every acknowledged group exactly once; a group is *handed out* more than once
only when a learner attempt died after taking it and before its checkpoint was acknowledged. On
a stop with trained-but-unacknowledged groups, a final checkpoint is written and acknowledged,
so at the end ``in_flight == 0`` and ``consumed_ids == acked`` in the buffer's ``stats()``.

Weights reach the engines through one call site, :func:`publish_weights` (with FSDP the full
state dict is gathered onto rank 0 first). The training maths lives in :mod:`worldagent_ray.rl`
(no Ray there).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import ray
import ray.train
import ray.train.torch
import torch

from ..config import Config, LearnerConfig
from ..models import resolve_model
from ..rl.learner import LearnerCore
from ..rl.policy import fully_shard_policy
from .metrics import LearnerMetrics
from .weight_publisher import make_weight_sender

logger = logging.getLogger(__name__)

__all__ = ["launch_learner", "publish_weights", "train_loop_per_worker"]

TRAINED_IDS_KEY = "trained_ids"
"""Key, in a checkpoint's ``extra``, of every group id whose training the checkpoint contains."""


@dataclass
class _Plan:
    """What rank 0 tells every rank to do next."""

    kind: Literal["step", "wait", "stop"]
    groups: list[Any] = field(default_factory=list)
    stale: list[bool] = field(default_factory=list)
    reason: str = ""
    checkpoint: bool = False  # stop: write (and acknowledge) a final checkpoint first


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (identity without a process group)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _wrap_for(strategy: str, device: torch.device):
    """The ``wrap_model`` callable for ``parallel_strategy``."""
    if strategy == "ddp":
        return lambda m: ray.train.torch.prepare_model(m, parallel_strategy="ddp")
    if strategy == "fsdp":
        return lambda m: fully_shard_policy(m, device)
    raise ValueError(f"parallel_strategy must be 'ddp' or 'fsdp', got {strategy!r}")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The per-worker loop that ``TorchTrainer`` runs (see :func:`launch_learner`).

    ``config`` keys: ``learner`` (a ``LearnerConfig`` dump), ``model_path``, ``buffer_name``,
    ``publisher_name`` (``None``: do not publish), ``namespace``, ``temperature``,
    ``batch_timeout_s`` (one ``get_batch`` wait, and the longest gap between two plans),
    ``idle_timeout_s`` (stop when no batch arrived for this long; ``None`` waits forever).

    Every step: rank 0 pulls ``groups_per_step`` groups and broadcasts them; every rank steps;
    metrics are reported (``loss``, ``reward_mean``, ``staleness_mean``, ``policy_version``,
    ``idle_frac`` = time waiting on the buffer / wall time so far, ...). Every ``sync_every``
    steps the weights are published; every ``checkpoint_every`` steps (and at ``max_steps``) a
    checkpoint is written (model or adapters, optimizer, JSON with step, policy version and
    the trained group ids) and its groups acknowledged.
    """

    cfg = LearnerConfig.model_validate(config["learner"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    namespace = config.get("namespace")
    buffer = ray.get_actor(config["buffer_name"], namespace=namespace)
    publisher = (
        ray.get_actor(config["publisher_name"], namespace=namespace) if config.get("publisher_name") else None
    )
    device = ray.train.torch.get_device()
    core = LearnerCore(
        cfg,
        config["model_path"],
        temperature=float(config.get("temperature", 1.0)),
        device=device,
        wrap_model=_wrap_for(cfg.parallel_strategy, device),
    )
    trained = _restore(core, buffer, rank)
    sender = make_weight_sender(cfg, publisher) if (publisher is not None and rank == 0) else None
    if publisher is not None:
        _reconcile_weights(core, sender, rank)

    gauges = LearnerMetrics() if rank == 0 else None
    pending: list[str] = []  # rank 0: trained since the last acknowledged checkpoint
    metrics: dict[str, float] = {"step": float(core.step_count), "policy_version": float(core.policy_version)}
    t_start, t_idle, idle_since = time.monotonic(), 0.0, time.monotonic()
    while True:
        plan = None
        if rank == 0:
            t0 = time.monotonic()
            plan = _plan_next(core, buffer, cfg, config, idle_since, pending)
            t_idle += time.monotonic() - t0
            if plan.kind == "step":
                idle_since = time.monotonic()
        plan = _broadcast(plan)
        if plan.kind == "wait":
            continue
        if plan.kind == "stop":
            if rank == 0:
                logger.info("learner stops at step %d: %s", core.step_count, plan.reason)
            if plan.checkpoint:  # the last step's metrics again, with the final checkpoint
                _checkpoint(core, buffer, metrics, rank, trained, pending)
            break
        metrics = core.step(plan.groups, plan.stale)
        if rank == 0:
            pending.extend(g.group_id for g in plan.groups)
        if core.step_count % cfg.sync_every == 0:
            metrics.update(publish_weights(core, sender, rank))
        metrics["idle_frac"] = t_idle / max(1e-9, time.monotonic() - t_start)
        if gauges is not None:
            gauges.record(core.policy_version, metrics)
            buffer.record_step.remote(dict(metrics))  # for the run's ledger; not awaited
        if core.step_count % cfg.checkpoint_every == 0 or core.step_count >= cfg.max_steps:
            _checkpoint(core, buffer, metrics, rank, trained, pending)
        else:
            ray.train.report(metrics)


def _plan_next(core: LearnerCore, buffer: Any, cfg: LearnerConfig, config: Mapping[str, Any],
               idle_since: float, pending: list[str]) -> _Plan:
    """Rank 0: the next plan. One ``get_batch`` wait at most (``batch_timeout_s``), so that the
    other ranks, waiting in the broadcast, hear from rank 0 at least that often."""
    if core.step_count >= cfg.max_steps:
        return _Plan("stop", reason=f"max_steps={cfg.max_steps} reached", checkpoint=bool(pending))
    version = core.policy_version
    batch = ray.get(buffer.get_batch.remote(cfg.groups_per_step, version, float(config.get("batch_timeout_s", 5.0))))
    if batch:
        groups = ray.get([item["ref"] for item in batch])
        return _Plan("step", groups=groups, stale=[_needs_correction(i, version, cfg) for i in batch])
    if ray.get(buffer.drained.remote()):
        return _Plan("stop", reason="the producer closed the buffer and it is drained", checkpoint=bool(pending))
    idle_limit = config.get("idle_timeout_s")
    if idle_limit is not None and time.monotonic() - idle_since >= float(idle_limit):
        return _Plan("stop", reason=f"no group for {idle_limit} s", checkpoint=bool(pending))
    return _Plan("wait")


def _needs_correction(item: Mapping[str, Any], version: int, cfg: LearnerConfig) -> bool:
    if "needs_correction" in item:
        return bool(item["needs_correction"])
    return version - int(item["policy_version"]) > cfg.max_staleness


# --------------------------------------------------------------------------- checkpoints


def _checkpoint_path(name: str) -> str | None:
    """Where Ray Train persists a checkpoint reported with ``checkpoint_dir_name=name`` (a path
    on the run's storage filesystem; ``None`` if this Ray version does not say)."""
    try:
        return str(ray.train.get_context().get_storage().build_checkpoint_path_from_name(name))
    except Exception:  # a DeveloperAPI: degrade to Ray Train's own latest checkpoint on restore
        return None


def _checkpoint(core: LearnerCore, buffer: Any, metrics: dict[str, float], rank: int,
                trained: set[str], pending: list[str]) -> None:
    """Every rank: write a checkpoint (rank 0; with FSDP every rank gathers), report it (the
    upload is done when ``report`` returns), then rank 0 acknowledges the groups it includes."""
    # Unique per report: a restarted attempt re-reaches the same step, and Ray Train deleting the
    # older of two registrations that share a directory would delete the newer one's files.
    name = f"checkpoint_step_{core.step_count:08d}_{time.time_ns():x}"
    with tempfile.TemporaryDirectory(prefix="wa-learner-ckpt-") as d:
        ids = sorted(trained | set(pending)) if rank == 0 else []
        if core.sharded or rank == 0:
            core.save_checkpoint(d, extra={TRAINED_IDS_KEY: ids})
        ckpt = ray.train.Checkpoint.from_directory(d) if rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)
    if rank == 0:
        ray.get(buffer.ack.remote(list(pending), {"step": core.step_count, "path": _checkpoint_path(name)}))
        trained.update(pending)
        pending.clear()


def _restore(core: LearnerCore, buffer: Any, rank: int) -> set[str]:
    """On every (re)start: load the checkpoint whose groups the buffer acknowledged (else Ray
    Train's latest, else none), then rank 0 tells the buffer which groups it contains and has
    every other in-flight group requeued. Returns (rank 0) the trained group ids."""
    path = None
    if rank == 0:
        durable = ray.get(buffer.durable_checkpoint.remote())
        path = durable.get("path") if durable else None
    path = _broadcast(path)
    ckpt = None
    if path:
        storage = ray.train.get_context().get_storage()
        ckpt = ray.train.Checkpoint(path=path, filesystem=storage.storage_filesystem)
    else:
        ckpt = ray.train.get_checkpoint()
    trained: list[str] = []
    if ckpt is not None:
        with ckpt.as_directory() as d:
            extra = core.load_checkpoint(d)
        trained = list(extra.get(TRAINED_IDS_KEY) or [])
        logger.info("learner rank %d resumed at step %d, version %d from %s", rank, core.step_count,
                    core.policy_version, ckpt.path)
    if rank == 0:
        checkpoint = {"step": core.step_count, "path": path or (ckpt.path if ckpt is not None else None)}
        requeued = ray.get(buffer.restore.remote(trained, checkpoint if ckpt is not None else None))
        if requeued:
            logger.warning("learner: %d in-flight groups requeued (not in the restored checkpoint)", len(requeued))
    return set(trained)


# --------------------------------------------------------------------------- weights


def publish_weights(core: LearnerCore, sender: Any, rank: int) -> dict[str, float]:
    """The one place where the learner hands weights to the engines: every rank calls it
    (with FSDP the export gathers the full state dict onto rank 0, a collective); rank 0
    publishes ``core.export_weights()`` under ``core.policy_version``. Returns sync metrics
    (rank 0; ``{}`` elsewhere or without a sender)."""
    payload = core.export_weights() if (core.sharded or rank == 0) else None
    if sender is None or rank != 0:
        return {}
    return sender.publish(core.policy_version, payload)


def _reconcile_weights(core: LearnerCore, sender: Any, rank: int) -> None:
    """After a (re)start, make the engines serve the learner's weights under a version that
    still increases: if newer weights were published before a failure, the restored ones are
    republished as ``latest + 1``; if the engines are behind, the current version is published;
    if they match, nothing is sent. Rank 0 decides; every rank follows (the export may be a
    collective)."""
    decision = None
    if rank == 0:
        latest = sender.latest()
        version = latest + 1 if latest > core.policy_version else core.policy_version
        decision = (version, latest != version)
    version, send = _broadcast(decision)
    core.policy_version = int(version)
    if send:
        publish_weights(core, sender, rank)


# --------------------------------------------------------------------------- launch


def _storage_path(run_dir: str | os.PathLike[str], storage_filesystem: Any) -> str:
    root = str(run_dir)
    if "://" in root:
        if storage_filesystem is not None:  # a path on that filesystem: no scheme
            root = root.split("://", 1)[1]
        return root.rstrip("/") + "/learner"
    return str(Path(root).resolve() / "learner")


def launch_learner(
    cfg: Config,
    run_dir: str | os.PathLike[str],
    buffer_name: str,
    publisher_name: str | None,
    *,
    namespace: str | None = None,
    idle_timeout_s: float | None = None,
    storage_filesystem: Any = None,
    extra_loop_config: Mapping[str, Any] | None = None,
):
    """Build the ``TorchTrainer`` that runs the learner; the driver calls ``trainer.fit()``
    (blocking, so from a background thread) and reads ``Result.metrics`` / ``.checkpoint``.

    Args:
        cfg (`Config`): the whole config; ``cfg.learner`` sets workers, backend, parallel
            strategy, failures and checkpoints, ``cfg.engines[cfg.agents.action.engine].model``
            the policy model (a builtin, a folder or a hub id),
            ``cfg.agents.action.temperature`` the sampling temperature.
        run_dir: the run folder, a local path or a URI (``s3://bucket/runs/x``): checkpoints
            go to ``<run_dir>/learner/<run name>-learner`` (shared storage, so that a worker
            restarted on another node finds them).
        buffer_name / publisher_name: names of the buffer and publisher actors.
        namespace: the actors' Ray namespace (``None``: the job's).
        idle_timeout_s: stop when the buffer stays empty this long (``None``: never).
        storage_filesystem: a ``pyarrow.fs.FileSystem`` for ``run_dir`` (e.g. S3 credentials and
            endpoint from the environment); ``None``: pyarrow infers it from the URI.
        extra_loop_config: merged into ``train_loop_config`` (e.g. ``batch_timeout_s``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    lc = cfg.learner
    policy_engine = cfg.engines[cfg.agents.action.engine]
    if lc.backend == "nccl" and not lc.use_gpu:
        raise ValueError("learner.backend='nccl' needs learner.use_gpu=true (use 'gloo' on CPU)")
    loop_config: dict[str, Any] = {
        "learner": lc.model_dump(mode="json"),
        "model_path": resolve_model(policy_engine.model),
        "buffer_name": buffer_name,
        "publisher_name": publisher_name,
        "namespace": namespace,
        "temperature": cfg.agents.action.temperature or 1.0,
        "idle_timeout_s": idle_timeout_s,
    }
    loop_config.update(dict(extra_loop_config or {}))
    res = cfg.resources.learner
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=lc.backend),
        scaling_config=ScalingConfig(
            num_workers=lc.num_workers,
            use_gpu=lc.use_gpu,
            resources_per_worker={"CPU": res.num_cpus, **({"GPU": res.num_gpus or 1} if lc.use_gpu else {}),
                                  **res.custom},
        ),
        run_config=RunConfig(
            name=f"{cfg.run.name}-learner",
            storage_path=_storage_path(run_dir, storage_filesystem),
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=lc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
