"""Grammar-constrained decoding for the transformers engine, with xgrammar.

A JSON schema is compiled once into a token grammar (:class:`GrammarCache`, keyed by the
schema's canonical JSON, least recently used dropped past ``capacity``), and at every decoding
step :class:`GrammarMask` sets the logits of the tokens the grammar does not allow next to
``-inf``. It runs *before* :class:`~worldagent_ray.engines.sampling.RowSampler` in the logits
processor list, so each row samples only allowed tokens and its recorded logprob is that of the
masked (then temperature / top-k / top-p processed) distribution; vLLM applies its structured
output bitmask before its sampler too, so both engines report the same quantity.

Raw control characters. xgrammar's rule for a string with a ``maxLength`` lets any character
but ``"``, ``\\``, CR and LF through, so other control characters (U+0000 to U+001F, which JSON
allows only escaped) would make the text invalid JSON. The documents are compiled without
optional whitespace (``any_whitespace=False``), so no valid output ever needs a raw control
character: every token whose bytes hold one is masked out as well (stop tokens excepted).

Each batch row has its own :class:`xgrammar.GrammarMatcher`: from the second step on it
accepts the token the row drew at the previous step; once it has accepted a stop token
(the document is complete and the model's end-of-sequence token was drawn) the row is finished
and no longer masked. A grammar bounds the *shape* of the text, not its length: a row can still
run out of ``max_tokens`` mid-document, so the engine keeps validating every text and redrawing
(``EngineConfig.max_json_retries``).

xgrammar is optional at import time: without it (or for a schema it cannot compile)
:meth:`GrammarCache.get` returns None, a warning says so once, and the engine enforces the
schema by validation and retries alone.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from transformers import LogitsProcessor

try:
    import xgrammar as xgr
except ImportError:  # pragma: no cover - exercised only where xgrammar is not installed
    xgr = None

__all__ = ["JSON_SEPARATORS", "GrammarCache", "GrammarMask", "json_grammar", "schema_key", "xgrammar_available"]

logger = logging.getLogger(__name__)


def xgrammar_available() -> bool:
    """True when xgrammar can be imported (constrained decoding is possible)."""
    return xgr is not None


# The layout both engines decode JSON in: Python's ``json.dumps`` separators and no other whitespace. It is the
# layout of the SFT targets and of the prompts' examples; free whitespace let a fine-tuned model pad a finished
# document until max_tokens.
JSON_SEPARATORS = (", ", ": ")


def schema_key(schema: Mapping[str, Any] | None) -> str | None:
    """The JSON of ``schema`` (None for no schema), in its own key order: the grammar writes
    properties in the order the schema lists them (as vLLM's structured outputs do), so two
    schemas that differ only in that order are different grammars."""
    return None if schema is None else json.dumps(schema, separators=(",", ":"))


@functools.lru_cache(maxsize=256)
def _json_grammar(key: str) -> str:
    if xgr is None:
        raise ImportError("xgrammar is not installed")
    return str(xgr.Grammar.from_json_schema(key, any_whitespace=False, separators=JSON_SEPARATORS))


def json_grammar(schema: Mapping[str, Any]) -> str:
    """The xgrammar EBNF of ``schema`` in :data:`JSON_SEPARATORS`'s layout (the vLLM engine sends
    schemas as these grammars: vLLM 0.32's own ``disable_any_whitespace`` means ``,``/``:`` with
    no space, and its per-request flag of that name is ignored)."""
    return _json_grammar(schema_key(schema))


class GrammarCache:
    """Compiles JSON schemas to xgrammar grammars for one tokenizer, and keeps them.

    Args:
        tokenizer: The model's Hugging Face tokenizer.
        vocab_size: The width of the model's logits (its ``lm_head`` rows), which may exceed
            the tokenizer's vocabulary (padding rows are never allowed).
        stop_token_ids: The tokens that end a row (the engine's end-of-sequence ids); the
            grammar allows them exactly where the document is complete.
        capacity: Most compiled grammars kept (least recently used dropped first).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int], capacity: int = 32):
        self.vocab_size = int(vocab_size)
        self.capacity = capacity
        self._lock = threading.Lock()
        self._grammars: OrderedDict[str, Any] = OrderedDict()
        self._warned = False
        self._compiler = None
        self.json_safe_bits: torch.Tensor | None = None
        if xgr is None:
            return
        try:
            info = xgr.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=self.vocab_size, stop_token_ids=sorted(stop_token_ids))
            self.json_safe_bits = _json_safe_bits(info.decoded_vocab, self.vocab_size, stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=max(1, min(8, os.cpu_count() or 1)),
                                                 cache_enabled=False)
        except Exception as e:  # an exotic tokenizer: retries still enforce the schema
            self._warn(f"xgrammar cannot read this tokenizer ({type(e).__name__}: {e})")

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("%s; JSON schemas are enforced by validation and retries only "
                           "(EngineConfig.max_json_retries)", why)

    def get(self, schema: Mapping[str, Any] | None) -> Any | None:
        """The compiled grammar of ``schema``, compiling it on first use (call this off the
        event loop: a schema takes up to seconds). None when there is no schema, xgrammar is
        not installed, or it cannot compile this schema (a warning says so once)."""
        return self.get_key(schema_key(schema))

    def get_key(self, key: str | None) -> Any | None:
        """:meth:`get` by the schema's :func:`schema_key`."""
        if key is None:
            return None
        if self._compiler is None:
            self._warn("xgrammar is not installed" if xgr is None else "xgrammar is unavailable")
            return None
        with self._lock:
            if key in self._grammars:
                self._grammars.move_to_end(key)
                return self._grammars[key]
            try:
                compiled = self._compiler.compile_json_schema(key, any_whitespace=False, separators=JSON_SEPARATORS)
            except Exception as e:
                self._warn(f"xgrammar cannot compile a schema ({type(e).__name__}: {str(e)[:200]})")
                compiled = None
            self._grammars[key] = compiled
            while len(self._grammars) > self.capacity:
                self._grammars.popitem(last=False)
            return compiled


