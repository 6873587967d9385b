"""The self-evolving loop, top to bottom (seed 000):

    Curriculum -> Action (G plans per task) -> World model -> Critic -> World memory -> Curriculum
                                                                  \\-> GRPO buffer (with --learn)

Every stage is a pool of asyncio workers pulling from a bounded queue, so all stages are busy
at once and a slow stage pushes back on the ones before it (no lock-step rounds):

    proposer --action_q--> action workers --world_q--> world workers --critic_q--> critic workers
                                                                                    (commit)

``commit`` writes the group's episodes to memory (idempotent upsert by deterministic id), then
to ``metrics.jsonl``, updates the curriculum state and feeds the learner. A request that fails
(engine error, crashed replica, timeout) is retried, and after the last retry becomes a
recorded failed episode: the run never stops for it and no episode goes missing.

Resume: tasks are written to ``tasks.jsonl`` before they are dispatched; on ``--resume`` every
task whose episodes are not all in memory is dispatched again (only the missing episode ids
are written), then proposing continues from the next round.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ..agents.curriculum import update_phase
from ..config import Config
from ..schemas import ActionRequest, CurriculumState, Episode, MemoryHit, Outcome, PlanSample, Rollout, Task, Verdict, episode_id
from .run_folder import RunFolder

log = logging.getLogger(__name__)


@dataclass
class WorkItem:
    """One task on its way through the pipeline (its G samples travel together: a GRPO group)."""

    round: int
    slot: int
    task: Task
    missing: set[int]  # sample indices whose episodes are not yet committed
    hits: list[MemoryHit] = field(default_factory=list)
    samples: list[PlanSample] | None = None
    rollouts: list[Rollout] | None = None
    verdicts: list[Verdict] | None = None
    policy_version: int = 0
    failure: str | None = None
    t_start: float = field(default_factory=time.time)


class StageError(RuntimeError):
    pass


class Interrupted(Exception):
    """Raised inside the driver when ``stop_after_episodes`` is reached (tests a crash)."""


@dataclass
class Services:
    """Handles the driver talks to; any object with these async-callable methods works."""

    action: Any      # .act.remote(list[ActionRequest]) -> list[list[PlanSample]]
    world: Any       # .render.remote(task, plans, out_dir, reference_image, seeds) -> list[Rollout]
    critic: Any      # .score.remote(list[(task, plan, rollout)]) -> list[Verdict]
    curriculum: Any  # .propose.remote(state, recent, mastered, n, round) -> Proposal
    memory: Any      # Ray actor: upsert / retrieve / ids / mastered_goals
    vocabulary: Callable[[Task], list[str] | None] | None = None
    buffer: Any = None  # GroupFeeder or None


class EvolveDriver:
    def __init__(self, cfg: Config, run: RunFolder, services: Services, *, metrics=None,
                 progress: Callable[[int, int], None] | None = None, stop_after_episodes: int | None = None):
        self.cfg = cfg
        self.run = run
        self.s = services
        self.metrics = metrics
        self.progress = progress
        self.stop_after = stop_after_episodes
        G = cfg.agents.action.group_size
        self.G = G
        lim = cfg.run.pipeline
        self.action_q: asyncio.Queue[WorkItem | None] = asyncio.Queue(maxsize=lim.action.queue)
        self.world_q: asyncio.Queue[WorkItem | None] = asyncio.Queue(maxsize=lim.world.queue)
        self.critic_q: asyncio.Queue[WorkItem | None] = asyncio.Queue(maxsize=lim.critic.queue)
        self.n_workers = {k: getattr(lim, k).workers for k in ("action", "world", "critic")}
        self.state: CurriculumState = CurriculumState(phase=cfg.agents.curriculum.start_phase)
        self.recent: list[Outcome] = []
        self.committed = 0
        self.expected = 0  # episodes of the tasks proposed so far
        self.planned = cfg.run.iterations * cfg.agents.curriculum.tasks_per_proposal * G
        self.failed = 0
        self._rounds_done: dict[int, int] = defaultdict(int)
        self._round_sizes: dict[int, int] = {}
        self._round_cv = asyncio.Condition()
        self._commit_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self.started = time.time()

    # ================================================================== main
    async def run_loop(self) -> dict[str, Any]:
        pending, next_round = await self._resume_state()
        stages = [
            *(self._worker("action", self.action_q, self._act, self.world_q) for _ in range(self.n_workers["action"])),
            *(self._worker("world", self.world_q, self._render, self.critic_q) for _ in range(self.n_workers["world"])),
            *(self._worker("critic", self.critic_q, self._score_and_commit, None) for _ in range(self.n_workers["critic"])),
        ]
        workers = [asyncio.create_task(w) for w in stages]
        try:
            await self._propose(pending, next_round)
            await self._drain()
        except Interrupted:
            log.warning("stopped after %d committed episodes (stop_after_episodes)", self.committed)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        return self.summary()

    # ================================================================== proposer
    async def _resume_state(self) -> tuple[list[WorkItem], int]:
        """Tasks already proposed whose episodes are not all in memory, and the next round."""
        saved = self.run.load_curriculum()
        if saved is not None:
            self.state = saved
        done: set[str] = set(await self.s.memory.ids.remote(self.run.run_id))
        self.committed = len(done)
        pending, rounds = [], set()
        for rnd, slot, task in self.run.tasks():
            rounds.add(rnd)
            missing = {i for i in range(self.G) if episode_id(self.run.run_id, task.id, i) not in done}
            self.expected += self.G
            self._round_sizes[rnd] = self._round_sizes.get(rnd, 0) + 1
            if missing:
                pending.append(WorkItem(rnd, slot, task, missing))
            else:
                self._rounds_done[rnd] += 1
        await self._reconcile_ledger(done)
        for row in self.run.episode_rows()[-4 * self.cfg.agents.curriculum.window:]:
            self.recent.append(Outcome(phase=row["phase"], success=row["success"], goal=row["goal"],
                                       reward=row["reward"], caption=row.get("caption", "")))
        if pending:
            self.run.record_event(event="resume", pending_tasks=len(pending), committed=self.committed)
        return pending, (max(rounds) + 1 if rounds else 0)

    async def _reconcile_ledger(self, done: set[str]) -> None:
        """Episodes in memory but not in metrics.jsonl (a crash between the two writes) get
        their ledger rows back from memory, so the ledger never silently misses one."""
        missing = done - {r["id"] for r in self.run.episode_rows()}
        if not missing:
            return
        rows = []
        for eid in sorted(missing):
            ep = await self.s.memory.get.remote(eid)
            if ep is not None:
                rnd = int(ep.task.id[1:5]) if ep.task.id.startswith("r") and ep.task.id[1:5].isdigit() else -1
                rows.append(_episode_row(ep, self.run, WorkItem(rnd, 0, ep.task, set())))
        self.run.record_episodes(rows)
        self.run.record_event(event="ledger_reconciled", episodes=len(rows))

    async def _propose(self, pending: list[WorkItem], next_round: int) -> None:
        for item in pending:
            await self.action_q.put(item)
        cur = self.cfg.agents.curriculum
        for rnd in range(next_round, self.cfg.run.iterations):
            # Run at most two rounds ahead of the last finished one: stages stay busy while the
            # curriculum still sees recent outcomes.
            async with self._round_cv:
                await self._round_cv.wait_for(lambda: self._open_rounds() < 2)
            mastered = set(await self.s.memory.mastered_goals.remote(cur.mastered_threshold, max(2, self.G)))
            proposal = await self._call("curriculum", lambda: self.s.curriculum.propose.remote(
                self.state, self.recent[-16:], mastered, cur.tasks_per_proposal, rnd))
            tasks = [t.model_copy(update={"id": f"r{rnd:04d}.{i}.{t.id}"[:200]}) for i, t in enumerate(proposal.tasks)]
            self.state = proposal.state
            self.run.record_tasks(rnd, tasks, proposal.sources)
            self.run.save_curriculum(self.state)
            if proposal.notes:
                self.run.record_event(event="curriculum", round=rnd, notes=proposal.notes[:10],
                                      sources=proposal.sources)
            self._round_sizes[rnd] = len(tasks)
            self.expected += len(tasks) * self.G
            for slot, task in enumerate(tasks):
                await self.action_q.put(WorkItem(rnd, slot, task, set(range(self.G))))

    def _open_rounds(self) -> int:
        return sum(1 for r, n in self._round_sizes.items() if self._rounds_done[r] < n)

    async def _drain(self) -> None:
        async with self._round_cv:
            await self._round_cv.wait_for(lambda: self._open_rounds() == 0 or self._stop.is_set())
        if self._stop.is_set():
            raise Interrupted()

    # ================================================================== stages
    async def _worker(self, stage: str, q: asyncio.Queue, fn: Callable[[WorkItem], Awaitable[None]],
                      out: asyncio.Queue | None) -> None:
        while True:
            item = await q.get()
            try:
                await self._process(stage, item, fn, out)
            except Interrupted:
                self._stop.set()
                async with self._round_cv:
                    self._round_cv.notify_all()
                return
            finally:
                q.task_done()

    async def _process(self, stage: str, item: WorkItem, fn: Callable[[WorkItem], Awaitable[None]],
                       out: asyncio.Queue | None) -> None:
        t0 = time.time()
        if item.failure is None:
            try:
                await fn(item)
            except (Interrupted, asyncio.CancelledError):
                raise
            except Exception as e:  # the item fails, the run goes on
                item.failure = f"{stage}: {type(e).__name__}: {e}"[:500]
                log.warning("episode group %s failed at %s: %s", item.task.id, stage, e)
        if self.metrics:
            self.metrics.stage(stage, time.time() - t0, self._depths())
        if out is not None:
            await out.put(item)
        elif item.failure is not None:
            await self._commit(item)

    async def _act(self, item: WorkItem) -> None:
        a = self.cfg.agents.action
        if a.use_memory and a.memory_top_k > 0 and self.cfg.memory.enabled:
            item.hits = await self.s.memory.retrieve.remote(item.task.goal, a.memory_top_k)
        vocab = self.s.vocabulary(item.task) if self.s.vocabulary else None
        req = ActionRequest(task=item.task, memory=item.hits, vocabulary=vocab,
                            seed=_seed(self.cfg.run.seed, self.run.run_id, item.task.id))
        [samples] = await self._call("action", lambda: self.s.action.act.remote([req]))
        if len(samples) != self.G:
            raise StageError(f"action returned {len(samples)} samples, expected {self.G}")
        item.samples = samples
        if samples and samples[0].completion.weights_version:
            item.policy_version = samples[0].completion.weights_version

    async def _render(self, item: WorkItem) -> None:
        plans = [s.plan for s in item.samples]
        seeds = [_seed(self.cfg.run.seed, episode_id(self.run.run_id, item.task.id, i)) for i in range(self.G)]
        out_dir = f"{self.run.videos}/{item.task.id}"
        item.rollouts = await self._call("world", lambda: self.s.world.render.remote(
            item.task, plans, out_dir, item.task.reference_image, seeds))

    async def _score_and_commit(self, item: WorkItem) -> None:
        triples = [(item.task, s.plan, r) for s, r in zip(item.samples, item.rollouts)]
        item.verdicts = await self._call("critic", lambda: self.s.critic.score.remote(triples))
        await self._commit(item)

    # ================================================================== commit
    def _episodes(self, item: WorkItem) -> list[Episode]:
        eps = []
        now = time.time()
        for i in sorted(item.missing):
            kw: dict[str, Any] = {"created_at": now, "policy_version": item.policy_version}
            if item.failure is not None:
                kw.update(status="failed", failure_reason=item.failure)
            if item.samples is not None:
                s = item.samples[i]
                kw.update(plan=s.plan, raw_output=s.completion.text[:4000], prompt=s.prompt,
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
        eps = self._episodes(item)
        try:
            # Memory first: it is the source of truth that resume reads.
            await self._call("memory", lambda: self.s.memory.upsert.remote(eps))
        except StageError as e:
            # Keep the episodes in the ledger so none is lost; resume redoes them.
            self.run.record_event(event="memory_write_failed", error=str(e),
                                  episodes=[x.model_dump(mode="json") for x in eps])
            await self._finish_round(item)
            return
        rows = [_episode_row(e, self.run, item) for e in eps]
        async with self._commit_lock:
            self.run.record_episodes(rows)
            self.committed += len(eps)
            self.failed += sum(e.status == "failed" for e in eps)
            outcomes = [Outcome(phase=e.task.phase, success=e.success, goal=e.task.goal, reward=e.reward,
                                caption=e.verdict.state_caption if e.verdict else "") for e in eps if e.status == "ok"]
            self.recent.extend(outcomes)
            self.recent = self.recent[-256:]
            before = self.state.phase
            self.state = update_phase(self.cfg.agents.curriculum, self.state, outcomes)
            if self.state.phase != before:
                self.run.record_event(event="phase", **self.state.promotions[-1])
            self.run.save_curriculum(self.state)
            if self.metrics:
                self.metrics.episodes(eps, self.state.phase)
            if self.progress:
                self.progress(self.committed, max(self.expected, self.planned))
        if self.s.buffer is not None and item.failure is None and item.samples is not None:
            try:
                await self.s.buffer.feed(item.task, item.samples, item.verdicts, item.policy_version,
                                         [e.id for e in eps])
            except Exception as e:  # learning is best effort; the episodes are already safe
                self.run.record_event(event="buffer_feed_failed", task=item.task.id, error=str(e)[:300])
        await self._finish_round(item)
        if self.stop_after is not None and self.committed >= self.stop_after:
            raise Interrupted()

    async def _finish_round(self, item: WorkItem) -> None:
        async with self._round_cv:
            self._rounds_done[item.round] += 1
            self._round_cv.notify_all()

    # ================================================================== helpers
    async def _call(self, stage: str, make: Callable[[], Awaitable[Any]]) -> Any:
        """Await a remote call with a timeout; retry with backoff; raise StageError at the end."""
        last: Exception | None = None
        for attempt in range(self.cfg.run.max_retries + 1):
            try:
                return await asyncio.wait_for(_as_awaitable(make()), self.cfg.run.stage_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                last = e
                log.warning("%s call failed (attempt %d): %s", stage, attempt + 1, e)
                if self.metrics:
                    self.metrics.retry(stage)
                await asyncio.sleep(min(2.0 ** attempt, 10.0))
        raise StageError(f"{stage} failed after {self.cfg.run.max_retries + 1} attempts: "
                         f"{type(last).__name__}: {str(last)[:300]}")

    def _depths(self) -> dict[str, int]:
        return {"action": self.action_q.qsize(), "world": self.world_q.qsize(), "critic": self.critic_q.qsize()}

    def summary(self) -> dict[str, Any]:
        return summarize(self.run.episode_rows(), time.time() - self.started, self.state)


# ====================================================================== free functions


async def _as_awaitable(x: Any) -> Any:
    """Serve handles return DeploymentResponse, actors ObjectRef: both are awaitable."""
    return await x


def _seed(*parts: Any) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def _episode_row(e: Episode, run: RunFolder, item: WorkItem) -> dict[str, Any]:
    v = e.verdict
    r = e.rollout
    return {
        "kind": "episode", "t": time.time(), "id": e.id, "task_id": e.task.id, "sample": e.sample_index,
        "round": item.round, "goal": e.task.goal, "phase": e.task.phase, "status": e.status,
        "failure": e.failure_reason, "success": e.success, "reward": round(e.reward, 4),
        "scores": v.scores.as_dict() if v else None, "caption": v.state_caption if v else "",
        "notes": (v.notes if v else [])[:5], "plan": e.plan.actions if e.plan else None,
        "plan_error": item.samples[e.sample_index].error if item.samples else None,
        "gif": r.gif_uri if r else None, "video": r.video_uri if r else None,
        "policy_version": e.policy_version, "latency_s": round(time.time() - item.t_start, 3),
        "memory_hits": len(item.hits),
    }


def summarize(rows: list[dict[str, Any]], elapsed_s: float, state: CurriculumState | None = None) -> dict[str, Any]:
    by_phase: dict[int, dict[str, Any]] = {}
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:  # the last row for an id wins (a resumed run may rewrite none, but be safe)
        seen[r["id"]] = r
    for r in seen.values():
        p = by_phase.setdefault(r["phase"], {"episodes": 0, "ok": 0, "failed": 0, "success": 0, "reward": 0.0})
        p["episodes"] += 1
        if r["status"] == "failed":
            p["failed"] += 1
            continue
        p["ok"] += 1
        p["success"] += int(r["success"])
        p["reward"] += r["reward"]
    for p in by_phase.values():
        p["success_rate"] = p["success"] / p["ok"] if p["ok"] else 0.0
        p["mean_reward"] = p["reward"] / p["ok"] if p["ok"] else 0.0
    n = len(seen)
    return {
        "episodes": n, "unique_ids": len(seen), "rows": len(rows),
        "failed": sum(p["failed"] for p in by_phase.values()),
        "by_phase": dict(sorted(by_phase.items())), "elapsed_s": elapsed_s,
        "episodes_per_s": n / elapsed_s if elapsed_s > 0 else 0.0,
        "phase": state.phase if state else None,
        "promotions": state.promotions if state else [],
    }
