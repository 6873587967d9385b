"""Live progress of a run: a rich bar on a terminal, plain lines otherwise.

On a terminal the bar shows episodes done/planned, the rate, the ETA, the curriculum's
current phase and the success rate of the recent episodes, and, when learning, the learner's
policy version and the staleness of the episodes it trains on. When stdout is not a terminal
(CI, ``ray job logs``, a file) the same facts go out as one plain line every ``every_s``
seconds and at the end. Nothing here blocks or talks to Ray: the driver pushes facts in.

    progress = RunProgress(planned=48, learn=True)
    with progress:                                  # starts and always stops the bar
        driver = EvolveDriver(..., progress=lambda snap: progress.update(snap, session.latest_step))
        ...
    progress.interrupted(summary, run_dir)          # after Ctrl-C: what finished, how to resume

(``progress(done, total)``, :meth:`episodes` and :meth:`learner` feed the same facts piecewise.)
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import IO, Any, Callable, Mapping, Sequence

from ..schemas import Episode


def resume_command(run_dir: Any) -> str:
    """The command that continues the run in ``run_dir``."""
    return f"python jobs/evolve.py --resume {run_dir}"


def _duration(s: float | None) -> str:
    if s is None or s != s or s == float("inf"):
        return "--:--"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class RunProgress:
    """See the module docstring.

    Args:
        planned: episodes the run will commit (grows if the driver reports a larger total).
        learn: show the learner's version and staleness.
        interactive: a rich bar (True) or plain lines (False); None: whether ``out`` is a terminal.
        out: where to write (default ``sys.stdout``).
        every_s: seconds between plain lines.
        window: recent episodes the success rate is computed over.
        clock: monotonic clock (seconds); tests pass their own.
    """

    def __init__(self, planned: int, *, learn: bool = False, interactive: bool | None = None,
                 out: IO[str] | None = None, every_s: float = 10.0, window: int = 32,
                 clock: Callable[[], float] = time.monotonic):
        if planned < 0:
            raise ValueError(f"planned must be >= 0, got {planned}")
        if every_s <= 0:
            raise ValueError(f"every_s must be > 0, got {every_s}")
        self.out = out if out is not None else sys.stdout
        self.interactive = bool(self.out.isatty()) if interactive is None else interactive
        self.learn = learn
        self.every_s = every_s
        self.clock = clock
        self.done = 0
        self.total = planned
        self.failed = 0
        self.phase: int | None = None
        self.version: int | None = None
        self.staleness: float | None = None
        self._recent: deque[bool] = deque(maxlen=window)
        self._driver_success: float | None = None  # from the driver's snapshot (see update)
        self._first: tuple[float, int] | None = None  # (time, done) of the first report
        self._last_line = float("-inf")
        self._last_done: int | None = None  # episodes at the last plain line (one line per count)
        self._bar: Any = None
        self._task: Any = None
        self.lines: list[str] = []  # plain lines written, for the caller's log

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "RunProgress":
        if self.interactive and self._bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]episodes"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
                TextColumn("{task.fields[facts]}"),
                console=Console(file=self.out), transient=False, auto_refresh=True, refresh_per_second=4,
            )
            self._task = self._bar.add_task("episodes", total=max(1, self.total), rate="", facts="")
            self._bar.start()
        return self

    def close(self) -> None:
        """Stop the bar (idempotent); a plain run gets its last line."""
        if self._bar is not None:
            self._refresh()
            self._bar.stop()
            self._bar = None
        elif not self.interactive and self._first is not None and self._last_done != self.done:
            self._emit()

    def __enter__(self) -> "RunProgress":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ facts in
    def __call__(self, done: int, total: int) -> None:
        """The driver's progress callback: ``done`` episodes committed of ``total`` expected."""
        if self._first is None:
            self._first = (self.clock(), done)
        self.done = done
        self.total = max(total, done, self.total)
        self._refresh()

    def update(self, snap: Mapping[str, Any], learner: Any = None) -> None:
        """The driver's progress callback: its snapshot (``committed``, ``planned``,
        ``failed``, ``phase``, ``success_rate`` of the current phase's recent episodes) and,
        when learning, the learner's latest step record (``policy_version``,
        ``staleness_mean``) or None before its first step."""
        self.failed = int(snap.get("failed") or 0)
        self.phase = snap.get("phase", self.phase)
        self._driver_success = snap.get("success_rate")
        if learner is not None:
            self.version = int(learner.policy_version)
            self.staleness = learner.staleness_mean
        self(int(snap["committed"]), int(snap["planned"]))

    def episodes(self, eps: Sequence[Episode], phase: int) -> None:
        """Episodes just committed and the curriculum phase after them."""
        for e in eps:
            if e.status == "failed":
                self.failed += 1
            else:
                self._recent.append(bool(e.success))
        self.phase = phase
        self._refresh()

    def learner(self, version: int, staleness_mean: float | None = None) -> None:
        """The learner's policy version and the mean staleness of its last batch."""
        self.version = version
        self.staleness = staleness_mean
        self._refresh()

    # ------------------------------------------------------------------ derived
    @property
    def rate(self) -> float | None:
        """Episodes per second between the first report and now (so the episodes of an earlier
        part of a resumed run, and the start-up time, do not count); None before two reports."""
        if self._first is None:
            return None
        t0, done0 = self._first
        dt = self.clock() - t0
        n = self.done - done0
        return n / dt if dt > 0 and n > 0 else None

    @property
    def eta_s(self) -> float | None:
        r = self.rate
        return (self.total - self.done) / r if r else None

    @property
    def success_rate(self) -> float | None:
        if self._recent:
            return sum(self._recent) / len(self._recent)
        return self._driver_success

    def facts(self) -> str:
        parts = []
        if self.phase is not None:
            parts.append(f"phase {self.phase}")
        if self.success_rate is not None:
            parts.append(f"success {self.success_rate:.0%}" + (f" (last {len(self._recent)})" if self._recent else ""))
        if self.failed:
            parts.append(f"{self.failed} failed")
        if self.learn:
            if self.version is None:
                parts.append("learner waiting")
            else:
                st = "" if self.staleness is None else f", staleness {self.staleness:.1f}"
                parts.append(f"learner v{self.version}{st}")
        return " · ".join(parts)

    def line(self) -> str:
        pct = f" ({self.done / self.total:.0%})" if self.total else ""
        rate = f"{self.rate:.2f} episodes/s" if self.rate else "-- episodes/s"
        facts = self.facts()
        return (f"[evolve] {self.done}/{self.total} episodes{pct} · {rate} · ETA {_duration(self.eta_s)}"
                + (f" · {facts}" if facts else ""))

    # ------------------------------------------------------------------ output
    def _refresh(self) -> None:
        if self._bar is not None:
            rate = f"{self.rate:.2f} ep/s" if self.rate else "-- ep/s"
            self._bar.update(self._task, completed=self.done, total=max(1, self.total), rate=rate,
                             facts=self.facts())
        elif not self.interactive and self._first is not None:
            now = self.clock()
            due = now - self._last_line >= self.every_s or (self.total and self.done >= self.total)
            if due and self._last_done != self.done:
                self._emit()

    def _emit(self) -> None:
        self._last_line = self.clock()
        self._last_done = self.done
        text = self.line()
        self.lines.append(text)
        print(text, file=self.out, flush=True)

    def interrupted(self, summary: Mapping[str, Any], run_dir: Any) -> str:
        """After Ctrl-C: say what finished and how to resume (printed, and returned)."""
        self.close()
        text = (f"interrupted: {summary.get('episodes', self.done)} episodes are committed "
                f"({summary.get('failed', self.failed)} failed) in {run_dir}; nothing finished is lost.\n"
                f"continue with: {resume_command(run_dir)}")
        print(text, file=self.out, flush=True)
        return text