def _json_safe_bits(decoded_vocab: Sequence[bytes], vocab_size: int, stop_token_ids: Sequence[int]) -> torch.Tensor:
    """One bitmask row (xgrammar's packing: bit ``t % 32`` of int32 word ``t // 32`` is token
    ``t``) that allows every token without a raw control byte (0x00-0x1F), and the stop tokens."""
    ok = np.zeros(xgr.get_bitmask_shape(1, vocab_size)[1] * 32, dtype=bool)
    for t, b in enumerate(decoded_vocab[:vocab_size]):
        ok[t] = not any(x < 0x20 for x in b)
    ok[[t for t in stop_token_ids if 0 <= t < vocab_size]] = True
    words = np.packbits(ok, bitorder="little").view("<i4")
    return torch.from_numpy(words.astype(np.int32))


class GrammarMask(LogitsProcessor):
    """Masks every row's logits to the tokens its grammar allows next.

    Args:
        grammar: A compiled grammar from :meth:`GrammarCache.get` (all rows of one batch share
            a schema: the engine's micro-batch key includes it).
        rows: Number of rows in the batch.
        vocab_size: The logits width the grammar was compiled for (``GrammarCache.vocab_size``).
        allowed_bits: A bitmask row ANDed into every row's mask (``GrammarCache.json_safe_bits``),
            or None.

    ``failed[r]`` is True when row ``r`` drew a token its matcher refused (it cannot, unless
    the row was ended by a stop string) or its mask allowed no token at all; that row is no
    longer masked, and validation rejects its text.
    """

    def __init__(self, grammar: Any, rows: int, vocab_size: int, allowed_bits: torch.Tensor | None = None):
        self._matchers = [xgr.GrammarMatcher(grammar) for _ in range(rows)]
        self._bitmask = xgr.allocate_token_bitmask(rows, vocab_size)
        self._allowed = allowed_bits
        self._vocab_size = vocab_size
        self._steps = 0
        self.failed = [False] * rows

    def _live(self, r: int) -> bool:
        return not self.failed[r] and not self._matchers[r].is_terminated()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._steps:
            last = input_ids[:, -1].tolist()
            for r in range(len(self._matchers)):
                if self._live(r) and not self._matchers[r].accept_token(int(last[r])):
                    self.failed[r] = True
        self._steps += 1
        live = [r for r in range(len(self._matchers)) if self._live(r)]
        if not live:
            return scores
        for r in live:
            self._matchers[r].fill_next_token_bitmask(self._bitmask, r)
        if self._allowed is not None:
            self._bitmask[live] &= self._allowed
        if scores.shape[-1] != self._vocab_size:
            raise ValueError(f"logits have width {scores.shape[-1]}, the grammar was compiled for {self._vocab_size}")
        masked = scores.float().clone()
        xgr.apply_token_bitmask_inplace(masked, self._bitmask.to(scores.device), indices=live)
        dead = torch.isinf(masked).all(dim=-1) & ~torch.isinf(scores).all(dim=-1)
        for r in torch.nonzero(dead)[:, 0].tolist():  # nothing allowed: never expected; do not crash the batch
            masked[r] = scores[r].float()
            self.failed[r] = True
        return masked
