"""The transformers fallback engine: batched ``generate`` on CPU or one GPU.

It returns exactly what :class:`~worldagent_ray.engines.vllm_engine.VLLMEngine` returns
(:class:`~worldagent_ray.schemas.Completion`), so agents cannot tell them apart.

Logprobs. ``Completion.logprobs[i]`` is the log-probability of ``token_ids[i]`` under the
*sampling* distribution: ``log_softmax`` of the logits after temperature, top-k and top-p
(tokens cut by top-k/top-p get zero mass, the rest is renormalised); under a JSON schema the
grammar mask comes first, so tokens the grammar forbids get zero mass too. This is vLLM's
``logprobs_mode="processed_logprobs"``, which :class:`VLLMEngine` sets, so both backends
report the behaviour policy the learner's importance correction needs. With temperature 0
(greedy) no warper runs and the values are ``log_softmax`` of the raw (or grammar-masked) logits. The learner
recomputes its own logprobs; these are the behaviour-policy side.

Batching. Concurrent calls are gathered by a micro-batcher
(:class:`~worldagent_ray.engines.batcher.MicroBatcher`): rows of calls that arrive while a
batch runs go into the next ``generate`` together, up to ``EngineConfig.batch_size`` rows.
Each row samples with its own parameters and its own seeded stream
(:class:`~worldagent_ray.engines.sampling.RowSampler`), so a seeded call gives the same
tokens whatever it is batched with (up to floating-point effects of padding).

JSON schemas. A schema is compiled to a token grammar with xgrammar
(:mod:`~worldagent_ray.engines.grammar`) and every step's logits are masked to the tokens it
allows, before the row sampler, so logprobs are those of the masked distribution (as vLLM's
structured outputs report them). Rows join a batch only with rows of the same schema (it is part
of the micro-batch key). A grammar does not bound length, so every text is still validated and
redrawn, up to ``EngineConfig.max_json_retries`` times, when it is not a valid document (cut at
``max_tokens`` mid-document); without xgrammar (a warning says so once) validation and retries
are the only enforcement. Every rejected attempt is kept in ``Completion.rejected`` as
``{"text", "reason"}``; a sample that never validates is returned with ``finish_reason="error"``
(never dropped).

Images. Prompt images are decoded through :func:`~worldagent_ray.engines.images.load_image`
(pixel cap checked from the header, byte cap, timeout for remote URIs). For a vision-language model (a config with a ``vision_config``), chat messages may
hold parts ``{"type": "image", "image": <path or PIL.Image>}``. They are encoded with the
model's ``AutoProcessor`` or, where that cannot load (Qwen-VL processors need torchvision for
their video half), with its image processor plus the tokenizer, expanding each image
placeholder to the number of merged patches as the Qwen-VL processors do.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Generator, Mapping, Sequence

import torch

from ..config import EngineConfig
from ..models import builtin_models, resolve_model
from ..schemas import Completion, SamplingParams
from .base import (EngineBase, EngineStartupError, Prompt, PromptTooLongError, UnknownModelError,
                   WeightSyncError)
from .batcher import MicroBatcher
from .grammar import GrammarCache, GrammarMask, schema_key
from .images import load_image, prompt_images
from .json_check import check_supported, json_rejection
from .sampling import RowSampler, RowSpec, row_seed

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str, cuda: bool) -> torch.dtype:
    """Map ``EngineConfig.dtype`` to a torch dtype (``auto``: bfloat16 on GPU, float32 on CPU)."""
    if name == "auto":
        return torch.bfloat16 if cuda else torch.float32
    return _DTYPES[name]


def is_vision_config(config: Any) -> bool:
    """True for a vision-language model config (it has a ``vision_config``)."""
    return getattr(config, "vision_config", None) is not None


@dataclass
class _Encoded:
    """One prompt, tokenised (plus its image tensors for a VL model)."""

    ids: list[int]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Draw:
    """One generated sample before it becomes a Completion."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    version: int = 0  # the weights version of the batch that drew it


