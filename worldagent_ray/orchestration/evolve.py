"""The self-evolving loop, top to bottom (seed 000):

    Curriculum -> Action (G plans per task) -> World model -> Critic -> World memory -> Curriculum
                                                                  \\-> GRPO learner (with --learn)

Every stage is a pool of asyncio workers pulling from a bounded queue, so all stages are busy
at once and a slow stage pushes back on the ones before it (no lock-step rounds):

    proposer --action_q--> action workers --world_q--> world workers --critic_q--> critic workers
                                                                                    (commit)

The driver talks to the rest of the system only through the contracts of ``api.py``:
:class:`~worldagent_ray.orchestration.api.Services` (plain async methods; ``runtime/services.py``
adapts Ray handles to it, tests use in-process fakes) and, when learning,
:class:`~worldagent_ray.orchestration.api.Learner`.

Failure boundaries (nothing is lost, nothing hangs, nothing is rewritten silently):

- Every call goes through :meth:`EvolveDriver._call`: a timeout, retries with exponential
  backoff, then :class:`StageError`. A group whose call fails for good becomes recorded
  failed episodes; the run goes on.
- No exception leaves a worker or the proposer: an unexpected one is recorded as an event and
  its group still finishes its round, so the drain cannot wait forever.
- The commit is a small idempotent transaction: memory (the source of truth that resume
  reads), then the ledger, then the curriculum. An item whose memory write succeeded is never
  committed again; a ledger or curriculum write that fails (a full disk) ends the run with a
  clear error, and resume restores the missing ledger rows from memory.
- A watchdog ends the run (resumable) when no call finishes for ``run.watchdog_timeouts``
  stage timeouts.

Resume: rounds are recorded in ``tasks.jsonl`` before dispatch; on ``--resume`` every episode
that is not in memory is dispatched again, failed episodes are retried until
``run.max_attempts`` (each attempt is a ledger row), and rounds that were never recorded are
proposed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from ..agents.curriculum import update_phase
from ..config import Config
from ..rl.groups import scored_group
from ..schemas import (ActionRequest, CurriculumState, Episode, EpisodeRow, MemoryHit, Outcome, PlanSample,
                       Rollout, Task, Verdict, episode_id)
from .api import Learner, Services
from .run_folder import RunFolder

log = logging.getLogger(__name__)
T = TypeVar("T")


class StageError(RuntimeError):
    """A call that failed after every retry."""


# ====================================================================== work items


@dataclass
class WorkItem:
    """One task on its way through the pipeline (its G samples travel together: a GRPO group)."""

    round: int
    slot: int
    task: Task
    attempts: dict[int, int]  # sample index -> attempt number of the episodes to commit
    hits: list[MemoryHit] = field(default_factory=list)
    samples: list[PlanSample] | None = None
    rollouts: list[Rollout] | None = None
    verdicts: list[Verdict] | None = None
    policy_version: int = 0
    failure: str | None = None
    committed: bool = False
    finished: bool = False
    t_start: float = field(default_factory=time.time)


# ====================================================================== driver


class EvolveDriver:
    """Runs the loop of one run folder; :meth:`run_loop` returns the summary.

    Args:
        cfg: the whole config (``run``, ``agents``, ``memory.enabled``).
        run: the run folder (ledgers, curriculum state).
        services: the parts (see :class:`Services`).
        learner: the learner, or None.
        metrics: an object with ``stage(stage, seconds, depths)``, ``retry(stage)`` and
            ``episodes(episodes, phase)`` (Ray metrics in a run), or None.
        progress: called with a snapshot dict after every commit (see :meth:`snapshot`).
    """

    def __init__(self, cfg: Config, run: RunFolder, services: Services, *, learner: Learner | None = None,
                 metrics: Any = None, progress: Callable[[dict[str, Any]], None] | None = None):
        self.cfg = cfg
        self.run = run
        self.s = services
        self.learner = learner
        self.metrics = metrics
        self.progress = progress
        self.G = cfg.agents.action.group_size
        lim = cfg.run.pipeline
        self.queues: dict[str, asyncio.Queue[WorkItem]] = {
            "action": asyncio.Queue(maxsize=lim.action.queue),
            "world": asyncio.Queue(maxsize=lim.world.queue),
            "critic": asyncio.Queue(maxsize=lim.critic.queue),
        }
        self.state = CurriculumState(phase=cfg.agents.curriculum.start_phase)
        self.recent: list[Outcome] = []
        self.status: dict[str, str] = {}  # episode id -> status of its latest committed attempt
        self.uncommitted = 0  # episodes whose memory write failed for good (redone on resume)
        self.planned = cfg.run.iterations * cfg.agents.curriculum.tasks_per_proposal * self.G
        self.skipped_rounds: list[int] = []
        self.feeding = learner is not None
        self.fed = 0
        self.error: str | None = None  # why the run ended early (resumable)
        self._round_sizes: dict[int, int] = {}
        self._rounds_done: dict[int, int] = defaultdict(int)
        self._cv = asyncio.Condition()
        self._commit_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._last_progress = time.monotonic()
        self.started = time.time()

    # ================================================================== main
    async def run_loop(self) -> dict[str, Any]:
        pending, rounds_to_propose = await self._resume_state()
        workers = [
            asyncio.create_task(self._worker(stage, self._stage_fn(stage)), name=f"{stage}-{i}")
            for stage in ("action", "world", "critic")
            for i in range(getattr(self.cfg.run.pipeline, stage).workers)
        ]
        watchdog = asyncio.create_task(self._watchdog(), name="watchdog")
        try:
            await self._propose(pending, rounds_to_propose)
            await self._drain()
        finally:
            tasks = [*workers, watchdog]
            for t in tasks:
                t.cancel()
            # bounded: a call that ignores cancellation must not hang the end of the run
            _, stuck = await asyncio.wait(tasks, timeout=10.0)
            if stuck:
                log.error("%d driver task(s) did not stop within 10 s of cancellation: %s", len(stuck),
                          sorted(t.get_name() for t in stuck))
        return self.summary()

    def stop(self, reason: str) -> None:
        """End the run early (resumable): propose nothing more, abandon in-flight work."""
        if self.error is None:
            self.error = reason
            log.error("run ends early: %s", reason)
            self._event("run_stopped", reason=reason)
        self._stop.set()

    # ================================================================== resume
    async def _resume_state(self) -> tuple[list[WorkItem], list[int]]:
        """Groups with episodes still to commit, and the rounds never recorded."""
        saved = self.run.load_curriculum()
        if saved is not None:
            self.state = saved
        stored: set[str] | None = None
        if self.cfg.memory.enabled:
            stored = await self._call("memory", lambda: self.s.stored_ids(self.run.run_id), memory=True)
            await self._reconcile_ledger(stored)
        last: dict[str, EpisodeRow] = {}
        for row in self.run.episode_rows():
            last[row.id] = row
        committed = set(last) if stored is None else stored
        self.status = {eid: (last[eid].status if eid in last else "ok") for eid in committed}
        pending: list[WorkItem] = []
        recorded: set[int] = set()
        retried = 0
        for rnd in self.run.rounds():
            recorded.add(rnd.round)
            n_items = 0
            for slot, task in enumerate(rnd.tasks):
                attempts: dict[int, int] = {}
                for i in range(self.G):
                    eid = episode_id(self.run.run_id, task.id, i)
                    row = last.get(eid)
                    if eid not in committed:
                        attempts[i] = row.attempt + 1 if row else 1
                    elif row is not None and row.status == "failed" and row.attempt < self.cfg.run.max_attempts:
                        attempts[i] = row.attempt + 1
                        retried += 1
                if attempts:
                    pending.append(WorkItem(rnd.round, slot, task, attempts))
                    n_items += 1
            self._round_sizes[rnd.round] = n_items
        for r in list(last.values())[-4 * self.cfg.agents.curriculum.window:]:
            if r.status == "ok":
                self.recent.append(Outcome(phase=r.phase, success=r.success, goal=r.goal, reward=r.reward,
                                           caption=r.caption))
        if pending or recorded:
            self._event("resume", pending_groups=len(pending), committed=self.committed, retried_failed=retried,
                        recorded_rounds=len(recorded))
        to_propose = [r for r in range(self.cfg.run.iterations) if r not in recorded]
        return pending, to_propose

    async def _reconcile_ledger(self, stored: set[str]) -> None:
        """Episodes in memory but not in the ledger (a crash or a failed write between the two)
        get their ledger rows back from memory, so the ledger never silently misses one."""
        missing = sorted(stored - {r.id for r in self.run.episode_rows()})
        if not missing:
            return
        eps = await self._call("memory", lambda: self.s.stored_episodes(missing), memory=True)
        rows = [EpisodeRow(**e.summary().model_dump(), t=time.time()) for e in eps]
        self.run.record_episodes(rows)
        self._event("ledger_reconciled", episodes=len(rows), missing=len(missing) - len(rows))

    # ================================================================== proposer
    async def _propose(self, pending: list[WorkItem], rounds: list[int]) -> None:
        for item in pending:
            if self._stop.is_set():
                return
            await self.queues["action"].put(item)
        cur = self.cfg.agents.curriculum
        for rnd in rounds:
            # Keep at most `lookahead_rounds` rounds in flight: stages stay busy while the
            # curriculum still sees recent outcomes.
            async with self._cv:
                await self._cv.wait_for(
                    lambda: self._open_rounds() < self.cfg.run.lookahead_rounds or self._stop.is_set())
            if self._stop.is_set():
                return
            try:
                await self._propose_round(rnd, cur.tasks_per_proposal)
            except StageError as e:
                self.skipped_rounds.append(rnd)
                self._event("round_skipped", round=rnd, error=str(e)[:500])
            except OSError as e:
                self.stop(f"cannot record round {rnd} in {self.run.tasks_path}: {e}")
                return
            except Exception as e:  # never let the proposer die: record and go on
                log.exception("round %d could not be proposed", rnd)
                self.skipped_rounds.append(rnd)
                self._event("round_skipped", round=rnd, error=f"{type(e).__name__}: {e}"[:500])

    async def _propose_round(self, rnd: int, n: int) -> None:
        cur = self.cfg.agents.curriculum
        mastered: set[str] = set()
        if self.cfg.memory.enabled:
            try:
                mastered = await self._call(
                    "memory", lambda: self.s.mastered_goals(cur.mastered_threshold, max(2, self.G)), memory=True)
            except StageError as e:
                self._event("mastered_goals_failed", round=rnd, error=str(e)[:300])
        before = self.state
        proposal = await self._call("curriculum", lambda: self.s.propose(
            before, self.recent[-16:], mastered, n, rnd))
        tasks = []
        for i, t in enumerate(proposal.tasks):
            t = t.model_copy(update={"id": f"r{rnd:04d}.{i}.{t.id}"[:200]})
            try:
                t = await self._call("world", lambda t=t: self.s.prepare(t, f"{self.run.artifacts}/reference"))
            except StageError as e:
                self._event("prepare_failed", task=t.id, error=str(e)[:300])
            tasks.append(t)
        self.run.record_round(rnd, tasks, list(proposal.sources))
        # The curriculum only counts proposals and fallbacks; phase and outcomes are the
        # driver's (commits may have changed them while the proposal was being made).
        self.state = self.state.model_copy(update={
            "proposed": self.state.proposed + proposal.state.proposed - before.proposed,
            "fallbacks": self.state.fallbacks + proposal.state.fallbacks - before.fallbacks,
        })
        self._save_curriculum()
        if proposal.notes:
            self._event("curriculum", round=rnd, notes=proposal.notes[:10], sources=list(proposal.sources))
        self._round_sizes[rnd] = len(tasks)
        for slot, task in enumerate(tasks):
            await self.queues["action"].put(WorkItem(rnd, slot, task, {i: 1 for i in range(self.G)}))

    def _open_rounds(self) -> int:
        return sum(1 for r, n in self._round_sizes.items() if self._rounds_done[r] < n)

    async def _drain(self) -> None:
        async with self._cv:
            await self._cv.wait_for(lambda: self._open_rounds() == 0 or self._stop.is_set())

    # ================================================================== stages
    def _stage_fn(self, stage: str) -> Callable[[WorkItem], Awaitable[None]]:
        return {"action": self._act, "world": self._render, "critic": self._score}[stage]

    async def _worker(self, stage: str, fn: Callable[[WorkItem], Awaitable[None]]) -> None:
        q = self.queues[stage]
        nxt = {"action": "world", "world": "critic", "critic": None}[stage]
        while True:
            item = await q.get()
            try:
                await self._process(stage, item, fn, nxt)
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # the boundary: nothing leaves a worker
                log.exception("driver error on group %s at %s", item.task.id, stage)
                self._event("driver_error", stage=stage, task=item.task.id, error=f"{type(e).__name__}: {e}"[:500])
                await self._finish(item)
            finally:
                q.task_done()

    async def _process(self, stage: str, item: WorkItem, fn: Callable[[WorkItem], Awaitable[None]],
                       nxt: str | None) -> None:
        t0 = time.time()
        if item.failure is None:
            try:
                await fn(item)
            except asyncio.CancelledError as e:
                if _being_cancelled():
                    raise
                item.failure = f"{stage}: cancelled by the callee: {e}"[:500]
            except Exception as e:  # the group fails, the run goes on
                item.failure = (str(e) if isinstance(e, StageError) else f"{stage}: {type(e).__name__}: {e}")[:500]
                log.warning("episode group %s failed at %s: %s", item.task.id, stage, item.failure)
        self._guarded("metrics", lambda: self.metrics and self.metrics.stage(stage, time.time() - t0, self._depths()))
        if nxt is not None and not self._stop.is_set():
            await self.queues[nxt].put(item)
        elif nxt is None:
            await self._commit(item)
        else:
            await self._finish(item)  # stopping: abandon (redone on resume)

    async def _act(self, item: WorkItem) -> None:
        a = self.cfg.agents.action
        if a.use_memory and a.memory_top_k > 0 and self.cfg.memory.enabled:
            try:
                item.hits = await self._call("memory", lambda: self.s.recall(item.task.goal, a.memory_top_k),
                                             memory=True)
            except StageError as e:  # plans without memory beat no plans
                self._event("recall_failed", task=item.task.id, error=str(e)[:300])
        req = ActionRequest(task=item.task, memory=item.hits, vocabulary=self.s.vocabulary(item.task),
                            seed=_seed(self.cfg.run.seed, self.run.run_id, item.task.id, _attempt_of(item)))
        samples = await self._call("action", lambda: self.s.act(req))
        if len(samples) != self.G:
            raise StageError(f"action returned {len(samples)} samples, expected {self.G}")
        item.samples = samples
        item.policy_version = min((s.completion.weights_version for s in samples), default=0)

    async def _render(self, item: WorkItem) -> None:
        assert item.samples is not None
        seeds = [_seed(self.cfg.run.seed, episode_id(self.run.run_id, item.task.id, i)) for i in range(self.G)]
        item.rollouts = await self._call("world", lambda: self.s.render(
            item.task, [s.plan for s in item.samples], f"{self.run.videos}/{item.task.id}", seeds))
        if len(item.rollouts) != self.G:
            raise StageError(f"world returned {len(item.rollouts)} rollouts, expected {self.G}")

    async def _score(self, item: WorkItem) -> None:
        assert item.samples is not None and item.rollouts is not None
        items = [(item.task, s.plan, r) for s, r in zip(item.samples, item.rollouts)]
        item.verdicts = await self._call("critic", lambda: self.s.score(items))
        if len(item.verdicts) != self.G:
            raise StageError(f"critic returned {len(item.verdicts)} verdicts, expected {self.G}")

    # ================================================================== commit
    def _episodes(self, item: WorkItem) -> list[Episode]:
        eps = []
        now = time.time()
        for i in sorted(item.attempts):
            kw: dict[str, Any] = {"created_at": now, "policy_version": item.policy_version, "round": item.round,
                                  "attempt": item.attempts[i]}
            if item.failure is not None:
                kw.update(status="failed", failure_reason=item.failure)
            if item.samples is not None:
                s = item.samples[i]
                kw.update(plan=s.plan, plan_error=s.error, raw_output=s.completion.text[:4000], prompt=s.prompt,
                          prompt_token_ids=s.completion.prompt_token_ids,
                          completion_token_ids=s.completion.token_ids,
                          completion_logprobs=s.completion.logprobs, retrieved_ids=s.retrieved_ids)
            if item.rollouts is not None:
                kw["rollout"] = item.rollouts[i]
            if item.verdicts is not None:
                kw["verdict"] = item.verdicts[i]
            eps.append(Episode.new(self.run.run_id, item.task, i, **kw))
        return eps

    async def _commit(self, item: WorkItem) -> None:
        """memory -> ledger -> curriculum, once per item; the round finishes whatever happens."""
        try:
            if item.committed:
                return
            eps = self._episodes(item)
            if self.cfg.memory.enabled:
                try:
                    await self._call("memory", lambda: self.s.remember(eps), memory=True)
                except StageError as e:
                    self.uncommitted += len(eps)
                    self._event("memory_write_failed", task=item.task.id, episodes=[e_.id for e_ in eps],
                                error=str(e)[:500])
                    return
                item.committed = True  # in memory: never committed again, whatever follows
            rows = [EpisodeRow(**e.summary().model_dump(), t=time.time(), latency_s=time.time() - item.t_start,
                               memory_hits=len(item.hits)) for e in eps]
            async with self._commit_lock:
                try:
                    self.run.record_episodes(rows)
                except OSError as e:
                    self.stop(f"cannot write the ledger {self.run.metrics_path}: {e}")
                    return
                item.committed = True
                self.status.update({e.id: e.status for e in eps})
                outcomes = [Outcome(phase=e.task.phase, success=e.success, goal=e.task.goal, reward=e.reward,
                                    caption=e.verdict.state_caption if e.verdict else "")
                            for e in eps if e.status == "ok"]
                self.recent = (self.recent + outcomes)[-256:]
                before = self.state.phase
                self.state = update_phase(self.cfg.agents.curriculum, self.state, outcomes)
                if self.state.phase != before:
                    self._event("phase", **self.state.promotions[-1])
                self._save_curriculum()
            self._guarded("metrics", lambda: self.metrics and self.metrics.episodes(eps, self.state.phase))
            self._guarded("progress", lambda: self.progress and self.progress(self.snapshot()))
            await self._feed(item, eps)
        finally:
            await self._finish(item)

    async def _feed(self, item: WorkItem, eps: list[Episode]) -> None:
        if not self.feeding or item.failure is not None or item.samples is None or item.verdicts is None:
            return
        assert self.learner is not None
        try:
            reason = await self._call("learner", self.learner.healthy, memory=True, retries=0)
            if reason is not None:
                self.feeding = False
                self.stop(f"the learner stopped: {reason}")
                return
            group = scored_group(item.task, f"{self.run.run_id}:{item.task.id}", item.samples,
                                 [v.reward for v in item.verdicts], item.policy_version, [e.id for e in eps])
            if group is not None and await self._call("learner", lambda: self.learner.feed(group), memory=True):
                self.fed += 1
        except Exception as e:  # learning is best effort per group; the episodes are already safe
            self._event("learner_feed_failed", task=item.task.id, error=f"{type(e).__name__}: {e}"[:300])

    async def _finish(self, item: WorkItem) -> None:
        if item.finished:
            return
        item.finished = True
        async with self._cv:
            self._rounds_done[item.round] += 1
            self._cv.notify_all()

    def _save_curriculum(self) -> None:
        try:
            self.run.save_curriculum(self.state)
        except OSError as e:
            self.stop(f"cannot save the curriculum state in {self.run.local}: {e}")

    # ================================================================== helpers
    async def _call(self, what: str, make: Callable[[], Awaitable[T]], *, memory: bool = False,
                    retries: int | None = None) -> T:
        """Await ``make()`` with a timeout; retry with exponential backoff; then StageError."""
        r = self.cfg.run
        timeout = r.memory_timeout_s if memory else r.stage_timeout_s
        retries = r.max_retries if retries is None else retries
        last: BaseException | None = None
        for attempt in range(retries + 1):
            try:
                result = await asyncio.wait_for(make(), timeout)
                self._last_progress = time.monotonic()
                return result
            except asyncio.CancelledError as e:
                if _being_cancelled():
                    raise
                last = e  # the callee cancelled its own work (e.g. a request cancelled remotely)
                self._last_progress = time.monotonic()
                log.warning("%s call was cancelled by the callee (attempt %d/%d)", what, attempt + 1, retries + 1)
                if attempt < retries:
                    await asyncio.sleep(min(r.retry_backoff_s * 2 ** attempt, 30.0))
                continue
            except Exception as e:
                last = e
                self._last_progress = time.monotonic()  # an answer (even an error) is progress
                why = f"timed out after {timeout:g}s" if isinstance(e, asyncio.TimeoutError) else f"{type(e).__name__}: {e}"
                log.warning("%s call failed (attempt %d/%d): %s", what, attempt + 1, retries + 1, why)
                self._guarded("metrics", lambda: self.metrics and self.metrics.retry(what))
                if attempt < retries:
                    await asyncio.sleep(min(r.retry_backoff_s * 2 ** attempt, 30.0))
        why = f"timed out after {timeout:g}s" if isinstance(last, asyncio.TimeoutError) else \
            f"{type(last).__name__}: {str(last)[:300]}"
        raise StageError(f"{what} failed after {retries + 1} attempt(s): {why}")

    async def _watchdog(self) -> None:
        limit = self.cfg.run.watchdog_timeouts * max(self.cfg.run.stage_timeout_s, self.cfg.run.memory_timeout_s)
        while not self._stop.is_set():
            await asyncio.sleep(min(5.0, limit / 10))
            idle = time.monotonic() - self._last_progress
            if idle > limit and self._open_rounds() > 0:
                self.stop(f"no stage finished a call for {idle:.0f}s ({self.cfg.run.watchdog_timeouts} timeouts); "
                          f"queues {self._depths()}")
                async with self._cv:
                    self._cv.notify_all()

    def _event(self, event: str, **fields: Any) -> None:
        self._guarded("ledger event", lambda: self.run.record_event(event, **fields))

    @staticmethod
    def _guarded(what: str, fn: Callable[[], Any]) -> None:
        """Run a side effect that must never end the run (metrics, progress, events)."""
        try:
            fn()
        except Exception as e:
            log.warning("%s failed: %s: %s", what, type(e).__name__, e)

    @property
    def committed(self) -> int:
        """Distinct episodes committed (a retried episode counts once)."""
        return len(self.status)

    @property
    def failed(self) -> int:
        """Committed episodes whose latest attempt failed."""
        return sum(1 for v in self.status.values() if v == "failed")

    def _depths(self) -> dict[str, int]:
        return {k: q.qsize() for k, q in self.queues.items()}

    def snapshot(self) -> dict[str, Any]:
        """Progress so far: committed/planned episodes, rate, phase, recent success."""
        elapsed = time.time() - self.started
        recent = [o for o in self.recent[-32:] if o.phase == self.state.phase]
        return {
            "committed": self.committed, "planned": self.planned, "failed": self.failed,
            "elapsed_s": elapsed, "episodes_per_s": self.committed / elapsed if elapsed > 0 else 0.0,
            "phase": self.state.phase,
            "success_rate": sum(o.success for o in recent) / len(recent) if recent else None,
            "fed_groups": self.fed if self.learner is not None else None,
        }

    def summary(self) -> dict[str, Any]:
        out = summarize(self.run.episode_rows(), time.time() - self.started, self.state)
        out.update(uncommitted=self.uncommitted, skipped_rounds=list(self.skipped_rounds), error=self.error)
        if self.learner is not None:
            out["fed_groups"] = self.fed
        return out


# ====================================================================== free functions


def _being_cancelled() -> bool:
    """True when the current task itself is being cancelled (not a CancelledError raised by a callee)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _seed(*parts: Any) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def _attempt_of(item: WorkItem) -> int:
    """The attempt number that seeds a group's sampling (a retry draws new samples)."""
    return max(item.attempts.values(), default=1)


