"""Progress of Ray Train runs on the driver's console.

The jobs start Ray with ``log_to_driver=False`` (quiet consoles), so what a Ray Train worker
prints never reaches the user who waits on ``TorchTrainer.fit()`` — for an hour, with the
default critic budget on a CPU. Here rank 0's Hugging Face trainer reports each log (step,
loss) through a small Ray queue (an actor, so it works across nodes), and a driver thread
prints a line at most every ``every_s`` seconds:

    critic rm: step 12/48 (25%), loss 0.5123, 13.1 s/step, ~7.9 min left

Reporting never fails training: a full or dead queue ends the reporting.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable

__all__ = ["ProgressReporter", "fit_with_progress", "format_progress", "progress_callbacks", "progress_queue"]


def progress_queue(maxsize: int = 1000) -> Any:
    """A Ray queue for progress messages (a zero-CPU actor: it never takes a trainer's core)."""
    from ray.util.queue import Queue

    return Queue(maxsize=maxsize, actor_options={"num_cpus": 0})


def format_progress(label: str, msg: dict[str, Any], sec_per_step: float | None) -> str:
    """One console line from a progress message (``step``, ``max_steps``, ``loss``...)."""
    step, total = int(msg.get("step", 0)), int(msg.get("max_steps") or 0)
    parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total > 0 else f"step {step}"]
    for key in ("loss", "accuracy"):
        v = msg.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            parts.append(f"{key} {v:.4f}")
    if sec_per_step is not None and sec_per_step > 0:
        parts.append(f"{sec_per_step:.1f} s/step")
        if total > step:
            parts.append(f"~{(total - step) * sec_per_step / 60:.1f} min left")
    return f"{label}: " + ", ".join(parts)


class ProgressReporter:
    """Puts ``{step, max_steps, loss, accuracy, time}`` on a :func:`progress_queue` (one round
    trip to its actor, at most ``timeout_s``). Never raises: a full, slow or dead queue ends
    the reporting, not the training."""

    def __init__(self, queue: Any, timeout_s: float = 5.0):
        self.queue = queue
        self.timeout_s = timeout_s
        self.failed = False

    def report(self, step: int, max_steps: int, logs: dict[str, Any] | None = None) -> None:
        if self.queue is None or self.failed:
            return
        import ray

        msg: dict[str, Any] = {"step": int(step), "max_steps": int(max_steps or 0), "time": time.time()}
        for key in ("loss", "accuracy", "train_loss"):
            v = (logs or {}).get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                msg[key] = float(v)
        try:
            ray.get(self.queue.actor.put_nowait.remote(msg), timeout=self.timeout_s)
        except Exception:  # full, slow, or the driver is gone: progress is best effort, training is not
            self.failed = True


def progress_callbacks(queue: Any) -> list[Any]:
    """``[a transformers TrainerCallback]`` whose rank 0 reports every log to ``queue``, or ``[]``
    without a queue (built here so that importing this module does not import transformers)."""
    if queue is None:
        return []
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def __init__(self) -> None:
            self.reporter = ProgressReporter(queue)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            if state.is_world_process_zero:
                self.reporter.report(state.global_step, state.max_steps, logs)

    return [ProgressCallback()]


def fit_with_progress(trainer: Any, queue: Any, label: str, every_s: float = 15.0,
                      printer: Callable[[str], None] = lambda s: print(s, flush=True)) -> Any:
    """``trainer.fit()``, printing ``label``'s progress from ``queue`` meanwhile (at most one
    line every ``every_s`` seconds, and the last step always); the queue actor is ended after."""
    stop = threading.Event()
    state: dict[str, Any] = {"first": None, "last_print": float("-inf"), "last": None, "printed": None}

    def show(msg: dict[str, Any]) -> None:
        first = state["first"]
        rate = None
        if first is not None and msg["step"] > first["step"]:
            rate = (msg["time"] - first["time"]) / (msg["step"] - first["step"])
        printer(format_progress(label, msg, rate))
        state["last_print"], state["printed"] = time.monotonic(), msg["step"]

    def take(timeout: float) -> list[Any]:  # every waiting message; bounded waits (a busy or dead actor must not hang us)
        import ray

        try:
            n = ray.get(queue.actor.qsize.remote(), timeout=timeout)
            return ray.get(queue.actor.get_nowait_batch.remote(n), timeout=timeout) if n else []
        except Exception:
            return []

    def drain() -> None:
        while True:
            final = stop.is_set()
            msgs = take(30.0 if final else 10.0)
            for msg in msgs:
                if not isinstance(msg, dict) or "step" not in msg:
                    continue
                if state["first"] is None:
                    state["first"] = msg
                state["last"] = msg
                if time.monotonic() - state["last_print"] >= every_s:
                    show(msg)
            if final:
                return
            stop.wait(1.0)

    thread = threading.Thread(target=drain, name=f"progress-{label}", daemon=True)
    thread.start()
    try:
        return trainer.fit()
    finally:
        stop.set()
        thread.join(timeout=75)
        last = state["last"]
        if last is not None and state["printed"] != last["step"]:
            show(last)
        try:
            queue.shutdown()
        except Exception:
            pass