class TransformersEngine(EngineBase):
    """An :class:`~worldagent_ray.engines.base.InferenceEngine` on plain transformers.

    Args:
        cfg: The engine config. Uses ``model``, ``dtype``, ``max_model_len``, ``seed``,
            ``batch_size`` and ``max_json_retries``.

    Raises:
        UnknownModelError: The model is not a builtin, an existing folder, or a loadable id.
        EngineStartupError: The model was found but could not be loaded.

    Example::

        >>> engine = TransformersEngine(EngineConfig(model="tiny-random-llama", backend="transformers"))
        >>> [[c]] = engine.generate(["Hello"], SamplingParams(max_tokens=8, seed=0))
        >>> len(c.token_ids) == len(c.logprobs)
        True

    ``batch_size`` also bounds how many rows the micro-batcher gathers from concurrent calls.
    """

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self._lock = threading.Lock()
        self._version = 0
        self._path = resolve_model(cfg.model)
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._dtype = torch_dtype(cfg.dtype, self._device.type == "cuda")
        t0 = time.perf_counter()
        self._config = self._load_config()
        self._vision = is_vision_config(self._config)
        self._tok, self._processor, self._image_processor = self._load_processing()
        self._model = self._load_model()
        self._max_len = cfg.max_model_len
        positions = getattr(self._config.get_text_config(), "max_position_embeddings", None)
        if positions:
            self._max_len = min(self._max_len, int(positions))
        self._eos_ids = self._stop_token_ids()
        self._logits_width = self._output_width()
        self._grammars = GrammarCache(self._tok, self._logits_width, self._eos_ids)
        self._batcher: MicroBatcher[tuple[_Encoded, RowSpec], _Draw] = MicroBatcher(
            self._run_rows, max_rows=cfg.batch_size, lock=self._lock, name=f"hf-batcher-{cfg.model}")
        logger.info(
            "transformers engine ready: model=%s path=%s dtype=%s device=%s vision=%s (%.1f s)",
            cfg.model, self._path, self._dtype, self._device, self._vision, time.perf_counter() - t0,
        )

    # ------------------------------------------------------------------ loading

    def _load_config(self):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self._path)
        except (OSError, ValueError) as e:
            raise UnknownModelError(
                f"model {self.cfg.model!r} (resolved to {self._path!r}) is not a builtin, a local "
                f"folder, or loadable offline: {e}. Builtin models: {builtin_models()}"
            ) from e

    def _load_processing(self):
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(self._path)
        except Exception as e:
            raise EngineStartupError(f"cannot load the tokenizer of {self.cfg.model!r}: {e}") from e
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        processor = image_processor = None
        if self._vision:
            try:
                processor = AutoProcessor.from_pretrained(self._path)
                processor.tokenizer.padding_side = "left"
            except Exception as e:  # Qwen-VL's video half needs torchvision
                logger.info("AutoProcessor unavailable (%s); using image processor + tokenizer", e)
                try:
                    image_processor = AutoImageProcessor.from_pretrained(self._path)
                except Exception as e2:
                    raise EngineStartupError(
                        f"vision model {self.cfg.model!r} has no loadable processor: {e2}"
                    ) from e2
        return tok, processor, image_processor

    def _load_model(self):
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        cls = AutoModelForImageTextToText if self._vision else AutoModelForCausalLM
        try:
            model = cls.from_pretrained(self._path, dtype=self._dtype)
        except Exception as e:
            raise EngineStartupError(f"cannot load model {self.cfg.model!r} from {self._path!r}: {e}") from e
        return model.to(self._device).eval()

    def _stop_token_ids(self) -> set[int]:
        ids = {self._tok.eos_token_id}
        gen = getattr(self._model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        return {i for i in ids if i is not None}

    def _output_width(self) -> int:
        """The width of the model's logits (``lm_head`` rows; may exceed the tokenizer's vocabulary)."""
        head = self._model.get_output_embeddings()
        if head is not None and getattr(head, "weight", None) is not None:
            return int(head.weight.shape[0])
        return int(self._config.get_text_config().vocab_size)

    # ------------------------------------------------------------------ protocol

    @property
    def max_model_len(self) -> int:
        """The context window: ``cfg.max_model_len`` capped by the model's positions."""
        return self._max_len

    @property
    def weights_dtype(self) -> torch.dtype:
        """The dtype the engine holds its weights in (loads are cast to it)."""
        return self._dtype

    def stats(self) -> dict[str, int]:
        """Micro-batching counters (see :meth:`MicroBatcher.stats`)."""
        return self._batcher.stats()

    def paused(self) -> threading.Lock:
        """A context manager that holds generation: no batch runs while it is held (calls
        queue and are gathered into one batch afterwards). ``load_weights`` holds it too."""
        return self._lock

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        json_schema: Mapping[str, Any] | None = None,
    ) -> list[list[Completion]]:
        """Generate ``params.n`` completions for each prompt.

        Args:
            prompts: Raw strings or chat conversations (the chat template is applied with
                ``add_generation_prompt=True``).
            params: Sampling parameters; ``temperature=0`` is greedy, ``seed`` makes the call
                reproducible.
            json_schema: If given, every returned text is a valid document for it, or its
                completion has ``finish_reason="error"`` and lists the rejected attempts.

        Returns:
            One list of ``params.n`` completions per prompt, in prompt order.

        Raises:
            PromptTooLongError: A prompt plus ``max_tokens`` exceeds the context window
                (checked before anything is generated).
            ValueError: A prompt has images but the model is text-only, or the schema uses an
                unsupported keyword.
        """
        encoded = self._prepare(prompts, params, json_schema)
        key = self._key(params, json_schema)
        steps = self._attempts(encoded, params, json_schema)
        rows = next(steps)
        while True:
            try:
                rows = steps.send(self._batcher.submit(key, rows).result())
            except StopIteration as done:
                return done.value

    async def agenerate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        json_schema: Mapping[str, Any] | None = None,
    ) -> list[list[Completion]]:
        """:meth:`generate` without blocking the caller's event loop. Cancelling the caller
        drops its rows that have not started yet."""
        encoded = await asyncio.to_thread(self._prepare, prompts, params, json_schema)  # compiles the grammar
        key = self._key(params, json_schema)
        steps = self._attempts(encoded, params, json_schema)
        rows = next(steps)
        while True:
            fut = self._batcher.submit(key, rows)
            draws = await asyncio.wrap_future(fut)
            try:
                rows = steps.send(draws)
            except StopIteration as done:
                return done.value

    def _prepare(self, prompts, params: SamplingParams, json_schema) -> list[_Encoded]:
        if isinstance(prompts, (str, bytes)):
            raise TypeError("prompts must be a sequence of prompts, not a single string")
        if json_schema is not None:
            check_supported(json_schema)
            self._grammars.get(json_schema)  # compile now (off the event loop), cached for the batches
        encoded = [self._encode(p, i) for i, p in enumerate(prompts)]
        for i, enc in enumerate(encoded):
            if len(enc.ids) + params.max_tokens > self._max_len:
                raise PromptTooLongError(len(enc.ids), params.max_tokens, self._max_len, index=i)
        return encoded

    @staticmethod
    def _key(params: SamplingParams, json_schema: Mapping[str, Any] | None = None) -> tuple:
        """Rows batch together when they stop the same way and share a schema (one grammar per
        batch; sampling is per row)."""
        return (params.max_tokens, tuple(params.stop), params.logprobs, schema_key(json_schema))

    def _spec(self, params: SamplingParams, i: int, j: int) -> RowSpec:
        gen = None
        if params.seed is not None and params.temperature > 0:
            gen = torch.Generator(device=self._device).manual_seed(row_seed(params.seed, i, j))
        return RowSpec(params.temperature, params.top_k, params.top_p, gen)

    def _attempts(self, encoded, params, json_schema) -> Generator[list, list[_Draw], list[list[Completion]]]:
        """Yields the rows to draw (each attempt), receives their draws, returns completions."""
        slots = [(i, j) for i in range(len(encoded)) for j in range(params.n)]
        specs = {s: self._spec(params, *s) for s in slots}
        done: dict[tuple[int, int], _Draw] = {}
        rejected: dict[tuple[int, int], list[dict[str, str]]] = {s: [] for s in slots}
        pending = slots
        attempts = 1 + (self.cfg.max_json_retries if json_schema is not None else 0)
        for _ in range(attempts):
            draws = yield [(encoded[i], specs[(i, j)]) for i, j in pending]
            retry = []
            for slot, draw in zip(pending, draws):
                reason = json_rejection(draw.text, json_schema) if json_schema is not None else None
                done[slot] = draw
                if reason is not None:
                    rejected[slot].append({"text": draw.text, "reason": reason})
                    draw.finish_reason = "error"
                    retry.append(slot)
            pending = retry
            if not pending:
                break
        out: list[list[Completion]] = [[] for _ in encoded]
        for i, j in slots:
            d = done[(i, j)]
            out[i].append(
                Completion(
                    text=d.text,
                    token_ids=d.token_ids,
                    logprobs=d.logprobs,
                    finish_reason=d.finish_reason,
                    prompt_token_ids=encoded[i].ids,
                    weights_version=d.version,
                    rejected=rejected[(i, j)],
                )
            )
        return out

    # ------------------------------------------------------------------ encoding

    def _encode(self, prompt: Prompt, index: int) -> _Encoded:
        if isinstance(prompt, str):
            return _Encoded(self._tok(prompt).input_ids)
        if not isinstance(prompt, Sequence) or not all(isinstance(m, Mapping) for m in prompt):
            raise TypeError(
                f"prompt {index} must be a string or a list of chat messages, got {type(prompt).__name__}"
            )
        images = [load_image(im, self.cfg.max_image_pixels, self.cfg.image_fetch_timeout_s)
                  for im in prompt_images(prompt)]
        if images and not self._vision:
            raise ValueError(
                f"prompt {index} has {len(images)} image(s) but model {self.cfg.model!r} is text-only"
            )
        messages = [dict(m) for m in prompt]
        if self._processor is not None:
            text = self._processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            batch = self._processor(text=[text], images=images or None, return_tensors="pt")
            extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
            return _Encoded(batch["input_ids"][0].tolist(), extra)
        text = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self._tok(text, add_special_tokens=False).input_ids
        if not images:
            return _Encoded(ids)
        return self._encode_images(ids, images, index)

    def _encode_images(self, ids: list[int], images: list[Any], index: int) -> _Encoded:
        """Qwen-VL style: run the image processor, then repeat each image placeholder token
        once per merged patch (``prod(grid_thw) // merge_size**2``)."""
        image_token = getattr(self._config, "image_token_id", None)
        if image_token is None:
            raise ValueError(f"model {self.cfg.model!r} has no image_token_id; cannot place prompt {index}'s images")
        feats = self._image_processor(images=images, return_tensors="pt")
        merge = int(getattr(self._image_processor, "merge_size", 1) or 1)
        counts = (feats["image_grid_thw"].prod(-1) // (merge * merge)).tolist()
        if ids.count(image_token) != len(counts):
            raise ValueError(
                f"prompt {index}: the chat template wrote {ids.count(image_token)} image placeholder(s) "
                f"for {len(counts)} image(s)"
            )
        out: list[int] = []
        k = 0
        for t in ids:
            if t == image_token:
                out.extend([image_token] * int(counts[k]))
                k += 1
            else:
                out.append(t)
        return _Encoded(out, dict(feats))

    # ------------------------------------------------------------------ decoding

    def _run_rows(self, key: tuple, rows: list[tuple[_Encoded, RowSpec]]) -> list[_Draw]:
        """One micro-batch (the batcher holds the engine lock): text-only rows in left-padded
        batches of ``batch_size``, image rows alone; every draw is stamped with the version."""
        max_tokens, stop, _, skey = key
        grammar = self._grammars.get_key(skey)
        version = self._version
        draws: list[_Draw | None] = [None] * len(rows)
        plain = [k for k, (e, _) in enumerate(rows) if not e.extra]
        for start in range(0, len(plain), self.cfg.batch_size):
            chunk = plain[start : start + self.cfg.batch_size]
            for k, d in zip(chunk, self._generate_batch([rows[k] for k in chunk], max_tokens, list(stop), grammar)):
                draws[k] = d
        for k, row in enumerate(rows):
            if row[0].extra:
                draws[k] = self._generate_batch([row], max_tokens, list(stop), grammar)[0]
        for d in draws:
            d.version = version  # type: ignore[union-attr]
        return draws  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_batch(self, batch: list[tuple[_Encoded, RowSpec]], max_tokens: int, stop: list[str],
                        grammar: Any = None) -> list[_Draw]:
        from transformers import GenerationConfig, LogitsProcessorList

        width = max(len(e.ids) for e, _ in batch)
        pad = self._tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(e.ids)) + e.ids for e, _ in batch], device=self._device)
        mask = torch.tensor([[0] * (width - len(e.ids)) + [1] * len(e.ids) for e, _ in batch], device=self._device)
        gen = GenerationConfig(
            max_new_tokens=max_tokens,
            do_sample=False,  # RowSampler picks every token; greedy decoding then emits it
            eos_token_id=sorted(self._eos_ids),
            pad_token_id=pad,
            stop_strings=stop or None,
            return_dict_in_generate=True,
        )
        sampler = RowSampler([spec for _, spec in batch])
        processors: list[Any] = [sampler]
        if grammar is not None:  # the mask runs first: the sampler draws (and scores) only allowed tokens
            processors.insert(0, GrammarMask(grammar, len(batch), self._logits_width, self._grammars.json_safe_bits))
        extra = {k: v.to(self._device) if torch.is_tensor(v) else v for k, v in batch[0][0].extra.items()}
        out = self._model.generate(
            input_ids=input_ids, attention_mask=mask, generation_config=gen,
            logits_processor=LogitsProcessorList(processors),
            tokenizer=self._tok if stop else None, **extra,
        )
        new = out.sequences[:, width:].cpu()
        # logps[row, t]: log-prob of the token drawn at step t under its row's processed distribution
        logps = torch.stack(sampler.logprobs, dim=1) if sampler.logprobs else torch.zeros(len(batch), 0)
        return [self._finish(new[r], logps[r], stop) for r in range(len(batch))]

    def _finish(self, tokens: torch.Tensor, logps: torch.Tensor, stop: list[str]) -> _Draw:
        """Cut one row at its end (EOS included, stop string excluded from the text)."""
        ids = tokens.tolist()
        end, reason = len(ids), "length"
        for t, tok in enumerate(ids):
            if tok in self._eos_ids:
                end, reason = t + 1, "stop"
                break
        ids = ids[:end]
        text = self._tok.decode(ids, skip_special_tokens=True)
        if stop:
            hit = self._first_stop(ids, stop)
            if hit is not None:
                ids, text, reason = ids[: hit[0]], hit[1], "stop"
        lp = logps[: len(ids)].tolist()
        return _Draw(text=text, token_ids=ids, logprobs=lp, finish_reason=reason)

    def _first_stop(self, ids: list[int], stops: list[str]) -> tuple[int, str] | None:
        """The shortest prefix whose text contains a stop string, and the text before it."""
        full = self._tok.decode(ids, skip_special_tokens=True)
        if not any(s in full for s in stops):
            return None
        for k in range(1, len(ids) + 1):
            text = self._tok.decode(ids[:k], skip_special_tokens=True)
            cut = min((text.find(s) for s in stops if s in text), default=-1)
            if cut >= 0:
                return k, text[:cut]
        return None

    # ------------------------------------------------------------------ weights

    def load_weights(self, named_tensors: Mapping[str, torch.Tensor], version: int) -> int:
        """Swap in a full state dict atomically and return the new version.

        Every tensor is checked (names and shapes) before any is copied, and the copy holds
        the engine lock, so no ``generate`` ever sees half old, half new weights.

        Args:
            named_tensors: A full state dict (tied aliases such as ``lm_head.weight`` may be
                left out when the model ties them).
            version: The new weights version; must be greater than the current one.

        Raises:
            WeightSyncError: The version does not increase, or names or shapes do not match;
                the engine keeps its previous weights and version.
        """
        with self._lock:
            if int(version) <= self._version:
                raise WeightSyncError(
                    f"weights version must increase: got {version}, engine has {self._version}"
                )
            target = self._model.state_dict()
            required = {n for n, _ in self._model.named_parameters()}
            unexpected = sorted(set(named_tensors) - set(target))
            missing = sorted(required - set(named_tensors))
            if unexpected or missing:
                raise WeightSyncError(
                    f"state dict does not match {self.cfg.model!r}: missing {missing[:5]} "
                    f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}); send the full state dict"
                )
            for name, t in named_tensors.items():
                if tuple(t.shape) != tuple(target[name].shape):
                    raise WeightSyncError(
                        f"{name}: shape {tuple(t.shape)} does not match the model's {tuple(target[name].shape)}"
                    )
            with torch.no_grad():
                for name, t in named_tensors.items():
                    target[name].copy_(t.to(device=target[name].device, dtype=target[name].dtype))
            self._version = int(version)
            return self._version

    async def aload_weights(self, named_tensors: Mapping[str, torch.Tensor], version: int) -> int:
        """:meth:`load_weights` on a worker thread (it waits for the running batch)."""
        return await asyncio.to_thread(self.load_weights, named_tensors, version)

    def shutdown(self) -> None:
        """Stop the batcher (waiting calls fail) and free the model (safe to call twice)."""
        self._batcher.close()
        with self._lock:
            self._model = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
