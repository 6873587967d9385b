"""The learner's Ray Train shell on a local Ray: 2 gloo workers pull from a real BufferActor
through rank 0, checkpoint on a pyarrow filesystem, publish weights, survive a worker killed
after a hand-out, and stop together when the buffer is closed and drained."""

from __future__ import annotations

import os

import pytest
import torch

from worldagent_ray.models import resolve_model
from worldagent_ray.rl.learner import LearnerCore
from worldagent_ray.runtime.buffer_actor import BufferActor

from tests.factories import make_groups

pytestmark = pytest.mark.timeout(600)


class _Bomb:
    """Unpickling it ends the process at once (like an OOM kill): a fault injected into the
    learner worker that fetches it, never into shipped code."""

    def __reduce__(self):
        return (os._exit, (1,))


class BombBuffer(BufferActor):
    """A buffer whose ``bomb_at``-th hand-out goes through (the groups are in flight) but carries
    refs that kill the worker fetching them, before the step's checkpoint."""

    def __init__(self, *, bomb_at: int, bomb: list, **kw):
        super().__init__(**kw)
        self.bomb_at, self.bomb, self.handouts, self.fired = bomb_at, bomb[0], 0, False

    async def get_batch(self, n, current_version, timeout_s=None):
        batch = await super().get_batch(n, current_version, timeout_s)
        self.handouts += bool(batch)
        if batch and self.handouts == self.bomb_at and not self.fired:
            self.fired = True
            return [{**item, "ref": self.bomb} for item in batch]
        return batch

    async def fault_fired(self) -> bool:
        return self.fired


@pytest.fixture(scope="module")
def ray_train():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, namespace="test-learner", log_to_driver=False)
    yield ray
    ray.shutdown()


def _cfg(name: str, *overrides: str):
    from worldagent_ray.config import load_config

    return load_config(
        "local-cpu",
        overrides=[
            "engines.policy.model=tiny-random-llama", "learner.lr=0.01", "learner.max_steps=50",
            "learner.checkpoint_every=2", "learner.groups_per_step=2", "learner.num_workers=2",
            "learner.max_failures=1", "learner.sync_every=1", "learner.max_staleness=100",
            "learner.gradient_checkpointing=false", "agents.action.temperature=1.0", f"run.name={name}",
            *overrides,
        ],
        environ={},
    )


@pytest.mark.slow
@pytest.mark.ray
def test_two_workers_survive_a_kill_after_a_hand_out_and_train_every_group_once(ray_train, tmp_path):
    """5 steps of data (10 groups), checkpoints every 2 steps, the worker of rank 0 killed while
    fetching hand-out 4 (step 3 trained, not checkpointed). Ray Train restarts both workers;
    they restore the acknowledged step-2 checkpoint, the 4 in-flight groups come back first,
    and when the closed buffer is drained rank 0 stops both ranks with a final checkpoint.
    Guarantees checked exactly: every group acknowledged, none in flight, hand-outs = accepted +
    requeued, and the surviving weights equal one process training each group once, in order."""
    import fsspec
    import pyarrow.fs as pafs

    ray = ray_train
    from worldagent_ray.rl.buffer import meta_of
    from worldagent_ray.runtime.buffer_actor import buffer_actor_name
    from worldagent_ray.runtime.learner_trainer import launch_learner
    from worldagent_ray.runtime.weight_publisher import create_publisher_actor

    cfg = _cfg("lt2")
    lc = cfg.learner
    data = [make_groups(200 + s) for s in range(5)]
    reference = LearnerCore(lc, resolve_model("tiny-random-llama"))
    expected = [reference.step(g) for g in data][-1]

    buffer = ray.remote(BombBuffer).options(name=buffer_actor_name("lt2"), num_cpus=0).remote(
        put_timeout_s=5.0, name="lt2", bomb_at=4, bomb=[ray.put(_Bomb())], max_groups=lc.buffer_max_groups,
        max_staleness=lc.max_staleness, stale_policy=lc.stale_policy, drop_zero_variance=lc.drop_zero_variance)
    publisher = create_publisher_actor("lt2-weights")
    for g in (g for step in data for g in step):
        assert ray.get(buffer.put.remote(meta_of(g), [ray.put(g)]))
    ray.get(buffer.close.remote())  # the producer is done: the learner stops once it is drained
    # checkpoints through an fsspec-backed pyarrow filesystem, the route an s3fs root takes
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("file")))
    root = f"file://{tmp_path}/run"
    trainer = launch_learner(cfg, root, buffer_actor_name("lt2"), "lt2-weights", namespace="test-learner",
                             idle_timeout_s=60.0, storage_filesystem=fs, extra_loop_config={"batch_timeout_s": 1.0})
    result = trainer.fit()

    assert ray.get(buffer.fault_fired.remote())
    st = ray.get(buffer.stats.remote())
    assert st["accepted"] == st["acked"] == st["consumed_ids"] == 10 and st["in_flight"] == 0 and st["size"] == 0
    assert st["requeued"] == 4 and st["taken"] == 10 + 4
    assert result.metrics["step"] == 5 and 0.0 <= result.metrics["idle_frac"] < 1.0
    assert abs(result.metrics["loss"] - expected["loss"]) <= 1e-4
    # the final checkpoint is the acknowledged one, on the run root's filesystem
    assert result.checkpoint is not None and result.checkpoint.path.startswith(f"{tmp_path}/run/learner/")
    assert result.checkpoint.path.rsplit("/", 1)[1].startswith("checkpoint_step_00000005_")
    assert ray.get(buffer.durable_checkpoint.remote())["path"] == result.checkpoint.path
    status = ray.get(publisher.status.remote())
    assert status["version"] == result.metrics["policy_version"] > 5  # restored weights republished as newer
    fresh = LearnerCore(lc, resolve_model("tiny-random-llama"))
    with result.checkpoint.as_directory() as d:
        extra = fresh.load_checkpoint(d)
    assert len(extra["trained_ids"]) == 10 and fresh.step_count == 5
    # Two ranks add their gradients in another order than one process, and Adam turns that
    # rounding noise into updates of up to ~lr on coordinates whose gradient is ~0: measured
    # here, the weights then differ by <= 1e-4, while skipping or repeating one step's groups
    # moves them by ~4e-2. 1e-3 tells the two apart.
    for (k, a), b in zip(reference.trainable_state_dict().items(), fresh.trainable_state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3, msg=k)
