"""Offline model provisioning: builtins build once (even under concurrent first use), other
names pass through, and bad local paths fail with a message naming the builtins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from worldagent_ray.engines.base import UnknownModelError
from worldagent_ray.models import builtin_models, cache_dir, is_builtin, resolve_model

REPO = Path(__file__).resolve().parents[1]


def test_builtin_models_lists_every_builtin():
    assert builtin_models() == sorted(
        ["minilm", "smollm2-135m-instruct", "tiny-random-llama", "tiny-random-qwen2-vl", "tiny-random-qwen2.5-vl"]
    )
    assert all(is_builtin(n) for n in builtin_models())
    assert not is_builtin("Qwen/Qwen2.5-VL-7B-Instruct")


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLDAGENT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert cache_dir().is_dir()


def test_tiny_llama_resolves_offline_and_second_call_is_instant(tiny_llama_path):
    path = Path(tiny_llama_path)
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (path / f).is_file(), f
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == 49152 and config["num_hidden_layers"] == 2
    t0 = time.perf_counter()
    again = resolve_model("tiny-random-llama")
    assert again == tiny_llama_path
    assert time.perf_counter() - t0 < 0.5


def test_tiny_llama_keeps_the_smollm2_chat_template(tiny_llama_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_minilm_is_the_packaged_folder():
    path = Path(resolve_model("minilm"))
    assert (path / "model.safetensors").is_file() and (path / "modules.json").is_file()


def test_tiny_qwen2_vl_has_model_and_image_processor():
    path = Path(resolve_model("tiny-random-qwen2-vl"))
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl"
    assert (path / "preprocessor_config.json").is_file()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    assert tok.convert_tokens_to_ids("<|image_pad|>") == config["image_token_id"]


def test_tiny_qwen2_5_vl_is_the_real_class_with_vllm_friendly_dims():
    """Qwen2_5_VLForConditionalGeneration (not AutoModelForCausalLM, which has no mapping for it),
    head_dim 64 with an mrope split that fills it, and image placeholders the processor expands."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    path = Path(resolve_model("tiny-random-qwen2.5-vl"))
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    text = config["text_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert head_dim == 64 and 2 * sum(text["rope_parameters"]["mrope_section"]) == head_dim
    assert config["vision_config"]["out_hidden_size"] == text["hidden_size"]
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.convert_tokens_to_ids("<|image_pad|>") == config["image_token_id"]
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    from PIL import Image

    feats = AutoImageProcessor.from_pretrained(path)(images=[Image.new("RGB", (100, 80), (200, 30, 30))],
                                                     return_tensors="pt")
    n_img = int(feats["image_grid_thw"].prod(-1).item()) // 4
    ids = [1, config["vision_start_token_id"], *[config["image_token_id"]] * n_img, config["vision_end_token_id"], 5, 6]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), pixel_values=feats["pixel_values"],
                    image_grid_thw=feats["image_grid_thw"])
    assert out.logits.shape == (1, len(ids), config["text_config"]["vocab_size"])


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-VL-7B-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"])
def test_hub_ids_pass_through(name):
    assert resolve_model(name) == name


def test_existing_folder_passes_through(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("name", ["/no/such/model", "./missing-model", "~/no-such-model-xyz", "a/b/c"])
def test_missing_local_path_names_the_builtins(name):
    with pytest.raises(UnknownModelError) as e:
        resolve_model(name)
    assert name in str(e.value) and "tiny-random-llama" in str(e.value)


@pytest.mark.parametrize("name", ["", "   "])
def test_empty_name_is_rejected(name):
    with pytest.raises(UnknownModelError, match="non-empty"):
        resolve_model(name)


_CHILD = r"""
import sys, time
import worldagent_ray.models as m
real = m._BUILDERS["tiny-random-llama"]
def counted(out):
    with open(sys.argv[1], "a") as f:
        f.write("build\n")
    time.sleep(1.0)  # widen the race window
    real(out)
m._BUILDERS["tiny-random-llama"] = counted
print(m.resolve_model("tiny-random-llama"))
"""


def test_concurrent_first_use_builds_once(tmp_path):
    cache = tmp_path / "cache"
    log = tmp_path / "builds.log"
    # A stale, incomplete folder (a crash before the marker) must be replaced, not trusted.
    (cache / "tiny-random-llama").mkdir(parents=True)
    (cache / "tiny-random-llama" / "config.json").write_text("{}")
    env = {**os.environ, "WORLDAGENT_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(log)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert paths == {str(cache / "tiny-random-llama")}
    assert log.read_text().count("build") == 1
    built = cache / "tiny-random-llama"
    assert json.loads((built / "config.json").read_text())["model_type"] == "llama"
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")], "temporary build folders left behind"


@pytest.mark.slow
def test_smollm2_converts_from_gguf_to_bf16_safetensors():
    from safetensors import safe_open

    path = Path(resolve_model("smollm2-135m-instruct"))
    weights = path / "model.safetensors"
    assert weights.is_file()
    assert 200e6 < weights.stat().st_size < 300e6  # bfloat16, 134.5M parameters
    with safe_open(str(weights), "pt") as f:
        name = next(iter(f.keys()))
        assert str(f.get_tensor(name).dtype) == "torch.bfloat16"
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template and len(tok) == 49152
