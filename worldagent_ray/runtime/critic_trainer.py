"""Critic training on Ray: the ground-truth data export (Ray Data) and the two TRL stages in
Ray Train (``TorchTrainer`` workers running ``SFTTrainer`` or ``RewardTrainer``).

* :func:`export_critic_data` renders plan variants of train and held-out sandbox tasks in
  parallel (``map_batches`` over task rows), adds labelled episodes from a LanceDB memory,
  and derives SFT examples, per-task preference pairs (``groupby("task_id").map_groups``) and
  anchor pairs across the tasks of a phase (``groupby("phase").map_groups``).
* :func:`launch_critic_trainer` builds the ``TorchTrainer``; :func:`train_loop_per_worker`
  runs one TRL trainer per worker and rank 0 reports the final model (LoRA merged) as the
  run's checkpoint. The formatting lives in :mod:`worldagent_ray.datasets.critic` (no Ray).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.data
import ray.train

from ..config import Config, CriticTrainingConfig, SandboxConfig
from ..datasets import critic as cdata
from ..models import resolve_model
from ..schemas import Episode
from .train_progress import progress_callbacks

logger = logging.getLogger(__name__)

__all__ = ["export_critic_data", "launch_critic_trainer", "memory_records", "precision_plan", "train_loop_per_worker"]


# --------------------------------------------------------------------------- data


class _RenderTasks:
    """``map_batches`` callable: renders every plan variant of each task row (one world per actor)."""

    def __init__(self, sandbox: dict[str, Any], critic_frames: int, out_dir: str, seed: int, kinds: list[str],
                 weights: dict[str, float]):
        from ..world.sandbox import SandboxWorld

        self.world = SandboxWorld(SandboxConfig.model_validate(sandbox), critic_frames=critic_frames)
        self.out_dir, self.seed, self.kinds, self.weights = out_dir, seed, kinds, weights

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        from ..schemas import Task

        rows: list[dict[str, Any]] = []
        for tj in batch["task_json"]:
            task = Task.model_validate_json(str(tj))
            rows += cdata.rollouts_for_task(task, self.world, self.out_dir, self.seed, self.kinds, self.weights)
        return _columns(rows)


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    keys = list(rows[0]) if rows else []
    return {k: [r[k] for r in rows] for k in keys}


def _tasks(cfg: Config) -> list[Any]:
    from ..world.sandbox import SandboxTaskGenerator

    ct = cfg.critic_training
    gen = SandboxTaskGenerator(seed=ct.seed)
    tasks: dict[str, Any] = {}
    for phase in (1, 2, 3):
        for split, n in (("train", ct.tasks_per_phase), ("heldout", ct.heldout_tasks_per_phase)):
            got, i = 0, 0
            while got < n and i < 50 * n + 100:
                t = gen.sample(phase, split, index=i)
                i += 1
                if t.id not in tasks:
                    tasks[t.id] = t
                    got += 1
    return list(tasks.values())


def memory_records(uri: str, table: str = "episodes", weights: dict[str, float] | None = None) -> ray.data.Dataset:
    """Labelled rows from the episodes in a LanceDB memory (the newest write of each id; only
    episodes with a plan and ground truth), as a Ray Dataset."""
    import lancedb
    import pyarrow as pa

    db = lancedb.connect(uri)
    try:
        tbl = db.open_table(table)
    except (ValueError, FileNotFoundError):
        raise FileNotFoundError(f"memory {uri!r} has no table {table!r}") from None
    data = tbl.search().select(["id", "updated_at", "episode_json"]).limit(None).to_arrow()
    newest: dict[str, tuple[float, str]] = {}
    for i, u, ej in zip(*(data[c].to_pylist() for c in ("id", "updated_at", "episode_json"))):
        if i not in newest or (u or 0.0) >= newest[i][0]:
            newest[i] = (u or 0.0, ej)
    ds = ray.data.from_arrow(pa.table({"episode_json": [ej for _, ej in newest.values()]}))
    w = weights or cdata.DEFAULT_WEIGHTS

    def to_rows(row: dict[str, Any]) -> list[dict[str, Any]]:
        rec = cdata.record_from_episode(Episode.model_validate_json(row["episode_json"]), w)
        return [rec] if rec is not None else []

    return ds.flat_map(to_rows)


def _pairs_of_group(batch: Any, margin: float, max_pairs: int, seed: int, anchors: bool = False) -> Any:
    """Per-task preference pairs of one task's rows, or (``anchors``) anchor pairs of one phase's rows."""
    import pyarrow as pa

    rows = batch.to_pylist()
    pairs = (cdata.anchor_pairs(rows, max_pairs, margin, seed) if anchors
             else cdata.preference_pairs(rows, margin, max_pairs, seed))
    cols = ["chosen_json", "rejected_json", "reward_gap", "task_id", "split", "kind"]
    return pa.table({c: [p[c] for p in pairs] for c in cols},
                    schema=pa.schema([("chosen_json", pa.string()), ("rejected_json", pa.string()),
                                      ("reward_gap", pa.float64()), ("task_id", pa.string()), ("split", pa.string()),
                                      ("kind", pa.string())]))


def export_critic_data(cfg: Config, out_dir: str, write: bool = True) -> dict[str, ray.data.Dataset]:
    """Episode records, SFT examples and preference pairs, each split into train / held-out.

    Returns datasets named ``records``, ``sft_train``, ``sft_heldout``, ``pairs_train``,
    ``pairs_heldout`` (materialised). With ``write``, each is also written as Parquet under
    ``out_dir/<name>``; frames go to ``out_dir/frames``.
    """
    ct = cfg.critic_training
    weights = dict(cfg.agents.critic.reward_weights)
    sandbox = cfg.world.sandbox.model_copy(update={"write_mp4": False, "write_gif": False})
    tasks = _tasks(cfg)
    frames = os.path.join(out_dir, "frames")
    records = ray.data.from_items([{"task_json": t.model_dump_json()} for t in tasks]).map_batches(
        _RenderTasks, fn_constructor_kwargs=dict(sandbox=sandbox.model_dump(), critic_frames=cfg.agents.critic.num_frames, out_dir=frames, seed=ct.seed,
                                                 kinds=list(ct.plan_kinds), weights=weights),
        batch_size=4, concurrency=max(1, ct.num_workers))
    if ct.memory_uri:
        records = records.union(memory_records(ct.memory_uri, cfg.memory.table, weights))
    records = records.materialize()
    modality, frames_n = ct.modality, cfg.agents.critic.num_frames
    out: dict[str, ray.data.Dataset] = {"records": records}
    for split in ("train", "heldout"):
        # An expression filter keeps the schema on blocks it empties (a Python-function filter leaves
        # column-less empty blocks, on which the task_id shuffle below fails: blocks of one split only)
        part = records.filter(expr=f"split == '{split}'")
        out[f"sft_{split}"] = part.map(lambda r: cdata.sft_example(r, modality, frames_n)).materialize()
        if part.count() == 0:  # e.g. heldout_tasks_per_phase=0: an empty block has no task_id to group by
            import pyarrow as pa

            out[f"pairs_{split}"] = ray.data.from_arrow(_pairs_of_group(pa.table({}), 0.0, 0, 0)).materialize()
            continue
        pairs = part.groupby("task_id").map_groups(
            _pairs_of_group, batch_format="pyarrow",
            fn_kwargs=dict(margin=ct.pair_margin, max_pairs=ct.max_pairs_per_task, seed=ct.seed))
        if ct.anchor_pairs_per_task > 0:  # across the tasks of one phase
            pairs = pairs.union(part.groupby("phase").map_groups(
                _pairs_of_group, batch_format="pyarrow",
                fn_kwargs=dict(margin=ct.pair_margin, max_pairs=ct.anchor_pairs_per_task, seed=ct.seed,
                               anchors=True)))
        out[f"pairs_{split}"] = pairs.materialize()
    if write:
        for name, ds in out.items():
            ds.write_parquet(os.path.join(out_dir, name))
    return out


# --------------------------------------------------------------------------- training


def _hf_rows(shard: Any, stage: str) -> Any:
    from datasets import Dataset

    rows = list(shard.iter_rows())
    if stage == "sft":
        data = [{"prompt": json.loads(r["prompt_json"]), "completion": json.loads(r["completion_json"])} for r in rows]
    else:
        data = [{"chosen": json.loads(r["chosen_json"]), "rejected": json.loads(r["rejected_json"])} for r in rows]
    if not data:
        raise ValueError(f"critic {stage}: the training dataset is empty")
    return Dataset.from_list(data)


def precision_plan(precision: str, use_gpu: bool) -> tuple[str, bool]:
    """``(weights dtype, bf16 autocast)`` of a critic stage: ``auto`` trains bf16 weights on GPU and
    float32 on CPU; ``bf16`` autocasts over float32 weights; ``fp32`` is float32 everywhere."""
    if precision == "auto":
        return ("bfloat16", True) if use_gpu else ("float32", False)
    if precision == "bf16":
        return "float32", True
    if precision == "fp32":
        return "float32", False
    raise ValueError(f"critic_training.precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")


def _model_and_tokenizer(path: str, stage: str, dtype_name: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dtype = getattr(torch, dtype_name)
    if stage == "sft":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One worker: a TRL ``SFTTrainer`` (``stage="sft"``) or ``RewardTrainer`` (``"rm"``) on the
    ``train`` dataset (every worker sees all rows; the HF trainer shards them by rank). Rank 0
    saves the final model (LoRA merged) with its tokenizer and reports it as the checkpoint;
    the metrics are the last training log (``loss``, ``train_loss``, ``steps``...)."""
    from peft import LoraConfig
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    ct = CriticTrainingConfig.model_validate(config["critic_training"])
    stage = config["stage"]
    if stage not in ("sft", "rm"):
        raise ValueError(f"stage must be 'sft' or 'rm', got {stage!r}")
    rank = ray.train.get_context().get_world_rank()
    data = _hf_rows(ray.train.get_dataset_shard("train"), stage)
    dtype_name, bf16 = precision_plan(ct.precision, ct.use_gpu)
    model, tok = _model_and_tokenizer(config["model_path"], stage, dtype_name)
    callbacks = progress_callbacks(config.get("progress"))
    peft = LoraConfig(r=ct.lora_rank, lora_alpha=ct.lora_alpha, target_modules="all-linear",
                      task_type="CAUSAL_LM" if stage == "sft" else "SEQ_CLS") if ct.lora else None
    with tempfile.TemporaryDirectory(prefix=f"wa-critic-{stage}-") as work:
        common = dict(output_dir=work, per_device_train_batch_size=ct.batch_size, num_train_epochs=ct.epochs,
                      max_steps=ct.max_steps or -1, logging_steps=1, save_strategy="no", report_to="none",
                      seed=ct.seed, use_cpu=not ct.use_gpu, bf16=bf16, max_length=ct.max_length,
                      dataset_num_proc=None, disable_tqdm=True, gradient_checkpointing=False)
        if stage == "sft":
            args = SFTConfig(learning_rate=ct.sft_lr, completion_only_loss=True, **common)
            trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft,
                                 callbacks=callbacks)
        else:
            args = RewardConfig(learning_rate=ct.rm_lr, **common)
            trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                                    peft_config=peft, callbacks=callbacks)
        out = trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        metrics = {"stage": stage, "steps": int(trainer.state.global_step), "train_loss": float(out.training_loss),
                   "first_loss": float(logs[0]["loss"]) if logs else float("nan"),
                   "last_loss": float(logs[-1]["loss"]) if logs else float("nan"),
                   "examples": len(data)}
        if stage == "rm" and logs and "accuracy" in logs[-1]:
            metrics["last_accuracy"] = float(logs[-1]["accuracy"])
        if rank != 0:
            ray.train.report(metrics)
            return
        final = os.path.join(work, "final")
        trained = trainer.model
        if ct.lora:
            trained = trained.merge_and_unload()
        trained.save_pretrained(final, safe_serialization=True)
        tok.save_pretrained(final)
        Path(final, "critic_training.json").write_text(json.dumps({**metrics, "base_model": ct.base_model}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(final))


def launch_critic_trainer(cfg: Config, stage: str, train: ray.data.Dataset, storage_dir: str,
                          progress: Any = None):
    """The ``TorchTrainer`` of one critic stage (``"sft"`` or ``"rm"``) on ``train`` rows
    (``sft_example`` rows or preference-pair rows); ``.fit()`` returns the Result whose
    checkpoint is the trained model folder. Placement from ``cfg.resources.learner``.
    ``progress``: a :func:`~worldagent_ray.runtime.train_progress.progress_queue` that rank 0
    reports its steps to (see :func:`~worldagent_ray.runtime.train_progress.fit_with_progress`)."""
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ct = cfg.critic_training
    if stage not in ("sft", "rm"):
        raise ValueError(f"stage must be 'sft' or 'rm', got {stage!r}")
    if ct.modality != "text":
        raise NotImplementedError(
            "critic_training.modality='vlm': the export writes frame-based SFT examples, but training a VLM "
            "judge (processor + image inputs in TRL) is not implemented yet; use modality='text'")
    res = cfg.resources.learner
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"critic_training": ct.model_dump(mode="json"), "stage": stage,
                           "model_path": resolve_model(ct.base_model), "progress": progress},
        torch_config=TorchConfig(backend="nccl" if ct.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=ct.num_workers, use_gpu=ct.use_gpu,
            resources_per_worker={"CPU": res.num_cpus, **({"GPU": 1} if ct.use_gpu else {}), **res.custom}),
        datasets={"train": train},
        dataset_config=DataConfig(datasets_to_split=[]),
        run_config=RunConfig(name=f"{cfg.run.name}-critic-{stage}", storage_path=str(Path(storage_dir).resolve())),
    )
