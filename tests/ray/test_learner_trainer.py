"""The learner's Ray Train shell on a local Ray: a TorchTrainer that pulls from a real
BufferActor, checkpoints, publishes weights and resumes exactly after a worker failure."""

from __future__ import annotations

import pytest
import torch

from worldagent_ray.models import resolve_model
from worldagent_ray.rl.learner import LearnerCore
from worldagent_ray.runtime.buffer_actor import BufferActor

from tests.factories import make_groups

pytestmark = pytest.mark.timeout(600)


class FailOnceBuffer(BufferActor):
    """A buffer whose ``fail_at``-th hand-out raises once (the learner worker then dies)."""

    def __init__(self, *args, fail_at: int, **kw):
        super().__init__(*args, **kw)
        self.fail_at, self.handouts, self.failed = fail_at, 0, False

    async def get_batch(self, n, current_version, timeout_s=None):
        if self.handouts + 1 == self.fail_at and not self.failed:
            self.failed = True
            raise RuntimeError(f"injected failure before hand-out {self.fail_at}")
        batch = await super().get_batch(n, current_version, timeout_s)
        self.handouts += bool(batch)
        return batch

    async def fault_fired(self) -> bool:
        return self.failed


@pytest.mark.slow
@pytest.mark.ray
def test_ray_train_resume_after_injected_failure_is_exact(tmp_path):
    """TorchTrainer (1 gloo worker) pulls 4 steps from a real BufferActor, checkpoints every 2
    steps and publishes weights every step; the buffer fails its third hand-out, which kills the worker;
    Ray Train restarts it from the step-2 checkpoint, and the last loss equals an
    uninterrupted LearnerCore run on the same data."""
    import ray

    from worldagent_ray.config import load_config
    from worldagent_ray.rl.buffer import meta_of
    from worldagent_ray.runtime.buffer_actor import buffer_actor_name
    from worldagent_ray.runtime.learner_trainer import launch_learner
    from worldagent_ray.runtime.weight_publisher import create_publisher_actor

    model_path = resolve_model("tiny-random-llama")
    N = 4
    cfg = load_config(
        "local-cpu",
        overrides=[
            "engines.policy.model=tiny-random-llama", "learner.lr=0.01", f"learner.max_steps={N}",
            "learner.checkpoint_every=2", "learner.groups_per_step=2", "learner.num_workers=1",
            "learner.max_failures=1", "learner.sync_every=1", "learner.max_staleness=100",
            "agents.action.temperature=1.0", "run.name=lt",
        ],
        environ={},
    )
    data = [make_groups(100 + s) for s in range(N)]
    reference = LearnerCore(cfg.learner, model_path)
    expected = [reference.step(g) for g in data][-1]

    ray.init(num_cpus=2, include_dashboard=False, namespace="test-learner", log_to_driver=False)
    try:
        lc = cfg.learner
        buffer = ray.remote(FailOnceBuffer).options(name=buffer_actor_name("lt"), num_cpus=0).remote(
            lc.buffer_max_groups, lc.max_staleness, lc.stale_policy, lc.drop_zero_variance,
            put_timeout_s=5.0, name="lt", fail_at=3)
        publisher = create_publisher_actor("lt-weights")
        for g in (g for step in data for g in step):
            assert ray.get(buffer.put.remote(meta_of(g), [ray.put(g)]))
        trainer = launch_learner(
            cfg, tmp_path / "run", buffer_actor_name("lt"), "lt-weights", namespace="test-learner",
            idle_timeout_s=20.0,
            extra_loop_config={"batch_timeout_s": 1.0},
        )
        result = trainer.fit()
        assert ray.get(buffer.fault_fired.remote())  # the fault really fired
        assert result.metrics["step"] == N
        assert abs(result.metrics["loss"] - expected["loss"]) <= 1e-6
        assert 0.0 <= result.metrics["idle_frac"] < 1.0
        assert result.checkpoint is not None
        status = ray.get(publisher.status.remote())
        assert status["version"] == result.metrics["policy_version"] >= N
        # the buffer knows every group was consumed, none is left
        stats = ray.get(buffer.stats.remote())
        assert stats["size"] == 0 and stats["consumed_ids"] == 2 * N
        # the final checkpoint restores into a fresh core with the same weights
        fresh = LearnerCore(cfg.learner, model_path)
        with result.checkpoint.as_directory() as d:
            extra = fresh.load_checkpoint(d)
        assert len(extra["buffer_state"]["consumed_ids"]) == 2 * N
        for (k, a), b in zip(reference.trainable_state_dict().items(), fresh.trainable_state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    finally:
        ray.shutdown()
