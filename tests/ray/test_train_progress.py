"""Progress of Ray Train runs on the driver: the line format, the rank-0 callback (never raises,
bounded waits) and the driver thread that prints while ``fit()`` blocks, over a real Ray queue."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import ray

from worldagent_ray.runtime.train_progress import (ProgressReporter, fit_with_progress, format_progress,
                                                   progress_callbacks, progress_queue)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]


def test_format_progress():
    msg = {"step": 12, "max_steps": 48, "loss": 0.51234, "accuracy": float("nan")}
    assert format_progress("critic rm", msg, 10.0) == (
        "critic rm: step 12/48 (25%), loss 0.5123, 10.0 s/step, ~6.0 min left")
    assert format_progress("sft", {"step": 3, "max_steps": 0}, None) == "sft: step 3"
    assert format_progress("sft", {"step": 48, "max_steps": 48, "train_loss": 0.2}, 2.0) == (
        "sft: step 48/48 (100%), 2.0 s/step")


def _state(step, rank0=True):
    return SimpleNamespace(global_step=step, max_steps=10, is_world_process_zero=rank0)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=1, include_dashboard=False, namespace="test-train-progress", log_to_driver=False)
    yield
    ray.shutdown()


def test_the_callback_reports_on_rank_zero_only_and_a_full_queue_never_stops_training(ray_local):
    from transformers import TrainerCallback

    assert progress_callbacks(None) == []
    queue = progress_queue(maxsize=1)
    [cb] = progress_callbacks(queue)
    assert isinstance(cb, TrainerCallback)
    cb.on_log(None, _state(1), None, logs={"loss": 0.7, "learning_rate": 1e-4})
    cb.on_log(None, _state(2, rank0=False), None, logs={"loss": 0.6})
    assert queue.qsize() == 1
    [msg] = queue.get_nowait_batch(1)
    assert (msg["step"], msg["max_steps"], msg["loss"]) == (1, 10, 0.7) and "learning_rate" not in msg
    rep = ProgressReporter(queue)
    rep.report(1, 10, {"loss": 0.7})
    assert not rep.failed
    rep.report(2, 10, {"loss": 0.6})  # the queue is full: swallowed, and the reporter stops trying
    rep.report(3, 10, {"loss": 0.5})
    assert rep.failed and queue.qsize() == 1 and queue.get_nowait_batch(1)[0]["step"] == 1
    queue.shutdown()


@ray.remote(num_cpus=0)
def _steps(queue, n, pause):
    rep = ProgressReporter(queue)
    for step in range(1, n + 1):
        time.sleep(pause)
        rep.report(step, n, {"loss": 1.0 / step})
    return n


def test_fit_with_progress_prints_the_workers_steps_while_fit_blocks(ray_local):
    """A remote task stands for the Ray Train worker: its steps reach the driver's printer, at
    most one line per ``every_s``, the last step always; the queue actor is ended afterwards."""
    queue = progress_queue()
    actor, lines = queue.actor, []

    class _Trainer:
        def fit(self):
            return ray.get(_steps.remote(queue, 6, 0.5), timeout=300)  # a loaded machine starts workers slowly

    # every_s larger than the run: the first line and the last step only, whatever the timing
    assert fit_with_progress(_Trainer(), queue, "critic rm", every_s=3600, printer=lines.append) == 6
    assert len(lines) == 2, lines
    assert lines[0].startswith("critic rm: step 1/6 (17%), loss 1.0000"), lines
    assert lines[1].startswith("critic rm: step 6/6 (100%), loss 0.1667") and "s/step" in lines[1], lines
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.qsize.remote(), timeout=60)  # the queue actor was ended


def test_fit_with_progress_ends_the_queue_when_fit_raises(ray_local):
    queue = progress_queue()
    actor = queue.actor

    class _Boom:
        def fit(self):
            raise ValueError("training failed")

    with pytest.raises(ValueError, match="training failed"):
        fit_with_progress(_Boom(), queue, "sft", printer=lambda s: None)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.qsize.remote(), timeout=60)
