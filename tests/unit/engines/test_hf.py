"""The transformers engine: Completion shapes, logprob semantics, seeds, n, stop strings,
JSON enforcement (grammar, then validate-and-retry; see test_hf_grammar.py), prompt-length errors, atomic weight loads, images."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from worldagent_ray.config import EngineConfig
from worldagent_ray.engines import build_engine
from worldagent_ray.engines.base import (InferenceEngine, PromptTooLongError, UnknownModelError,
                                         WeightSyncError)
from worldagent_ray.engines.hf import TransformersEngine
from worldagent_ray.engines.json_check import UnsupportedSchemaError, json_rejection
from worldagent_ray.schemas import Plan, SamplingParams, Verdict, parse_plan_json

CHAT = [{"role": "system", "content": "Answer with JSON."}, {"role": "user", "content": "Plan: make tea"}]


def _tiny(**kw) -> TransformersEngine:
    return TransformersEngine(EngineConfig(backend="transformers", model="tiny-random-llama", **kw))


# ----------------------------------------------------------------------------- json checker


def test_json_check_accepts_valid_plan_and_names_each_violation():
    schema = Plan.decoding_schema(max_steps=2)
    assert json_rejection('  {"steps": [{"step": 1, "action": "boil water"}]} ', schema) is None
    assert "not valid JSON" in json_rejection('{"steps": [', schema)
    assert "missing required property 'steps'" in json_rejection("{}", schema)
    assert "more than maxItems 2" in json_rejection(
        '{"steps": [{"step":1,"action":"a"},{"step":2,"action":"b"},{"step":3,"action":"c"}]}', schema
    )
    assert "unexpected property 'x'" in json_rejection('{"steps": [{"step":1,"action":"a","x":1}]}', schema)
    assert "expected integer" in json_rejection('{"steps": [{"step":true,"action":"a"}]}', schema)
    enum = Plan.decoding_schema(vocabulary=["open fridge", "take milk"])
    assert "is not one of" in json_rejection('{"steps": [{"step":1,"action":"fly"}]}', enum)


def test_json_check_enforces_verdict_numbers():
    schema = Verdict.decoding_schema()
    scores = {k: 0.5 for k in schema["properties"]["scores"]["required"]}
    good = {"state_caption": "tea made", "success": True, "scores": scores}
    import json

    assert json_rejection(json.dumps(good), schema) is None
    bad = {**good, "scores": {**scores, "physics": 1.5}}
    assert "$.scores.physics: 1.5 > maximum 1" in json_rejection(json.dumps(bad), schema)


def test_unsupported_schema_keyword_is_refused(tiny_engine):
    with pytest.raises(UnsupportedSchemaError, match="pattern"):
        tiny_engine.generate(["x"], SamplingParams(max_tokens=2), json_schema={"type": "string", "pattern": "a+"})


# ----------------------------------------------------------------------------- generation


def test_engine_satisfies_protocol(tiny_engine):
    assert isinstance(tiny_engine, InferenceEngine)
    assert tiny_engine.model_name == "tiny-random-llama"
    assert tiny_engine.weights_version == 0


def test_completion_shapes_and_logprobs(tiny_engine):
    out = tiny_engine.generate(["Hello there", CHAT], SamplingParams(max_tokens=6, n=3, seed=0))
    assert [len(group) for group in out] == [3, 3]
    tok = tiny_engine.tokenizer()
    chat_ids = tok(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False).input_ids
    assert out[1][0].prompt_token_ids == chat_ids
    assert out[0][0].prompt_token_ids == tok("Hello there").input_ids
    for group in out:
        for c in group:
            assert 1 <= len(c.token_ids) <= 6
            assert len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0.0 and math.isfinite(lp) for lp in c.logprobs)
            assert c.finish_reason in ("stop", "length")
            assert (c.finish_reason == "length") == (len(c.token_ids) == 6 and tok.eos_token_id not in c.token_ids)
            assert c.weights_version == 0 and c.rejected == []
    # n samples of one prompt differ (vocabulary 49152, random weights, temperature 1).
    assert len({tuple(c.token_ids) for c in out[0]}) == 3


def test_seed_makes_generation_reproducible(tiny_engine):
    p = SamplingParams(max_tokens=8, n=2, seed=123)
    a = tiny_engine.generate(["Hello", CHAT], p)
    b = tiny_engine.generate(["Hello", CHAT], p)
    c = tiny_engine.generate(["Hello", CHAT], p.model_copy(update={"seed": 124}))
    assert [[x.token_ids for x in g] for g in a] == [[x.token_ids for x in g] for g in b]
    assert [[x.logprobs for x in g] for g in a] == [[x.logprobs for x in g] for g in b]
    assert [[x.token_ids for x in g] for g in a] != [[x.token_ids for x in g] for g in c]


def _recomputed_logprobs(engine: TransformersEngine, prompt_ids, token_ids, temperature: float):
    model = engine._model
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp[torch.arange(len(token_ids)), torch.tensor(token_ids)].tolist()


def test_greedy_is_argmax_and_logprobs_are_raw(tiny_engine):
    [[a, b]] = tiny_engine.generate([CHAT], SamplingParams(max_tokens=5, n=2, temperature=0.0))
    assert a.token_ids == b.token_ids
    expected = _recomputed_logprobs(tiny_engine, a.prompt_token_ids, a.token_ids, 1.0)
    assert a.logprobs == pytest.approx(expected, abs=1e-3)
    model = tiny_engine._model
    with torch.no_grad():
        first = model(input_ids=torch.tensor([a.prompt_token_ids])).logits[0, -1].argmax().item()
    assert a.token_ids[0] == first


def test_sampled_logprobs_are_under_the_tempered_distribution(tiny_engine):
    [[c]] = tiny_engine.generate(["Hello"], SamplingParams(max_tokens=6, temperature=0.7, seed=3))
    expected = _recomputed_logprobs(tiny_engine, c.prompt_token_ids, c.token_ids, 0.7)
    assert c.logprobs == pytest.approx(expected, abs=1e-3)


def test_top_k_renormalises_over_the_kept_tokens(tiny_engine):
    [[c]] = tiny_engine.generate(["Hello"], SamplingParams(max_tokens=4, top_k=2, seed=0))
    # Only two tokens keep mass at each step, so the sampled one has probability >= ~1/2 of
    # a near-uniform random model (logprob near log(1/2)), far above log(1/49152).
    assert all(lp > math.log(0.3) for lp in c.logprobs)


def test_stop_string_cuts_text_and_finishes_with_stop(tiny_engine):
    [[free]] = tiny_engine.generate(["Hello"], SamplingParams(max_tokens=30, seed=1))
    letter = next(ch for ch in free.text.strip() if ch.isalpha())
    [[c]] = tiny_engine.generate(["Hello"], SamplingParams(max_tokens=30, seed=1, stop=[letter]))
    assert letter not in c.text
    assert c.finish_reason == "stop"
    assert free.text.startswith(c.text)
    assert len(c.token_ids) < len(free.token_ids) and len(c.logprobs) == len(c.token_ids)


def test_json_schema_outputs_validate_or_record_rejections(tiny_engine):
    schema = Plan.decoding_schema(max_steps=4)
    out = tiny_engine.generate([CHAT, "Plan:"], SamplingParams(max_tokens=12, n=2, seed=0), json_schema=schema)
    for group in out:
        assert len(group) == 2
        for c in group:
            if c.finish_reason == "error":
                # max_json_retries=1: the first attempt and one retry, each with its reason.
                assert len(c.rejected) == 2
                assert all(r["reason"] and "text" in r for r in c.rejected)
                assert c.rejected[-1]["text"] == c.text
            else:
                assert json_rejection(c.text, schema) is None
                parse_plan_json(c.text)


def test_prompt_too_long_is_raised_before_generation(tiny_engine):
    long_prompt = "word " * 2100
    with pytest.raises(PromptTooLongError) as e:
        tiny_engine.generate(["short", long_prompt], SamplingParams(max_tokens=8))
    assert e.value.max_model_len == 2048 and e.value.prompt_tokens > 2040
    assert "prompt 1" in str(e.value)
    engine = _tiny(max_model_len=64)
    n = len(engine.tokenizer()("word " * 40).input_ids)
    with pytest.raises(PromptTooLongError):
        engine.generate(["word " * 40], SamplingParams(max_tokens=64 - n + 1))
    [[ok]] = engine.generate(["word " * 40], SamplingParams(max_tokens=64 - n, temperature=0))
    assert len(ok.prompt_token_ids) + len(ok.token_ids) <= 64


def test_images_for_a_text_model_are_refused(tiny_engine):
    from PIL import Image

    msg = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (32, 32))},
                                        {"type": "text", "text": "what is this"}]}]
    with pytest.raises(ValueError, match="text-only"):
        tiny_engine.generate([msg], SamplingParams(max_tokens=2))


@pytest.mark.parametrize("model", ["/no/such/folder", "no-such-org/no-such-model"])
def test_unknown_model_raises(model):
    with pytest.raises(UnknownModelError, match="no-such|/no/such"):
        TransformersEngine(EngineConfig(backend="transformers", model=model))


def test_factory_builds_transformers_engine():
    engine = build_engine(EngineConfig(backend="transformers", model="tiny-random-llama"))
    try:
        assert isinstance(engine, TransformersEngine)
    finally:
        engine.shutdown()


# ----------------------------------------------------------------------------- weights


def _perturbed(engine: TransformersEngine, scale: float = 0.5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in engine._model.state_dict().items()}


def test_load_weights_changes_outputs_and_bumps_version():
    engine = _tiny()
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    [[before]] = engine.generate([CHAT], greedy)
    new = _perturbed(engine)
    assert engine.load_weights(new, version=1) == 1
    [[after]] = engine.generate([CHAT], greedy)
    assert engine.weights_version == 1 and after.weights_version == 1 and before.weights_version == 0
    assert after.token_ids != before.token_ids
    with pytest.raises(WeightSyncError, match="must increase"):
        engine.load_weights(new, version=1)
    with pytest.raises(WeightSyncError, match="missing"):
        engine.load_weights({k: v for k, v in list(new.items())[1:]}, version=2)
    bad = dict(new)
    bad["model.norm.weight"] = torch.ones(3)
    with pytest.raises(WeightSyncError, match="model.norm.weight: shape"):
        engine.load_weights(bad, version=2)
    assert engine.weights_version == 1
    [[still]] = engine.generate([CHAT], greedy)
    assert still.token_ids == after.token_ids  # failed loads changed nothing
    engine.shutdown()


def test_load_weights_waits_for_a_running_generate():
    engine = _tiny()
    greedy = SamplingParams(max_tokens=48, temperature=0.0)
    [[old]] = engine.generate([CHAT], greedy)
    new = _perturbed(engine)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("c", engine.generate([CHAT], greedy)[0][0]))
    t.start()
    time.sleep(0.05)
    engine.load_weights(new, version=5)
    t.join()
    c = result["c"]
    # Either entirely the old weights (version 0) or entirely the new ones, never a mix.
    if c.weights_version == 0:
        assert c.token_ids == old.token_ids
    else:
        [[fresh]] = engine.generate([CHAT], greedy)
        assert c.weights_version == 5 and c.token_ids == fresh.token_ids
    engine.shutdown()


# ----------------------------------------------------------------------------- vision


def test_vision_model_reads_images(tmp_path):
    import numpy as np
    from PIL import Image

    engine = TransformersEngine(EngineConfig(backend="transformers", model="tiny-random-qwen2-vl"))
    rng = np.random.default_rng(0)
    path = tmp_path / "frame.png"
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(path)
    other = Image.fromarray(np.zeros((96, 128, 3), dtype=np.uint8))

    def ask(image):
        return [{"role": "user", "content": [{"type": "image", "image": image},
                                              {"type": "text", "text": "Describe the scene."}]}]

    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    out = engine.generate([ask(str(path)), ask(other), "no image here"], greedy)
    a, b, c = out[0][0], out[1][0], out[2][0]
    image_token = engine._config.image_token_id
    assert a.prompt_token_ids.count(image_token) > 1  # one placeholder per merged patch
    assert c.prompt_token_ids.count(image_token) == 0
    for x in (a, b, c):
        assert len(x.token_ids) == len(x.logprobs) and all(lp <= 0 for lp in x.logprobs)
    assert a.logprobs != b.logprobs  # the pixels reach the model
    with pytest.raises(FileNotFoundError):
        engine.generate([ask(str(tmp_path / "missing.png"))], greedy)
    from worldagent_ray.engines.images import ImageTooLargeError

    engine.cfg.max_image_pixels = 128 * 96 - 1  # the engine's own cap applies to every prompt image
    with pytest.raises(ImageTooLargeError, match="engines.<name>.max_image_pixels"):
        engine.generate([ask(str(path))], greedy)
    engine.shutdown()


# ----------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_json_attempts_are_valid_or_rejected_with_reasons():
    """The stock SmolLM2 often wraps JSON in markdown fences, which the fallback rejects:
    what must hold is that nothing invalid is returned as valid and nothing is dropped."""
    engine = TransformersEngine(
        EngineConfig(backend="transformers", model="smollm2-135m-instruct", dtype="float32", max_json_retries=1)
    )
    schema = Plan.decoding_schema(max_steps=4)
    prompt = [{"role": "system", "content": 'Answer only with JSON like {"steps": [{"step": 1, "action": "..."}]}.'},
              {"role": "user", "content": "Goal: make a cup of tea. Write the plan as JSON."}]
    [[c]] = engine.generate([prompt], SamplingParams(max_tokens=48, temperature=0.7, seed=0), json_schema=schema)
    assert len(c.logprobs) == len(c.token_ids) > 0
    if c.finish_reason == "error":
        assert len(c.rejected) == 2 and c.rejected[-1]["text"] == c.text
        assert all(r["reason"].startswith(("not valid JSON", "schema violation")) for r in c.rejected)
    else:
        assert parse_plan_json(c.text).steps and len(c.rejected) <= 1
    engine.shutdown()


# ----------------------------------------------------------------------------- micro-batching


def test_calls_arriving_during_a_batch_are_gathered_into_the_next(tiny_engine):
    """While the engine is held (as during a weight load), three calls queue; they then run
    as ONE generate, and each still gets exactly the tokens it gets alone (per-row seeds)."""
    import asyncio

    p = [SamplingParams(max_tokens=6, seed=s, temperature=1.0) for s in (1, 2, 3)]
    alone = [tiny_engine.generate(["Hello", CHAT], q) for q in p]

    async def scenario():
        with tiny_engine.paused():
            before = tiny_engine.stats()
            tasks = [asyncio.ensure_future(tiny_engine.agenerate(["Hello", CHAT], q)) for q in p]
            while tiny_engine._batcher.pending() < 3:
                await asyncio.sleep(0.01)
        out = await asyncio.gather(*tasks)
        return before, tiny_engine.stats(), out

    before, after, out = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert after["batches"] - before["batches"] == 1
    assert after["max_batch_requests"] >= 3 and after["max_batch_rows"] >= 6
    assert [[c.token_ids for c in g] for o in out for g in o] == [[c.token_ids for c in g] for a in alone for g in a]


def test_a_call_cancelled_before_its_batch_never_runs(tiny_engine):
    import asyncio

    async def scenario():
        with tiny_engine.paused():
            before = tiny_engine.stats()
            task = asyncio.ensure_future(tiny_engine.agenerate(["Hello"], SamplingParams(max_tokens=4)))
            while tiny_engine._batcher.pending() < 1:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        [[c]] = await tiny_engine.agenerate(["Hello"], SamplingParams(max_tokens=2, seed=0))
        return before, tiny_engine.stats(), c

    before, after, c = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert after["requests"] - before["requests"] == 1  # only the second call ran
    assert len(c.token_ids) >= 1


# ----------------------------------------------------------------------------- bounded start


def test_startup_timeout_names_the_engine_and_shuts_a_late_engine_down(monkeypatch):
    """Fault injection: the model load blocks until the test releases it."""
    from worldagent_ray.engines.base import EngineStartupError

    release, shut = threading.Event(), threading.Event()
    real_load, real_shutdown = TransformersEngine._load_model, TransformersEngine.shutdown

    def slow_load(self):
        assert release.wait(60)
        return real_load(self)

    def recording_shutdown(self):
        real_shutdown(self)
        shut.set()

    monkeypatch.setattr(TransformersEngine, "_load_model", slow_load)
    monkeypatch.setattr(TransformersEngine, "shutdown", recording_shutdown)
    cfg = EngineConfig(backend="transformers", model="tiny-random-llama", startup_timeout_s=0.5)
    with pytest.raises(EngineStartupError, match=r"engine 'policy' .*did not start within startup_timeout_s=0.5s"):
        build_engine(cfg, name="policy")
    release.set()
    assert shut.wait(60)  # the engine that finished late was shut down, not leaked


# ----------------------------------------------------------------------------- images


def test_image_pixel_cap_is_checked_before_decoding(tmp_path):
    import io

    from PIL import Image

    from worldagent_ray.engines.images import ImageTooLargeError, load_image

    buf = io.BytesIO()
    Image.new("1", (12000, 10000)).save(buf, format="PNG")  # 120 Mpx in a few KB
    data = buf.getvalue()
    assert len(data) < 100_000
    with pytest.raises(ImageTooLargeError, match="12000x10000 .* over the cap of 16777216"):
        load_image(data)
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    with pytest.raises(ImageTooLargeError):
        load_image(str(path), max_pixels=1000)
    with pytest.raises(ImageTooLargeError):
        load_image(Image.new("RGB", (64, 64)), max_pixels=100)
    assert load_image(Image.new("L", (8, 8)), max_pixels=64).mode == "RGB"
    with pytest.raises(ValueError, match="not a decodable image"):
        load_image(b"not an image")


def test_remote_image_fetch_times_out_naming_the_uri():
    """Fault injection: a filesystem whose reads block until the test ends."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    from worldagent_ray.engines.images import load_image

    gate = threading.Event()

    class StalledFS(MemoryFileSystem):
        protocol = "stalled"

        def _open(self, *a, **kw):
            gate.wait(30)
            raise FileNotFoundError(a[0])

    fsspec.register_implementation("stalled", StalledFS, clobber=True)
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"image 'stalled://bucket/frame.png' was not fetched within 0.3s"):
            load_image("stalled://bucket/frame.png", timeout_s=0.3)
        assert time.monotonic() - t0 < 20
    finally:
        gate.set()


# ----------------------------------------------------------------------------- cancellation


def test_bounded_delivers_a_cancellation_that_wait_for_swallows():
    """The root cause of the hang of test_wait_synced_times_out_naming_the_lagging_replica:
    on Python 3.11 ``asyncio.wait_for`` drops a cancel that lands as its inner call finishes,
    so a cancelled heartbeat loop kept running and ``aclose()`` awaited it forever. ``bounded``
    delivers that cancel."""
    import asyncio
    import sys

    from worldagent_ray.engines.aio import bounded

    async def race(wrap):
        fut = asyncio.get_running_loop().create_future()

        async def waiter():
            return await wrap(fut)

        t = asyncio.ensure_future(waiter())
        for _ in range(3):
            await asyncio.sleep(0)
        fut.set_result("done")
        t.cancel()  # in the same loop iteration as the result
        try:
            return await t
        except asyncio.CancelledError:
            return "cancelled"

    assert asyncio.run(race(lambda f: bounded(f, 10))) == "cancelled"
    swallowed = asyncio.run(race(lambda f: asyncio.wait_for(f, 10)))
    if sys.version_info[:2] == (3, 11):
        assert swallowed == "done"  # documents the CPython behaviour bounded() avoids
