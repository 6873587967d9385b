"""GPU smoke test, for the day a GPU is lent (not part of CI): the CUDA paths of the cluster in
one command, with tiny models built offline.

    python jobs/smoke_gpu.py                       # every part
    python jobs/smoke_gpu.py --parts vllm,learner  # some parts
    ray job submit --working-dir . -- python jobs/smoke_gpu.py   # on a cluster node with GPUs

Parts (each in its own process, so a crash or a hung CUDA call fails only that part):

- ``vllm``: the project's vLLM engine on CUDA (bfloat16) generates schema-constrained JSON,
  with an image in the prompt when the model is a vision-language model;
- ``wan``: the diffusers world renders a plan on CUDA with the tiny Wan TI2V pipeline, once
  text-to-video and once image-to-video from a reference image;
- ``nccl``: two Ray actors, one GPU each, broadcast a state dict over NCCL with
  ``NcclBroadcastSync`` (the collective weight sync) and compare checksums. NCCL refuses two
  ranks on one GPU, so this part needs 2 GPUs and is reported ``skip`` with fewer;
- ``learner``: the GRPO learner takes one LoRA step with bfloat16 base weights on CUDA; its
  exported adapters merge into the base weights (as the engines do on a publish).

Each part prints ``PASS``/``FAIL``/``SKIP`` with its detail or error; the last line is
``RESULT vllm=... wan=... nccl=... learner=...`` (``pass``, ``fail``, ``skip`` or ``-`` when not
asked for). Exit status: 0 every part asked for passed or was skipped, 1 a part failed, 3 no CUDA
device (nothing was run; 2 is argparse's usage error).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

PARTS = ("vllm", "wan", "nccl", "learner")
MARK = "SMOKE_PART "


def _default_llm() -> str:
    from worldagent_ray.models import is_builtin

    return "tiny-random-qwen2.5-vl" if is_builtin("tiny-random-qwen2.5-vl") else "tiny-random-llama"


# --------------------------------------------------------------------------- the parts (run in a child process)


def part_vllm(args: argparse.Namespace) -> str:
    from PIL import Image
    from vllm.platforms import current_platform

    from worldagent_ray.config import EngineConfig
    from worldagent_ray.engines.factory import model_architectures
    from worldagent_ray.engines.vllm_engine import VLLMEngine
    from worldagent_ray.models import resolve_model
    from worldagent_ray.schemas import SamplingParams

    if not current_platform.is_cuda():
        raise RuntimeError(f"vLLM's platform is {type(current_platform).__name__}, not CUDA (the CPU build?)")
    archs = model_architectures(resolve_model(args.llm))
    vision = any("VL" in a for a in archs)
    engine = VLLMEngine(EngineConfig(backend="vllm", model=args.llm, dtype="bfloat16", max_model_len=1024,
                                     gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=True,
                                     max_num_seqs=8, limit_mm_per_prompt={"image": 1} if vision else {}))
    try:
        schema = {"type": "object", "properties": {"steps": {"type": "array", "items": {"type": "string"},
                                                             "minItems": 1, "maxItems": 3}},
                  "required": ["steps"], "additionalProperties": False}
        prompts: list[Any] = [[{"role": "user", "content": f"Plan {i + 1} steps to make tea. Answer in JSON."}]
                              for i in range(3)]
        if vision:
            prompts.append([{"role": "user", "content": [
                {"type": "image", "image": Image.new("RGB", (64, 64), (200, 40, 40))},
                {"type": "text", "text": "Plan steps for this kitchen. Answer in JSON."}]}])
        t0 = time.perf_counter()
        out = engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=64, n=2, seed=0), schema)
        dt = time.perf_counter() - t0
        texts = [c.text for group in out for c in group]
        bad = [t for t in texts if not _valid_steps(t)]
        if len(texts) != 2 * len(prompts) or bad:
            raise RuntimeError(f"{len(bad)} of {len(texts)} completions are not schema-valid JSON, e.g. {bad[:1]!r}")
        tokens = sum(len(c.token_ids) for group in out for c in group)
        return (f"{args.llm} ({archs[0] if archs else '?'}) on CUDA: {len(texts)} JSON plans"
                f"{' (one prompt with an image)' if vision else ''}, {tokens / dt:.0f} tok/s")
    finally:
        engine.shutdown()


def _valid_steps(text: str) -> bool:
    try:
        data = json.loads(text)
    except ValueError:
        return False
    return isinstance(data, dict) and isinstance(data.get("steps"), list) and 1 <= len(data["steps"]) <= 3


def part_wan(args: argparse.Namespace) -> str:
    import numpy as np
    from PIL import Image

    from worldagent_ray.config import DiffusersConfig
    from worldagent_ray.schemas import Plan, Task
    from worldagent_ray.world.diffusers_world import DiffusersWorld

    world = DiffusersWorld(DiffusersConfig(model="tiny-wan-ti2v", dtype="bfloat16", num_inference_steps=2,
                                           height=64, width=64, num_frames=9), device="cuda")
    with tempfile.TemporaryDirectory(prefix="smoke-wan-") as tmp:
        ref = os.path.join(tmp, "reference.png")
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(ref)
        task = Task(id="smoke-wan", goal="Make a cup of tea", phase=1)
        plan = Plan.from_actions(["go to the kettle", "boil water"])
        t0 = time.perf_counter()
        t2v = world.render(task, [plan], os.path.join(tmp, "t2v"))
        i2v = world.render(task, [plan], os.path.join(tmp, "i2v"), reference_image=ref)
        dt = time.perf_counter() - t0
        errors = [r.error for r in (*t2v, *i2v) if getattr(r, "error", None)]
        if errors:
            raise RuntimeError(f"render errors: {errors}")
        videos = [r.video_uri for r in (*t2v, *i2v) if getattr(r, "video_uri", None)]
        if len(videos) != 2:
            raise RuntimeError(f"expected 2 videos, got {videos}")
    return f"tiny-wan-ti2v on {world.device} (bfloat16): text-to-video and image-to-video in {dt:.1f}s"


def part_nccl(args: argparse.Namespace) -> str:
    import torch

    if torch.cuda.device_count() < 2:
        raise _Skip(f"needs 2 GPUs (NCCL refuses two ranks on one GPU); found {torch.cuda.device_count()}")
    import ray

    from worldagent_ray.runtime.weight_publisher import (
        NcclBroadcastSync,
        tensor_manifest,
    )

    @ray.remote(num_gpus=1)
    class Rank:
        def __init__(self, rank: int):
            self.sync = NcclBroadcastSync("smoke-nccl", 2, rank, backend="nccl")
            self.state: dict[str, torch.Tensor] = {}

        def setup(self) -> bool:
            self.sync.setup()
            return True

        def prepare(self, seed: int) -> list:
            """Sender: build the weights; their manifest (names, shapes, dtypes) for the receiver."""
            g = torch.Generator(device="cpu").manual_seed(seed)
            self.state = {f"layer{i}.weight": torch.randn(256, 256, generator=g).to("cuda", torch.bfloat16)
                          for i in range(4)}
            return tensor_manifest(self.state)

        def send(self) -> float:
            self.sync.send(self.state)
            return _checksum(self.state)

        def receive(self, manifest: list) -> float:
            return _checksum(self.sync.receive(manifest))

        def close(self) -> None:
            self.sync.destroy()

    ray.init(num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        sender, receiver = Rank.remote(0), Rank.remote(1)
        ray.get([sender.setup.remote(), receiver.setup.remote()], timeout=120)
        manifest = ray.get(sender.prepare.remote(0), timeout=60)
        t0 = time.perf_counter()
        sent, received = ray.get([sender.send.remote(), receiver.receive.remote(manifest)], timeout=120)
        dt = time.perf_counter() - t0
        if not math.isclose(sent, received, rel_tol=0, abs_tol=1e-3):
            raise RuntimeError(f"checksum sent {sent} != received {received}")
        ray.get([sender.close.remote(), receiver.close.remote()], timeout=60)
        return f"{len(manifest)} bf16 tensors broadcast GPU to GPU over NCCL in {dt:.2f}s, checksums equal"
    finally:
        ray.shutdown()


def _checksum(state) -> float:
    return float(sum(t.float().sum().item() for t in state.values()))


def part_learner(args: argparse.Namespace) -> str:
    import random

    import torch

    from worldagent_ray.config import LearnerConfig
    from worldagent_ray.models import resolve_model
    from worldagent_ray.rl.learner import LearnerCore
    from worldagent_ray.rl.weight_sync import (
        is_lora_payload,
        load_base_weights,
        merge_lora,
    )
    from worldagent_ray.schemas import ScoredGroup

    path = resolve_model(args.llm)
    core = LearnerCore(LearnerConfig(lora=True, lr=1e-3, loss_type="dapo", groups_per_step=2), path,
                       device="cuda", dtype=torch.bfloat16)
    base_dtypes = {p.dtype for n, p in core.module.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in core.module.named_parameters() if p.requires_grad}
    if torch.bfloat16 not in base_dtypes or not lora:
        raise RuntimeError(f"expected frozen bfloat16 base weights and LoRA adapters; base {base_dtypes}, "
                           f"{len(lora)} trainable tensors")
    vocab = core.module.get_input_embeddings().weight.shape[0]
    rng = random.Random(0)
    groups = []
    for g in range(2):
        comps = [[rng.randrange(10, vocab) for _ in range(6)] for _ in range(4)]
        groups.append(ScoredGroup(
            group_id=f"smoke-{g}", task_id=f"t{g}", policy_version=0,
            prompt_token_ids=[rng.randrange(10, vocab) for _ in range(8)], completion_token_ids=comps,
            rollout_logprobs=[[-5.0] * len(c) for c in comps], rewards=[0.0, 1.0, 0.25, 0.75],
            episode_ids=[f"smoke-{g}-{i}" for i in range(4)]))
    t0 = time.perf_counter()
    metrics = core.step(groups)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    loss = float(metrics.get("loss", float("nan")))
    changed = sum(not torch.equal(p.detach(), lora[n]) for n, p in core.module.named_parameters() if n in lora)
    if not math.isfinite(loss) or core.policy_version != 1 or not changed:
        raise RuntimeError(f"loss {loss}, policy_version {core.policy_version}, {changed} LoRA tensors changed")
    payload = core.export_weights()  # adapters only; the engine side merges them into its base weights
    if not is_lora_payload(payload):
        raise RuntimeError(f"export_weights() is not a LoRA payload: {sorted(payload)[:3]}")
    base = load_base_weights(path)
    merged = merge_lora(base, payload)
    moved = [k for k in merged if merged[k] is not base[k] and not torch.equal(merged[k], base[k])]
    if not moved:
        raise RuntimeError("merging the exported adapters changed no base weight")
    peak = torch.cuda.max_memory_allocated() / 2**20
    return (f"{args.llm}: one bf16 LoRA step on {torch.cuda.get_device_name(0)} in {dt:.2f}s, loss {loss:.4f}, "
            f"{changed} adapter tensors moved, {len(moved)} base weights changed after the merge, "
            f"peak {peak:.0f} MiB")


class _Skip(Exception):
    """A part that cannot run on this machine (reported ``skip``, not ``fail``)."""


RUNNERS: dict[str, Callable[[argparse.Namespace], str]] = {
    "vllm": part_vllm, "wan": part_wan, "nccl": part_nccl, "learner": part_learner}


def _child(args: argparse.Namespace) -> int:
    """Run one part; print one ``SMOKE_PART {json}`` line (status, detail)."""
    try:
        detail, status = RUNNERS[args.child](args), "pass"
    except _Skip as e:
        detail, status = str(e), "skip"
    except BaseException as e:  # report every failure as data, with its type
        detail, status = f"{type(e).__name__}: {str(e)[:1500]}", "fail"
    print(MARK + json.dumps({"part": args.child, "status": status, "detail": detail}), flush=True)
    return 0


# --------------------------------------------------------------------------- the parent


def run_part(part: str, args: argparse.Namespace) -> tuple[str, str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", part, "--llm", args.llm,
           "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        return "fail", f"timed out after {args.timeout_s:.0f}s"
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(MARK):
            rec = json.loads(line[len(MARK):])
            return rec["status"], rec["detail"]
    tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
    return "fail", f"the part's process exited with {p.returncode} before reporting: {' | '.join(tail)[:1500]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--llm", default=None, help="engine/learner model (default: tiny-random-qwen2.5-vl when "
                    "built in, else tiny-random-llama)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="vLLM's share of the GPU")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="most seconds one part may take")
    ap.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    from worldagent_ray.env import apply_env_defaults

    apply_env_defaults(offline=True)  # tiny builtins only: never wait on a model hub
    if args.llm is None:
        args.llm = _default_llm()
    if args.child:
        return _child(args)
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(wanted) - set(PARTS))
    if unknown:
        ap.error(f"--parts has unknown part(s) {unknown}; choose from {list(PARTS)}")

    import torch

    results = {p: "-" for p in PARTS}
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"smoke_gpu: no CUDA device here (torch {torch.__version__} is {build}; "
              f"torch.cuda.is_available() is False). Nothing was run: start it on a machine with a GPU.")
        print("RESULT " + " ".join(f"{p}={'skip' if p in wanted else '-'}" for p in PARTS) + " cuda=absent")
        return 3
    print(f"smoke_gpu: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"model {args.llm}", flush=True)
    for part in PARTS:
        if part not in wanted:
            continue
        t0 = time.perf_counter()
        status, detail = run_part(part, args)
        results[part] = status
        print(f"{status.upper():4} {part} ({time.perf_counter() - t0:.0f}s): {detail}", flush=True)
    print("RESULT " + " ".join(f"{p}={results[p]}" for p in PARTS) + f" gpus={torch.cuda.device_count()}")
    return 1 if "fail" in results.values() else 0


if __name__ == "__main__":
    sys.exit(main())
