"""The learner's Ray Train shell: runs :class:`~worldagent_ray.rl.learner.LearnerCore` under a
``TorchTrainer``.

Each worker pulls batches from the buffer actor, steps, reports metrics and checkpoints; rank
0 publishes weights to the Action engines through the weight publisher actor. The training
maths lives in :mod:`worldagent_ray.rl` (no Ray there).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import ray
import ray.train
import ray.train.torch
import torch

from ..config import Config, LearnerConfig
from ..models import resolve_model
from ..rl.learner import LearnerCore
from .metrics import LearnerMetrics

logger = logging.getLogger(__name__)

__all__ = ["train_loop_per_worker", "launch_learner"]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The per-worker loop that ``TorchTrainer`` runs (see :func:`launch_learner`).

    ``config`` keys: ``learner`` (a ``LearnerConfig`` dump), ``model_path``, ``buffer_name``,
    ``publisher_name`` (``None``: do not publish), ``namespace``, ``temperature``,
    ``batch_timeout_s`` (one ``get_batch`` wait), ``idle_timeout_s`` (give up and finish when
    no batch arrived for this long; ``None`` waits forever), ``parallel_strategy``
    (``"ddp"``/``"fsdp"``).

    Every step: pull ``groups_per_step`` groups from the buffer, take a GRPO step, report
    metrics (``loss``, ``reward_mean``, ``staleness_mean``, ``policy_version``,
    ``idle_frac`` = time waiting on the buffer / wall time so far, ...). Every
    ``checkpoint_every`` steps: a checkpoint (model or adapters, optimizer, JSON with step,
    policy version and the buffer's consumed ids). Every ``sync_every`` steps rank 0
    publishes the weights. On (re)start the latest checkpoint is restored exactly and the
    consumed ids are pushed back into the buffer.
    """

    cfg = LearnerConfig.model_validate(config["learner"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    namespace = config.get("namespace")
    buffer = ray.get_actor(config["buffer_name"], namespace=namespace)
    publisher = (
        ray.get_actor(config["publisher_name"], namespace=namespace) if config.get("publisher_name") else None
    )
    strategy = config.get("parallel_strategy", "ddp")
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"parallel_strategy must be 'ddp' or 'fsdp', got {strategy!r}")
    if strategy == "fsdp" and config.get("publisher_name"):
        raise ValueError(
            "parallel_strategy='fsdp' cannot publish weights yet: export needs a full-state-dict "
            "gather across ranks, which is not implemented; use 'ddp' or publisher_name=None"
        )
    device = ray.train.torch.get_device()
    core = LearnerCore(
        cfg,
        config["model_path"],
        temperature=float(config.get("temperature", 1.0)),
        device=device,
        wrap_model=lambda m: ray.train.torch.prepare_model(m, parallel_strategy=strategy),
    )
    restored = _restore_from_ray_checkpoint(core, buffer, rank)
    sync = _RankZeroPublisher(core, publisher, cfg) if (publisher is not None and rank == 0) else None
    if restored and publisher is not None:
        version = sync.reconcile_after_restore() if sync is not None else core.policy_version
        core.policy_version = _broadcast_int(version)

    gauges = LearnerMetrics() if rank == 0 else None
    t_start, t_idle = time.monotonic(), 0.0
    while core.step_count < cfg.max_steps:
        t0 = time.monotonic()
        items = _pull_batch(buffer, cfg, core.policy_version, config)
        t_idle += time.monotonic() - t0
        if items is None:
            logger.warning("learner rank %d: buffer drained or idle for %ss; finishing at step %d",
                           rank, config.get("idle_timeout_s"), core.step_count)
            break
        groups = [g for g, _ in items]
        stale = [s for _, s in items]
        metrics = core.step(groups, stale)
        if sync is not None and core.step_count % cfg.sync_every == 0:
            metrics.update(sync.publish())
        metrics["idle_frac"] = t_idle / max(1e-9, time.monotonic() - t_start)
        if gauges is not None:
            gauges.record(core.policy_version, metrics)
        if core.step_count % cfg.checkpoint_every == 0 or core.step_count >= cfg.max_steps:
            _report_with_checkpoint(core, buffer, metrics, rank)
        else:
            ray.train.report(metrics)


def _pull_batch(buffer: Any, cfg: LearnerConfig, version: int, config: Mapping[str, Any]) -> list[tuple[Any, bool]] | None:
    """Block until the buffer hands over groups; return ``[(ScoredGroup, needs_correction)]``,
    or ``None`` when the producer closed the buffer and it is drained, or once
    ``idle_timeout_s`` passed without any group.

    ``BufferActor.get_batch`` returns up to ``groups_per_step`` items (fewer when its wait
    runs out); a partial batch is used as is rather than held back.
    """

    wait_s = float(config.get("batch_timeout_s", 5.0))
    idle_limit = config.get("idle_timeout_s")
    t0 = time.monotonic()
    while True:
        batch = ray.get(buffer.get_batch.remote(cfg.groups_per_step, version, wait_s))
        if batch:
            groups = ray.get([item["ref"] for item in batch])
            return [(g, _needs_correction(item, version, cfg)) for item, g in zip(batch, groups)]
        if ray.get(buffer.drained.remote()):
            return None
        if idle_limit is not None and time.monotonic() - t0 >= float(idle_limit):
            return None


def _needs_correction(item: Mapping[str, Any], version: int, cfg: LearnerConfig) -> bool:
    if "needs_correction" in item:
        return bool(item["needs_correction"])
    return version - int(item["policy_version"]) > cfg.max_staleness


def _restore_from_ray_checkpoint(core: LearnerCore, buffer: Any, rank: int) -> bool:
    """Restore the latest Ray Train checkpoint (if any) into ``core``; rank 0 merges the saved
    consumed group ids back into the buffer. Returns whether a checkpoint was restored."""

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return False
    with ckpt.as_directory() as d:
        extra = core.load_checkpoint(d)
    logger.info("learner rank %d resumed at step %d, version %d", rank, core.step_count, core.policy_version)
    if rank == 0 and extra.get("buffer_state") is not None:
        ray.get(buffer.load_state_dict.remote(extra["buffer_state"]))
    return True


def _broadcast_int(value: int) -> int:
    """Rank 0's ``value`` on every rank (identity on one process)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.long)
    dist.broadcast(t, src=0)
    return int(t.item())


def _report_with_checkpoint(core: LearnerCore, buffer: Any, metrics: dict[str, float], rank: int) -> None:

    if rank != 0:
        ray.train.report(metrics)
        return
    buffer_state = ray.get(buffer.state_dict.remote())
    with tempfile.TemporaryDirectory(prefix="wa-learner-ckpt-") as d:
        core.save_checkpoint(d, extra={"buffer_state": buffer_state})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


class _RankZeroPublisher:
    """Publishes the learner's weights through the :class:`WeightPublisherActor` (object-store
    path): the payload is ``ray.put`` once (owned by this worker: if the learner dies, a
    replica that has not fetched it yet gets a loud ``WeightSyncError`` until the restarted
    learner republishes, see :meth:`reconcile_after_restore`), and the learner waits for the *previous* version to be acked by every live
    replica before publishing the next, so that at most one sync is in flight and a replica
    that stops acking fails the learner loudly (``WeightSyncError``) instead of serving
    ever-staler weights."""

    def __init__(self, core: LearnerCore, publisher: Any, cfg: LearnerConfig):
        self.core, self.publisher, self.cfg = core, publisher, cfg
        self.last_published: int | None = None

    def publish(self) -> dict[str, float]:

        t0 = time.monotonic()
        if self.last_published is not None:
            ray.get(self.publisher.wait_synced.remote(self.last_published, self.cfg.sync_timeout_s))
        payload = self.core.export_weights()
        ref = ray.put(payload)
        version = self.core.policy_version
        ray.get(self.publisher.publish.remote(version, [ref]))
        self.last_published = version
        return {"sync_s": time.monotonic() - t0, "published_version": float(version)}

    def reconcile_after_restore(self) -> int:
        """After a restore, make the engines serve the checkpoint's weights under a version that
        still increases: if weights newer than the checkpoint were published before the failure,
        the restored weights are republished as ``latest + 1``; if the engines are behind the
        checkpoint, the checkpoint version is published; if they match, nothing is sent.
        Returns the learner's policy version from now on."""

        latest, _ = ray.get(self.publisher.latest.remote())
        latest = int(latest)
        if latest > self.core.policy_version:
            self.core.policy_version = latest + 1
        if latest != self.core.policy_version:
            self.publish()
        return self.core.policy_version


def launch_learner(
    cfg: Config,
    run_dir: str | os.PathLike[str],
    buffer_name: str,
    publisher_name: str | None,
    *,
    namespace: str | None = None,
    idle_timeout_s: float | None = None,
    extra_loop_config: Mapping[str, Any] | None = None,
):
    """Build the ``TorchTrainer`` that runs the learner; the driver calls ``trainer.fit()``
    (blocking, so from a background thread) and reads ``Result.metrics`` / ``.checkpoint``.

    Args:
        cfg (`Config`): the whole config; ``cfg.learner`` sets workers, backend, failures and
            checkpoints, ``cfg.engines[cfg.agents.action.engine].model`` the policy model,
            ``cfg.agents.action.temperature`` the sampling temperature.
        run_dir: the run folder; checkpoints go to ``<run_dir>/learner/<run name>``.
        buffer_name / publisher_name: names of the buffer and publisher actors.
        namespace: the actors' Ray namespace (``None``: the job's).
        idle_timeout_s: finish when the buffer stays empty this long (``None``: never).
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
        "parallel_strategy": "ddp",
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
            storage_path=str(Path(run_dir).resolve() / "learner"),
            failure_config=FailureConfig(max_failures=lc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
