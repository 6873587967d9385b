"""Phase 1 of seed 000 on Ray: SFT (and offline DPO) of the Action policy with TRL inside a Ray
Train ``TorchTrainer``; the data moves through Ray Data.

- :func:`sft_dataset` builds the SFT data set with Ray Data: train-split generator tasks with
  their reference plans (``ray.data.from_items``) and successful train-split episodes read
  straight from the LanceDB memory table (``ray.data.read_lance``, filtered to
  ``split = 'train' AND success``), formatted by :mod:`worldagent_ray.datasets.action_sft`.
- :func:`dpo_dataset` reads memory the same way and makes best/worst pairs per group.
- :func:`launch_sft` / :func:`launch_dpo` return the ``TorchTrainer``; each worker runs TRL's
  ``SFTTrainer`` / ``DPOTrainer`` (``prepare_trainer`` wires it to Ray's process group), and
  rank 0 reports the final model as a Ray checkpoint: a complete Hugging Face folder
  (``config.json``, ``model.safetensors``, tokenizer, generation config; LoRA adapters merged)
  that the ``policy`` engine loads with vLLM or transformers. :func:`export_model` copies it to
  the run root.

TRL's own checkpoints (``save_steps``) go to ``<work_dir>/trainer`` on the worker, and a run
started again on the same work folder resumes from the newest one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import ray
import ray.data
import ray.train

from ..config import Config
from ..datasets.action_sft import dpo_pairs_from_rows, generator_sft_examples, memory_sft_examples
from ..models import resolve_model
from .train_progress import fit_with_progress, progress_callbacks, progress_queue

log = logging.getLogger(__name__)

__all__ = ["dpo_dataset", "export_model", "launch_dpo", "launch_sft", "memory_table_uri", "run_dpo", "run_sft",
           "sft_dataset"]

MEMORY_COLUMNS = ["id", "episode_json", "split", "success", "reward", "group_id"]


def memory_table_uri(memory_uri: str, table: str = "episodes") -> str:
    """The Lance dataset of the memory table (LanceDB keeps table ``t`` at ``<uri>/t.lance``)."""
    return f"{memory_uri.rstrip('/')}/{table}.lance"


def _world_helpers() -> tuple[Callable, Callable, Any]:
    from ..world.sandbox import SandboxTaskGenerator, SandboxWorld, reference_plan

    world = SandboxWorld()
    return world.admissible_actions, (lambda t: reference_plan(t).actions), SandboxTaskGenerator


def _as_json_rows(examples: list[dict[str, Any]]) -> list[dict[str, str]]:
    # One JSON string per example: nested chat messages survive any block format unchanged.
    return [{"json": json.dumps(e)} for e in examples]


def _memory_rows(memory_uri: str | None, table: str, where: str) -> "ray.data.Dataset | None":
    if not memory_uri:
        return None
    uri = memory_table_uri(memory_uri, table)
    if not (uri.startswith(("s3://", "gs://", "az://")) or Path(uri).exists()):
        log.warning("memory table %s does not exist: no memory examples", uri)
        return None
    return ray.data.read_lance(uri, columns=MEMORY_COLUMNS, filter=where)


def sft_dataset(cfg: Config, memory_uri: str | None = None) -> "ray.data.Dataset":
    """The SFT data set (rows ``{"json": example}``): generator examples for ``training.sft.phases``
    (``tasks_per_composition`` per train composition) plus, when ``training.sft.from_memory``,
    successful train-split episodes of the memory at ``memory_uri``.

    Raises:
        ValueError: the data set would be empty.
    """
    s = cfg.training.sft
    action_cfg = cfg.agents.action
    vocab, reference, Generator = _world_helpers()
    examples: list[dict[str, Any]] = []
    for k in range(s.tasks_per_composition):
        gen = Generator(seed=s.seed * 1000 + k)
        tasks = [t for p in s.phases for t in gen.split_tasks(p, "train")]
        examples += generator_sft_examples(tasks, action_cfg, vocab, reasoning=s.reasoning, reference=reference)
    parts = [ray.data.from_items(_as_json_rows(examples))] if examples else []
    mem = _memory_rows(memory_uri, cfg.memory.table, "split = 'train' AND success = true") if s.from_memory else None
    if mem is not None:
        min_reward, reasoning = s.memory_min_reward, s.reasoning

        def to_examples(batch: dict[str, Any]) -> dict[str, list[str]]:
            v, _, _ = _world_helpers()
            rows = [{"episode_json": x} for x in batch["episode_json"]]
            ex = memory_sft_examples(rows, action_cfg, v, min_reward=min_reward, reasoning=reasoning)
            return {"json": [json.dumps(e) for e in ex]}

        parts.append(mem.map_batches(to_examples, batch_format="numpy", batch_size=256))
    if not parts:
        raise ValueError("the SFT data set is empty: set training.sft.tasks_per_composition >= 1 or give a memory")
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def dpo_dataset(cfg: Config, memory_uri: str, max_pairs: int | None = None) -> list[dict[str, Any]]:
    """Best/worst pairs per group of train-split episodes in memory (read with Ray Data)."""
    mem = _memory_rows(memory_uri, cfg.memory.table, "split = 'train'")
    if mem is None:
        return []
    vocab, _, _ = _world_helpers()
    rows = {r["id"]: r for r in mem.iter_rows()}  # one row per episode id (upserts may repeat one)
    return dpo_pairs_from_rows(rows.values(), cfg.agents.action, vocab, margin=cfg.training.dpo.margin,
                               max_pairs=max_pairs, seed=cfg.training.sft.seed)


# --------------------------------------------------------------------------- worker loops


def _shard_examples() -> list[dict[str, Any]]:
    shard = ray.train.get_dataset_shard("train")
    return [json.loads(r["json"]) for r in shard.iter_rows()]


def _latest_checkpoint(trainer_dir: Path) -> str | None:
    ckpts = sorted(trainer_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(ckpts[-1]) if ckpts else None


def _save_final(trainer: Any, tokenizer: Any, base_dtype: Any, metrics: dict[str, float]) -> None:
    """Rank 0: merge LoRA if any, save a complete HF folder and report it as the checkpoint."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    with tempfile.TemporaryDirectory(prefix="wa-sft-") as d:
        model.config.use_cache = True
        model.to(base_dtype).save_pretrained(d, safe_serialization=True)
        tokenizer.save_pretrained(d)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(d)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _common_args(config: dict[str, Any], trainer_dir: Path) -> dict[str, Any]:
    use_gpu = bool(config.get("use_gpu"))
    return dict(
        output_dir=str(trainer_dir), per_device_train_batch_size=config["batch_size"], learning_rate=config["lr"],
        max_steps=config["max_steps"], lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=5,
        save_steps=config.get("save_steps", 50), save_total_limit=2, report_to=[], seed=config["seed"],
        use_cpu=not use_gpu, bf16=config.get("precision", "auto") == "bf16" or (
            use_gpu and config.get("precision", "auto") == "auto"),
        dataloader_num_workers=0, disable_tqdm=True,
    )


