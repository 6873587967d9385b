"""Grammar-constrained decoding in the transformers engine (xgrammar): every text of a random
model validates without a retry, rows of different schemas never share a batch, seeds still
reproduce, logprobs are those of the masked distribution, and without xgrammar the engine falls
back to validate-and-retry with one warning."""

from __future__ import annotations

import asyncio
import json
import logging
import math

import pytest
import torch

from worldagent_ray.agents.curriculum import goals_schema
from worldagent_ray.config import EngineConfig
from worldagent_ray.engines import grammar as grammar_mod
from worldagent_ray.engines.grammar import GrammarCache, schema_key
from worldagent_ray.engines.hf import TransformersEngine
from worldagent_ray.engines.json_check import json_rejection
from worldagent_ray.schemas import Plan, SamplingParams, Verdict, parse_plan_json

pytestmark = pytest.mark.skipif(not grammar_mod.xgrammar_available(), reason="xgrammar is not installed")

CHAT = [{"role": "system", "content": "Answer with JSON."}, {"role": "user", "content": "Plan: make tea"}]
PLAN = Plan.decoding_schema(max_steps=2, max_action_chars=16)
# a random model under a grammar may spell forced keys in one-character tokens: room for that
MAX_TOKENS = 160


def _valid(c, schema) -> bool:
    return c.finish_reason == "stop" and not c.rejected and json_rejection(c.text, schema) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_sampled_text_validates_without_a_retry(tiny_engine, seed):
    """A random model writes random tokens; only the grammar can make all of them valid documents
    on the first attempt (the retry path would list rejected attempts)."""
    out = tiny_engine.generate([CHAT, "Plan:"], SamplingParams(max_tokens=MAX_TOKENS, n=2, seed=seed, temperature=1.0),
                               json_schema=PLAN)
    for c in (c for group in out for c in group):
        assert _valid(c, PLAN), (c.finish_reason, c.rejected, c.text)
        assert 1 <= len(parse_plan_json(c.text, max_steps=2).steps) <= 2
        assert c.token_ids[-1] in tiny_engine._eos_ids  # the grammar let the row end only after the document


@pytest.mark.parametrize("schema", [Verdict.decoding_schema(40), goals_schema(2),
                                    Plan.decoding_schema(max_steps=2, vocabulary=["open fridge", "take milk"])],
                         ids=["verdict", "goals", "vocabulary"])
def test_judge_curriculum_and_vocabulary_schemas_validate(tiny_engine, schema):
    greedy, sampled = (tiny_engine.generate([CHAT], SamplingParams(max_tokens=MAX_TOKENS, n=n, seed=0,
                                                                    temperature=t), json_schema=schema)[0]
                       for n, t in ((1, 0.0), (2, 1.0)))
    for c in greedy + sampled:
        assert _valid(c, schema), (c.rejected, c.text)
    if "enum" in json.dumps(schema):
        assert {a for c in sampled for a in parse_plan_json(c.text).actions} <= {"open fridge", "take milk"}


def test_properties_come_in_the_schema_order(tiny_engine):
    """As vLLM's structured outputs: the grammar writes properties in the order the schema lists
    them, so a reordered schema is another grammar (another cache key)."""
    [[c]] = tiny_engine.generate([CHAT], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
                                 json_schema=Verdict.decoding_schema(40))
    assert list(json.loads(c.text)) == ["state_caption", "success", "scores"]
    reordered = {**Verdict.decoding_schema(40)}
    reordered["properties"] = dict(reversed(list(reordered["properties"].items())))
    assert schema_key(reordered) != schema_key(Verdict.decoding_schema(40))
    [[r]] = tiny_engine.generate([CHAT], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), json_schema=reordered)
    assert list(json.loads(r.text)) == ["scores", "success", "state_caption"]