def summarize(rows: Sequence[EpisodeRow], elapsed_s: float, state: CurriculumState | None = None) -> dict[str, Any]:
    """Per-phase counts from the ledger; the last row of an id wins (a retried episode counts once)."""
    seen: dict[str, EpisodeRow] = {}
    for r in rows:
        seen[r.id] = r
    by_phase: dict[int, dict[str, Any]] = {}
    for r in seen.values():
        p = by_phase.setdefault(r.phase, {"episodes": 0, "ok": 0, "failed": 0, "success": 0, "reward": 0.0})
        p["episodes"] += 1
        if r.status == "failed":
            p["failed"] += 1
            continue
        p["ok"] += 1
        p["success"] += int(r.success)
        p["reward"] += r.reward
    for p in by_phase.values():
        p["success_rate"] = p["success"] / p["ok"] if p["ok"] else 0.0
        p["mean_reward"] = p["reward"] / p["ok"] if p["ok"] else 0.0
    n = len(seen)
    return {
        "episodes": n, "rows": len(rows),
        "failed": sum(p["failed"] for p in by_phase.values()),
        "by_phase": dict(sorted(by_phase.items())), "elapsed_s": elapsed_s,
        "episodes_per_s": n / elapsed_s if elapsed_s > 0 else 0.0,
        "phase": state.phase if state else None,
        "promotions": state.promotions if state else [],
    }
