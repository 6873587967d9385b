"""Ray Train writes its checkpoints under an S3 run root through the storage layer's pyarrow
filesystem (``RunConfig(storage_path=..., storage_filesystem=...)``); the workers rebuild the
filesystem from their own environment (no credentials in the pickled filesystem)."""

from __future__ import annotations

import pickle

import pytest

from worldagent_ray import storage

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]  # Ray start + a TorchTrainer: ~25 s


def _loop(config):
    import os
    import tempfile

    import ray.train

    for step in range(2):
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "state.txt"), "w") as f:
                f.write(f"step {step}")
            ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(d))


def test_train_checkpoints_land_under_the_s3_root(s3_env, monkeypatch):
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-in-any-pickle")
    root = f"{s3_env}/run/checkpoints"
    path, fs = storage.train_storage(root)
    assert b"not-in-any-pickle" not in pickle.dumps(fs)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        trainer = TorchTrainer(
            _loop,
            scaling_config=ScalingConfig(num_workers=1, use_gpu=False),
            run_config=RunConfig(name="learner", storage_path=path, storage_filesystem=fs,
                                 checkpoint_config=CheckpointConfig(num_to_keep=None)),
        )
        result = trainer.fit()
    finally:
        ray.shutdown()
    assert result.error is None
    files = storage.find(root)
    states = sorted(u for u in files if u.endswith("/state.txt"))
    assert len(states) == 2 and all(u.startswith(f"{root}/learner/checkpoint_") for u in states)
    assert [storage.read_bytes(u) for u in states] == [b"step 0", b"step 1"]
    assert result.checkpoint.path.startswith(path)