def test_seeded_constrained_calls_reproduce_alone_and_batched(tiny_engine):
    p = SamplingParams(max_tokens=MAX_TOKENS, n=2, seed=7, temperature=1.0)
    first = tiny_engine.generate([CHAT], p, json_schema=PLAN)
    other = SamplingParams(max_tokens=MAX_TOKENS, n=2, seed=8, temperature=1.0)

    async def together():
        with tiny_engine.paused():
            before = tiny_engine.stats()["batches"]
            tasks = [asyncio.ensure_future(tiny_engine.agenerate([CHAT], q, json_schema=PLAN)) for q in (p, other)]
            while tiny_engine._batcher.pending() < 2:
                await asyncio.sleep(0.01)
        out = await asyncio.gather(*tasks)
        return tiny_engine.stats()["batches"] - before, out

    batches, (mine, _) = asyncio.run(asyncio.wait_for(together(), 120))
    assert batches == 1  # one batch, two seeded calls with one schema
    assert [c.token_ids for c in mine[0]] == [c.token_ids for c in first[0]]  # as alone
    assert all(_valid(c, PLAN) for c in mine[0])


def test_rows_with_and_without_a_schema_are_batched_apart(tiny_engine):
    flag = {"type": "boolean"}  # fits the 8 tokens: no retry batch
    free = SamplingParams(max_tokens=8, n=2, seed=3, temperature=1.0)
    alone = tiny_engine.generate([CHAT], free)

    async def mixed():
        with tiny_engine.paused():
            before = tiny_engine.stats()["batches"]
            tasks = [asyncio.ensure_future(tiny_engine.agenerate([CHAT], free)),
                     asyncio.ensure_future(tiny_engine.agenerate(
                         [CHAT], SamplingParams(max_tokens=8, n=2, seed=3, temperature=1.0), json_schema=flag))]
            while tiny_engine._batcher.pending() < 2:
                await asyncio.sleep(0.01)
        out = await asyncio.gather(*tasks)
        return tiny_engine.stats()["batches"] - before, out

    batches, (unconstrained, constrained) = asyncio.run(asyncio.wait_for(mixed(), 120))
    assert batches == 2  # the schema is part of the batch key: the unconstrained call ran unmasked
    assert [c.token_ids for c in unconstrained[0]] == [c.token_ids for c in alone[0]]
    assert all(_valid(c, flag) and c.text in ("true", "false") for c in constrained[0])
    assert not any(c.text in ("true", "false") for c in unconstrained[0])


