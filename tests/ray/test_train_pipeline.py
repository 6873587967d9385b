"""jobs/train_pipeline.py on tiny settings: SFT (Ray Train) -> GRPO(+DPO) with the frozen critic,
stopped and resumed between phases; finished phases are not redone; the curriculum command
continues from the phase-2 model."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(900), pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _job():
    spec = importlib.util.spec_from_file_location("train_pipeline", ROOT / "jobs" / "train_pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY = ["engines.policy.model=tiny-random-llama", "engines.policy.backend=transformers",
        "engines.policy.dtype=float32", "training.sft.max_steps=1", "training.sft.batch_size=2",
        "training.sft.phases=[1]", "training.sft.max_length=512", "agents.action.group_size=2",
        "agents.action.max_tokens=48", "learner.dpo_coef=0.1", "resources.ray_num_cpus=2"]


def test_pipeline_chains_phases_with_checkpoints_and_resume(tmp_path):
    job = _job()
    out = tmp_path / "pipe"
    base = ["--profile", "local-cpu", "--out", str(out)] + [x for o in TINY for x in ("--set", o)]
    assert job.main(base + ["--stop-after", "sft"]) == 0
    ledger = json.loads((out / "pipeline.json").read_text())
    assert list(ledger["phases"]) == ["sft"]
    sft_model = ledger["phases"]["sft"]["model"]
    assert os.path.exists(os.path.join(sft_model, "model.safetensors"))
    sft_mtime = os.path.getmtime(os.path.join(sft_model, "model.safetensors"))
    with pytest.raises(SystemExit):
        job.parse_args(["--out", str(out), "--grpo-minutes", "0"])
    assert job.main(base) == 2  # the folder holds a pipeline: no silent overwrite without --resume

    assert job.main(base + ["--resume", "--stop-after", "grpo", "--grpo-steps", "1", "--grpo-minutes", "0.2"]) == 0
    ledger = json.loads((out / "pipeline.json").read_text())
    assert list(ledger["phases"]) == ["sft", "grpo"]
    assert os.path.getmtime(os.path.join(sft_model, "model.safetensors")) == sft_mtime  # SFT not redone
    grpo = ledger["phases"]["grpo"]
    assert Path(grpo["model"], "config.json").exists() and grpo["rounds"] >= 1
    assert (out / "grpo" / "learner" / "learner_state.json").exists()

    args = job.parse_args(base + ["--resume", "--iterations", "1"])
    cmd = job.curriculum_command(args, out, grpo["model"], None)
    assert cmd[1].endswith("jobs/evolve.py") and f"engines.policy.model={grpo['model']}" in cmd
    assert f"run.root={out}" in cmd and "run.iterations=1" in cmd
    assert job.curriculum_command(args, out, grpo["model"], out / "curriculum")[2:] == ["--resume",
                                                                                       str(out / "curriculum")]
