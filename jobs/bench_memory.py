"""World memory at scale: the write path, filtered retrieval latency and recall, and the embed cost.

Measured in one run, on one table:

- **insert**: ``--n`` synthetic episodes (default 100,000) through ``EpisodeMemory.upsert``,
  ``--group`` episodes per call (default 4), as the driver commits one group of G samples per
  call, one commit each. Episodes carry a realistic payload (prompt, token ids, log-probs,
  plan, verdict: about 5 KB of JSON). Their goals are ``n / group`` distinct kitchen goals from a
  small grammar, embedded once with the real MiniLM (cached on disk under
  ``~/.cache/worldagent_ray/bench_memory``) and served to the store by a lookup table, so the
  insert time is the store's own (it includes the background compaction and index retraining
  running beside it). Reported: total insert time, per-call p50/p95/max, then the time the
  background maintenance needed to catch up.
- **retrieval**: ``--queries`` goals that are *not* in the table (default 200), ``k=3``, filtered
  by ``success=True, split="train"`` (prefilter), after ``--warmup`` queries; ``--repeats``
  passes, median of the per-pass p50/p95, on the table as background maintenance left it.
  Also sampled *during* the insert (10 queries every 2% of the goals, after 5,000 rows), where
  queries meet fragments and index segments not yet compacted or rebuilt. The query vectors come from the same lookup (the
  embed cost is measured apart). Beside it, the same queries without a filter, and an exact
  (flat, no index) search of ``--flat-queries`` of them with the same filter.
- **recall@k** against exact search with the same filter (numpy over every stored vector): a
  returned hit counts when its true cosine distance is within 1e-5 of the k-th exact one (the
  G episodes of a goal share its vector, so ids tie). 95% Wilson interval over hits.
- **embed**: the real MiniLM on one thread: one uncached query at a time (p50), a batch of 64
  (per query), and a cache hit of :class:`~worldagent_ray.memory.EmbeddingCache`.

Not a test: the numbers depend on the machine (state the load). Run it directly or with
``ray job submit``::

    python jobs/bench_memory.py [--n 100000] [--group 4] [--queries 200]

Last line: ``RESULT n=… p50_ms=… p95_ms=… recall=… embed_ms=… insert_s=… …``
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import shutil
import statistics
import tempfile
import time

import numpy as np

from worldagent_ray.stats import wilson

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RUST_LOG", "error")

# --------------------------------------------------------------------------- synthetic goals

_MOVE = ["put", "place", "move", "carry", "set", "slide", "drop", "bring", "transfer", "stack"]
_ACT = ["wash", "slice", "chop", "peel", "heat", "cool", "rinse", "dry", "open", "close", "fill", "empty",
        "stir", "grate", "weigh", "wipe", "fold", "crack", "boil", "season"]
_ADJ = ["red", "green", "small", "large", "clean", "dirty", "ceramic", "metal", "wooden", "hot", "cold",
        "empty", "full", "blue", "yellow", "old", "new", "round", "square", "glass"]
_OBJ = ["apple", "cup", "plate", "egg", "spoon", "knife", "bowl", "pan", "towel", "lid", "tomato", "lettuce",
        "onion", "carrot", "potato", "kettle", "mug", "fork", "jar", "bottle", "sponge", "cutting board",
        "pot", "ladle", "whisk", "banana", "lemon", "cheese", "bread loaf", "butter dish", "teapot", "glass",
        "tray", "napkin", "pepper mill", "salt shaker", "colander", "grater", "spatula", "rolling pin"]
_PREP = ["in", "on", "into", "onto", "next to", "behind", "under"]
_PLACE = ["bowl", "sink", "fridge", "drawer", "shelf", "table", "oven", "basket", "box", "tray", "counter",
          "cupboard", "dishwasher", "microwave", "stove", "windowsill", "rack", "bin", "pantry", "island"]


def _step(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"{rng.choice(_MOVE)} the {rng.choice(_ADJ)} {rng.choice(_OBJ)} {rng.choice(_PREP)} the {rng.choice(_PLACE)}"
    return f"{rng.choice(_ACT)} the {rng.choice(_ADJ)} {rng.choice(_OBJ)}"


def make_goals(n: int, seed: int, exclude: set[str] = frozenset()) -> list[tuple[str, int]]:
    """``n`` distinct ``(goal, phase)``: phase 1 one step, 2 two steps, 3 three steps."""
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        phase = rng.choice((1, 2, 3))
        steps = [_step(rng) for _ in range(phase)]
        goal = steps[0] if phase == 1 else (" and then ".join(steps) if phase == 2 else
                                             f"{steps[0]}, {steps[1]}, then {steps[2]}")
        goal = goal[0].upper() + goal[1:]
        if goal not in seen:
            seen.add(goal)
            out.append((goal, phase))
    return out


def embed_goals(texts: list[str], cache_dir: str) -> tuple[np.ndarray, float]:
    """MiniLM vectors of ``texts`` (cached on disk by content); returns (vectors, seconds spent)."""
    from worldagent_ray.memory import Embedder

    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"minilm-{len(texts)}-{key}.npy")
    if os.path.exists(path):
        return np.load(path, allow_pickle=False), 0.0
    t0 = time.perf_counter()
    vecs = Embedder("minilm", num_threads=max(1, os.cpu_count() or 1), batch_size=256).encode(texts)
    dt = time.perf_counter() - t0
    os.makedirs(cache_dir, exist_ok=True)
    np.save(path + ".tmp.npy", vecs, allow_pickle=False)
    os.replace(path + ".tmp.npy", path)
    return vecs, dt


class LookupEmbedder:
    """Serves precomputed goal vectors to the store (the real MiniLM cost is measured apart)."""

    name = "minilm-precomputed"

    def __init__(self, texts: list[str], vectors: np.ndarray):
        self._index = {t: i for i, t in enumerate(texts)}
        self._vectors = vectors
        self.dim = int(vectors.shape[1])

    def encode(self, texts: list[str]) -> np.ndarray:
        return self._vectors[[self._index[t] for t in texts]]


# --------------------------------------------------------------------------- episodes


def make_group(gi: int, goal: str, phase: int, group: int, rng: random.Random, n_runs: int):
    """The ``group`` episodes of goal ``gi``: one task, G samples, a realistic payload."""
    from worldagent_ray.schemas import Episode, Plan, Scores, Task, Verdict

    run_id = f"bench-run-{gi % n_runs}"
    task = Task(id=f"r{gi // 64:04d}.{gi % 64}.t{gi}", goal=goal, phase=phase,
                split="heldout" if rng.random() < 0.1 else "train")
    prompt = (f"You are the action agent. Goal: {goal}. Similar episodes: "
              + " | ".join(f"goal {j}: do step a, then step b (reward 0.{j})" for j in range(24)))
    eps = []
    for s in range(group):
        success = rng.random() < 0.5
        reward = round(rng.uniform(0.6, 1.0) if success else rng.uniform(0.0, 0.5), 3)
        steps = [f"step {j} of {goal.lower()}" for j in range(phase + 1)]
        n_tok = rng.randint(60, 160)
        scores = Scores(action_following=reward, temporal_consistency=0.8, object_interaction=0.7,
                        goal_achievement=1.0 if success else 0.0, physics=0.9)
        eps.append(Episode.new(
            run_id, task, s, plan=Plan.from_actions(steps), raw_output=str(steps), prompt=prompt,
            prompt_token_ids=[rng.randrange(100, 49_000) for _ in range(420)],
            completion_token_ids=[rng.randrange(100, 49_000) for _ in range(n_tok)],
            completion_logprobs=[-round(rng.expovariate(3.0), 6) for _ in range(n_tok)],
            verdict=Verdict(state_caption=f"the kitchen after: {goal.lower()}", success=success, scores=scores,
                            reward=reward, scorer="verifiable", notes=["synthetic"]),
            policy_version=gi // 1000, created_at=1.7e9 + gi,
        ))
    return eps


# --------------------------------------------------------------------------- measurement


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]



def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="episodes to insert")
    ap.add_argument("--group", type=int, default=4, help="episodes per upsert call (the driver's G)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="passes over the queries (median reported)")
    ap.add_argument("--flat-queries", type=int, default=40, help="queries for the exact-search baseline")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--runs", type=int, default=4, help="distinct run ids among the episodes")
    ap.add_argument("--optimize-every", type=int, default=32, help="commits between maintenance requests (memory.optimize_every)")
    ap.add_argument("--keep-versions-s", type=float, default=60.0,
                    help="maintenance deletes table versions older than this (bounds the disk the run uses)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="table folder (default: a temporary one, removed)")
    ap.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "worldagent_ray",
                                                        "bench_memory"))
    args = ap.parse_args(argv)
    if args.n < args.group or args.n % args.group:
        ap.error(f"--n must be a positive multiple of --group ({args.group}), got {args.n}")

    from worldagent_ray.memory import Embedder, EmbeddingCache, EpisodeMemory

    n_goals = args.n // args.group
    table_goals = make_goals(n_goals, args.seed)
    query_goals = [g for g, _ in make_goals(args.warmup + args.queries, args.seed + 1, {g for g, _ in table_goals})]
    texts = [g for g, _ in table_goals] + query_goals
    vecs, embed_setup_s = embed_goals(texts, args.cache_dir)
    print(f"goals: {n_goals} in the table, {len(query_goals)} queries; embedded in {embed_setup_s:.1f}s "
          f"({'cached' if embed_setup_s == 0 else 'MiniLM'})", flush=True)
    lookup = LookupEmbedder(texts, vecs)

    root = args.dir or tempfile.mkdtemp(prefix="bench_memory_")
    try:
        mem = EpisodeMemory(os.path.join(root, "memory"), embedder=lookup, optimize_every=args.optimize_every,
                            keep_versions_s=args.keep_versions_s)
        rng = random.Random(args.seed)
        call_s: list[float] = []
        slow_calls: list[tuple[float, str]] = []
        during: list[float] = []
        probe_every = max(1, n_goals // 50)
        success = np.zeros(args.n, dtype=bool)
        train = np.zeros(args.n, dtype=bool)
        goal_of = np.zeros(args.n, dtype=np.int64)
        row_of: dict[str, int] = {}
        t_insert = time.perf_counter()
        for gi, (goal, phase) in enumerate(table_goals):
            eps = make_group(gi, goal, phase, args.group, rng, args.runs)
            t0 = time.perf_counter()
            mem.upsert(eps)
            call_s.append(time.perf_counter() - t0)
            if call_s[-1] > 1.0:
                st = mem.maintenance_stats()
                slow_calls.append((call_s[-1], f"{call_s[-1]:.1f}s at {(gi + 1) * args.group} rows (maintenance runs "
                                   f"{st['runs']}, busy {st['busy']}, index trained on {st['trained_rows']})"))
            for ep in eps:
                i = row_of.setdefault(ep.id, len(row_of))
                success[i], train[i], goal_of[i] = ep.success, ep.task.split == "train", gi
            if gi * args.group >= 5_000 and gi % probe_every == 0:  # latency while writes and maintenance go on
                for g in query_goals[args.warmup:][:10]:
                    t0 = time.perf_counter()
                    mem.retrieve(g, args.k, success=True, split="train")
                    during.append(time.perf_counter() - t0)
            if (gi + 1) % max(1, n_goals // 10) == 0:
                st = mem.maintenance_stats()
                print(f"  inserted {(gi + 1) * args.group} in {time.perf_counter() - t_insert:.0f}s "
                      f"(maintenance runs {st['runs']}, index trained on {st['trained_rows']})", flush=True)
        insert_s = time.perf_counter() - t_insert
        t0 = time.perf_counter()
        mem.flush(timeout_s=3600)
        maint_s = time.perf_counter() - t0
        st, ts = mem.maintenance_stats(), mem.table_stats()
        disk_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs) / 2**20
        segments = {i.name: i.num_segments for i in mem._open(create=False).list_indices()}
        print(f"insert: {args.n} episodes in {insert_s:.1f}s ({args.n / insert_s:.0f}/s); per call p50 "
              f"{1000 * pct(call_s, .5):.1f} ms, p95 {1000 * pct(call_s, .95):.1f} ms, max "
              f"{1000 * max(call_s):.0f} ms; maintenance caught up in {maint_s:.1f}s", flush=True)
        if slow_calls:
            print(f"upsert calls over 1 s: {len(slow_calls)}; slowest: {[t for _, t in sorted(slow_calls)[::-1][:5]]}")
        print(f"table: {ts['rows']} rows, {ts['fragments']} fragments, {disk_mb:.0f} MiB on disk; index trained on "
              f"{st['trained_rows']} rows, {st['partitions']} partitions, {segments.get('vector_idx')} segments; "
              f"maintenance runs {st['runs']}, errors {st['errors']}", flush=True)
        if mem.count() != args.n or ts["rows"] != args.n:
            raise SystemExit(f"lost or duplicated episodes: count {mem.count()}, rows {ts['rows']}, want {args.n}")

        qvecs = vecs[n_goals:]
        mask = success & train
        cand = np.flatnonzero(mask)
        gvecs = vecs[:n_goals]
        id_goal = {eid: int(goal_of[i]) for eid, i in row_of.items()}

        def timed(goals, **flt):
            out = []
            for g in goals:
                t = time.perf_counter()
                hits = mem.retrieve(g, args.k, **flt)
                out.append((time.perf_counter() - t, hits))
            return out

        timed(query_goals[: args.warmup], success=True, split="train")  # warm-up: caches, index pages
        queries = query_goals[args.warmup:]
        passes = [timed(queries, success=True, split="train") for _ in range(args.repeats)]
        p50 = statistics.median(pct([t for t, _ in p], .5) for p in passes) * 1000
        p95 = statistics.median(pct([t for t, _ in p], .95) for p in passes) * 1000
        nofilter = [t for t, _ in timed(queries)]
        hits_ok = total = 0
        for qi, (_, hits) in enumerate(passes[0]):
            q = qvecs[args.warmup + qi]
            exact = np.sort(1.0 - gvecs[goal_of[cand]] @ q)[: args.k]
            for h in hits:
                hits_ok += int(1.0 - float(gvecs[id_goal[h.episode_id]] @ q) <= exact[-1] + 1e-5)
            total += min(args.k, len(cand))
        recall = hits_ok / total
        lo, hi = wilson(hits_ok, total)

        tbl = mem._open(create=False)  # exact baseline: the same filtered query without the index
        flat = []
        for g in queries[: args.flat_queries]:
            q = lookup.encode([g])[0]
            t = time.perf_counter()
            (tbl.search(q, vector_column_name="vector").distance_type("cosine").bypass_vector_index()
             .where("(success = true) AND (split = 'train')", prefilter=True).select(["id", "_distance"])
             .limit(args.k * 4).to_arrow())
            flat.append(time.perf_counter() - t)
        during_p50 = 1000 * pct(during, .5) if during else float("nan")
        print(f"retrieval while inserting (after 5,000 rows, {len(during)} queries): p50 {during_p50:.2f} ms, "
              f"p95 {1000 * pct(during, .95) if during else float('nan'):.2f} ms", flush=True)
        print(f"retrieval (k={args.k}, success & train): p50 {p50:.2f} ms, p95 {p95:.2f} ms over "
              f"{len(queries)} queries x {args.repeats}; no filter p50 {1000 * pct(nofilter, .5):.2f} ms; "
              f"exact flat search p50 {1000 * pct(flat, .5):.1f} ms", flush=True)
        print(f"recall@{args.k} vs exact: {recall:.4f} ({hits_ok}/{total}, 95% CI {lo:.3f}-{hi:.3f})", flush=True)
        mem.close()
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    real = Embedder("minilm", num_threads=1)
    real.encode(query_goals[:8])  # load and warm up
    single = []
    for g in query_goals[args.warmup:]:
        t = time.perf_counter()
        real.encode([g])
        single.append(time.perf_counter() - t)
    batch = query_goals[:64]
    t = time.perf_counter()
    real.encode(batch)
    batch_ms = (time.perf_counter() - t) / len(batch) * 1000
    cache = EmbeddingCache(real, capacity=1024)
    cache.encode(query_goals[:1])
    t = time.perf_counter()
    for _ in range(1000):
        cache.encode(query_goals[:1])
    hit_us = (time.perf_counter() - t) / 1000 * 1e6
    embed_ms = 1000 * pct(single, .5)
    print(f"embed (MiniLM, 1 thread): one query p50 {embed_ms:.1f} ms; batch of {len(batch)} {batch_ms:.2f} ms "
          f"per query; cache hit {hit_us:.1f} us", flush=True)
    print(f"RESULT n={args.n} p50_ms={p50:.2f} p95_ms={p95:.2f} recall={recall:.4f} embed_ms={embed_ms:.1f} "
          f"insert_s={insert_s:.0f} maint_s={maint_s:.0f} during_insert_p50_ms={during_p50:.2f} nofilter_p50_ms={1000 * pct(nofilter, .5):.2f} "
          f"flat_p50_ms={1000 * pct(flat, .5):.1f} embed_batch_ms={batch_ms:.2f} embed_hit_us={hit_us:.1f}")


if __name__ == "__main__":
    main()