def _load(model_path: str) -> tuple[Any, Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(model_path), "dtype", None) or torch.float32
    return base, tok, dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), torch.float32)


def _peft(config: dict[str, Any]) -> Any:
    if not config.get("lora"):
        return None
    from peft import LoraConfig

    return LoraConfig(r=config["lora_rank"], lora_alpha=config["lora_alpha"], lora_dropout=0.0, bias="none",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")


def sft_train_loop(config: dict[str, Any]) -> None:
    """Per worker: TRL ``SFTTrainer`` on this worker's shard (completion-only loss)."""
    from datasets import Dataset
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    examples = _shard_examples()
    ds = Dataset.from_list([{"prompt": e["prompt"], "completion": e["completion"]} for e in examples])
    trainer_dir = Path(config["work_dir"]) / "trainer"
    model, tok, dtype = _load(config["model_path"])
    args = TrlSFTConfig(
        num_train_epochs=config["epochs"], max_length=config["max_length"], completion_only_loss=True,
        gradient_checkpointing=config.get("gradient_checkpointing", True), **_common_args(config, trainer_dir),
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=_peft(config),
                         callbacks=progress_callbacks(config.get("progress")))
    _train_and_report(trainer, trainer_dir, tok, dtype, {"examples": float(len(ds))})


def _train_and_report(trainer: Any, trainer_dir: Path, tok: Any, dtype: Any, counts: dict[str, float]) -> None:
    """Prepare ``trainer`` for Ray Train, train it (resuming from its latest checkpoint in
    ``trainer_dir``), then save the final model on rank 0 or report the metrics elsewhere."""
    from ray.train.huggingface.transformers import prepare_trainer

    trainer = prepare_trainer(trainer)
    out = trainer.train(resume_from_checkpoint=_latest_checkpoint(trainer_dir))
    metrics = {"train_loss": float(out.training_loss), "steps": float(out.global_step), **counts}
    if ray.train.get_context().get_world_rank() == 0:
        _save_final(trainer, tok, dtype, metrics)
    else:
        ray.train.report(metrics)


def dpo_train_loop(config: dict[str, Any]) -> None:
    """Per worker: TRL ``DPOTrainer`` on preference pairs (the reference is the starting model)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    examples = _shard_examples()
    ds = Dataset.from_list([{k: e[k] for k in ("prompt", "chosen", "rejected")} for e in examples])
    trainer_dir = Path(config["work_dir"]) / "trainer"
    model, tok, dtype = _load(config["model_path"])
    args = DPOConfig(beta=config["beta"], loss_type=[config["loss_type"]], num_train_epochs=1.0,
                     max_length=config["max_length"], **_common_args(config, trainer_dir))
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=_peft(config),
                         callbacks=progress_callbacks(config.get("progress")))
    _train_and_report(trainer, trainer_dir, tok, dtype, {"pairs": float(len(ds))})


# --------------------------------------------------------------------------- launchers


def _trainer(loop: Callable, loop_config: dict[str, Any], cfg: Config, dataset: "ray.data.Dataset",
             storage: str, name: str, num_workers: int):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    res = cfg.resources.learner
    use_gpu = cfg.learner.use_gpu
    return TorchTrainer(
        loop,
        train_loop_config=dict(loop_config, use_gpu=use_gpu),
        torch_config=TorchConfig(backend=cfg.learner.backend),
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": res.num_cpus, **({"GPU": res.num_gpus or 1} if use_gpu else {}), **res.custom},
        ),
        datasets={"train": dataset},
        run_config=RunConfig(name=name, storage_path=str(Path(storage).resolve()) if "://" not in storage else storage),
    )


def launch_sft(cfg: Config, dataset: "ray.data.Dataset", work_dir: str, model: str | None = None,
               progress: Any = None):
    """The ``TorchTrainer`` of phase 1 (call ``.fit()``; ``Result.checkpoint`` is the model).

    ``model`` defaults to the policy engine's model; ``work_dir`` holds TRL's checkpoints and
    Ray Train's run folder; ``progress``: a progress queue (:mod:`.train_progress`).
    """
    s = cfg.training.sft
    loop_config = {
        "model_path": resolve_model(model or cfg.engines[cfg.agents.action.engine].model), "work_dir": work_dir,
        "batch_size": s.batch_size, "lr": s.lr, "epochs": s.epochs, "max_steps": s.max_steps, "seed": s.seed,
        "max_length": s.max_length, "lora": s.lora, "lora_rank": s.lora_rank, "lora_alpha": s.lora_alpha,
        "save_steps": s.save_steps, "gradient_checkpointing": cfg.learner.gradient_checkpointing,
        "precision": s.precision, "progress": progress,
    }
    return _trainer(sft_train_loop, loop_config, cfg, dataset, work_dir, "sft", s.num_workers)


def launch_dpo(cfg: Config, pairs: list[dict[str, Any]], work_dir: str, model: str, progress: Any = None):
    """The ``TorchTrainer`` of offline DPO on ``pairs`` (see :func:`dpo_dataset`); ``progress``: a
    progress queue (:mod:`.train_progress`)."""
    if not pairs:
        raise ValueError("no DPO pairs: memory has no train-split group whose rewards differ by the margin")
    d = cfg.training.dpo
    s = cfg.training.sft
    loop_config = {
        "model_path": resolve_model(model), "work_dir": work_dir, "batch_size": d.batch_size, "lr": d.lr,
        "max_steps": d.max_steps, "seed": s.seed, "max_length": s.max_length, "beta": d.beta,
        "loss_type": d.loss_type, "lora": s.lora, "lora_rank": s.lora_rank, "lora_alpha": s.lora_alpha,
        "progress": progress,
    }
    ds = ray.data.from_items(_as_json_rows(pairs))
    return _trainer(dpo_train_loop, loop_config, cfg, ds, work_dir, "dpo", 1)


def export_model(result: Any, out_dir: str) -> str:
    """Copy the model of a finished trainer's ``Result.checkpoint`` to ``out_dir`` (replaced
    atomically: a half-written folder never stands at ``out_dir``)."""
    if result.checkpoint is None:
        raise RuntimeError(f"the trainer produced no checkpoint (error: {result.error})")
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    result.checkpoint.to_directory(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return str(out)


def _finish(result: Any, out_dir: str, info: dict[str, Any]) -> dict[str, Any]:
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    path = export_model(result, out_dir)
    info = dict(info, model=path, metrics={k: v for k, v in (result.metrics or {}).items()
                                           if isinstance(v, (int, float, str))})
    Path(out_dir, "train_info.json").write_text(json.dumps(info, indent=2, default=str))
    return info


def run_sft(cfg: Config, out_dir: str, *, memory_uri: str | None = None, model: str | None = None) -> dict[str, Any]:
    """Phase 1 end to end (Ray must be initialised): data set, ``TorchTrainer.fit``, model to
    ``out_dir`` (a ``policy`` engine model), ``<out_dir>/train_info.json``. TRL checkpoints go
    to ``<out_dir>.work`` so that running it again resumes."""
    ds = sft_dataset(cfg, memory_uri).materialize()
    n = ds.count()
    work = f"{out_dir.rstrip('/')}.work"
    queue = progress_queue()
    result = fit_with_progress(launch_sft(cfg, ds, work, model, progress=queue), queue, "sft")
    return _finish(result, out_dir, {"phase": "sft", "examples": n, "memory": memory_uri,
                                     "base_model": model or cfg.engines[cfg.agents.action.engine].model})


def run_dpo(cfg: Config, out_dir: str, *, memory_uri: str, model: str) -> dict[str, Any]:
    """Offline DPO end to end (Ray must be initialised): pairs from memory, TRL's DPOTrainer,
    model to ``out_dir``."""
    pairs = dpo_dataset(cfg, memory_uri)
    work = f"{out_dir.rstrip('/')}.work"
    queue = progress_queue()
    result = fit_with_progress(launch_dpo(cfg, pairs, work, model, progress=queue), queue, "dpo")
    return _finish(result, out_dir, {"phase": "dpo", "pairs": len(pairs), "memory": memory_uri, "base_model": model})