def test_logprobs_are_finite_and_of_the_masked_distribution(tiny_engine, tiny_llama_path):
    """Each logprob is the token's log-probability renormalised over the tokens the grammar
    allowed (as vLLM reports under structured outputs): never below the unmasked one, equal to
    0 where the grammar forced the token, and strictly above it somewhere."""
    from transformers import AutoModelForCausalLM

    [[c]] = tiny_engine.generate([CHAT], SamplingParams(max_tokens=MAX_TOKENS, seed=5, temperature=1.0),
                                 json_schema=PLAN)
    assert _valid(c, PLAN) and len(c.logprobs) == len(c.token_ids)
    assert all(math.isfinite(x) and x <= 1e-6 for x in c.logprobs)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()
    ids = torch.tensor([c.prompt_token_ids + c.token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(c.prompt_token_ids) - 1 : -1]
    free = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
    masked = torch.tensor(c.logprobs)
    assert bool((masked >= free - 1e-4).all())
    assert float((masked - free).max()) > 1.0
    assert int((masked.abs() < 1e-5).sum()) >= 3  # e.g. the forced '"action": ' after a step number


def test_a_stop_string_that_cuts_the_document_is_rejected_not_raised(tiny_engine):
    [[c]] = tiny_engine.generate([CHAT], SamplingParams(max_tokens=16, seed=0, stop=["steps"]), json_schema=PLAN)
    assert c.finish_reason == "error" and len(c.rejected) == 2  # the fixture's max_json_retries=1
    assert all(r["reason"].startswith("not valid JSON") for r in c.rejected)


def test_the_cache_compiles_each_schema_once_and_drops_the_least_recent(tiny_engine):
    cache = GrammarCache(tiny_engine.tokenizer(), tiny_engine._logits_width, tiny_engine._eos_ids, capacity=2)
    a, b, c = (Plan.decoding_schema(max_steps=k, max_action_chars=8) for k in (1, 2, 3))
    first = cache.get(a)
    assert first is not None and cache.get(json.loads(json.dumps(a))) is first
    cache.get(b), cache.get(a), cache.get(c)  # b is now the least recently used: dropped
    assert cache.get(a) is first and cache.get(None) is None
    assert len(cache._grammars) == 2 and schema_key(b) not in cache._grammars


def test_without_xgrammar_the_engine_retries_and_warns_once(monkeypatch, caplog, tiny_llama_path):
    monkeypatch.setattr(grammar_mod, "xgr", None)
    engine = TransformersEngine(EngineConfig(backend="transformers", model="tiny-random-llama", dtype="float32",
                                             max_json_retries=1))
    try:
        with caplog.at_level(logging.WARNING, logger=grammar_mod.__name__):
            for _ in range(2):
                [[c]] = engine.generate([CHAT], SamplingParams(max_tokens=8, seed=0), json_schema=PLAN)
                # a random model unconstrained: both attempts rejected, the sample kept as an error
                assert c.finish_reason == "error" and len(c.rejected) == 2
        warnings = [r for r in caplog.records if "xgrammar is not installed" in r.getMessage()]
        assert len(warnings) == 1 and "retries" in warnings[0].getMessage()
    finally:
        engine.shutdown()


def test_tokens_with_raw_control_bytes_are_never_allowed(tiny_engine):
    """xgrammar's rule for a bounded string admits control characters JSON forbids unescaped
    (seed 2 of the plan test drew a raw BEL); the engine masks every such token out."""
    import xgrammar as xgr

    cache = GrammarCache(tiny_engine.tokenizer(), tiny_engine._logits_width, tiny_engine._eos_ids)
    info = xgr.TokenizerInfo.from_huggingface(tiny_engine.tokenizer(), vocab_size=tiny_engine._logits_width)
    logits = torch.zeros(1, tiny_engine._logits_width)
    xgr.apply_token_bitmask_inplace(logits, cache.json_safe_bits[None, :])
    banned = set(torch.nonzero(logits[0] == float("-inf"))[:, 0].tolist())
    control = {t for t, b in enumerate(info.decoded_vocab) if any(x < 0x20 for x in b)}
    assert control and banned == control - set(tiny_engine._eos_ids)


def test_a_row_whose_mask_allows_nothing_is_left_unmasked_and_marked_failed(tiny_engine):
    """Never expected (a grammar always allows a next token); if it happened, the batch must
    not end in NaNs: the row keeps its logits and is marked failed (validation then rejects it)."""
    from worldagent_ray.engines.grammar import GrammarMask

    cache = GrammarCache(tiny_engine.tokenizer(), tiny_engine._logits_width, tiny_engine._eos_ids)
    nothing = torch.zeros_like(cache.json_safe_bits)
    mask = GrammarMask(cache.get(PLAN), rows=2, vocab_size=cache.vocab_size, allowed_bits=nothing)
    scores = torch.randn(2, cache.vocab_size)
    out = mask(torch.zeros(2, 3, dtype=torch.long), scores)
    assert torch.equal(out, scores) and mask.failed == [True, True]
    ok = GrammarMask(cache.get(PLAN), rows=1, vocab_size=cache.vocab_size, allowed_bits=cache.json_safe_bits)
    first = ok(torch.zeros(1, 3, dtype=torch.long), scores[:1])
    allowed = torch.isfinite(first[0]).nonzero()[:, 0].tolist()
    assert ok.failed == [False] and allowed and all(
        tiny_engine.tokenizer().decode([t]) and '{"steps": ['.startswith(tiny_engine.tokenizer().decode([t]))
        for t in allowed)
