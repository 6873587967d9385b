"""Video-action pairs: the row format, the selection, and a PyTorch dataset that reads them back.

Pure core (no Ray): ``runtime/dataset_export.py`` runs the export with Ray Data and calls these.

A dataset folder (a local path or any fsspec URI)::

    <out>/manifest.json                    what was exported, from where, with which filters
    <out>/rows/*.parquet                   one row per episode (shards of ExportConfig.rows_per_file)
    <out>/videos/<shard:03d>/<episode>.mp4 the rollout's video, spread over ExportConfig.video_shards

A row (:data:`ROW_SCHEMA`): the goal, the plan, each step's action with its frame range
``[start, stop)`` in the video (and the world's verdict on the step when it knows one), the
critic's five scores, success, reward and the policy version that wrote the plan. Frame ranges
are null when the world rendered the plan as one clip (the whole video then shows the plan).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
from torch.utils.data import Dataset

from ..schemas import SCORE_DIMENSIONS, Episode

FORMAT_VERSION = 1
MEMORY_COLUMNS = ["id", "updated_at", "write_id", "episode_json"]
"""Columns of the memory table the export reads (plus the filter columns, pushed down)."""

_STEP = pa.struct([
    pa.field("step", pa.int32()),
    pa.field("action", pa.string()),
    pa.field("start", pa.int32()),
    pa.field("stop", pa.int32()),
    pa.field("status", pa.string()),
])
ROW_SCHEMA = pa.schema([
    pa.field("episode_id", pa.string(), nullable=False),
    pa.field("run_id", pa.string()),
    pa.field("task_id", pa.string()),
    pa.field("goal", pa.string()),
    pa.field("phase", pa.int32()),
    pa.field("split", pa.string()),
    pa.field("plan", pa.list_(pa.string())),
    pa.field("steps", pa.list_(_STEP)),
    pa.field("scores", pa.struct([pa.field(k, pa.float64()) for k in SCORE_DIMENSIONS])),
    pa.field("reward", pa.float64()),
    pa.field("success", pa.bool_()),
    pa.field("policy_version", pa.int64()),
    pa.field("caption", pa.string()),
    pa.field("world", pa.string()),
    pa.field("num_frames", pa.int32()),
    pa.field("video", pa.string()),
    pa.field("source_video", pa.string()),
])
"""One exported episode; ``video`` is relative to the dataset folder."""


class ExportSelectionError(ValueError):
    """A bad export filter; the message names it."""


def selection_where(phases: Sequence[int], success: bool | None, min_reward: float) -> str:
    """SQL pushed down to the memory table: finished (``status = 'ok'``) episodes of ``phases``,
    with ``success`` when set and ``reward >= min_reward``. Values are validated, never pasted."""
    from ..memory.filters import build_where

    bad = [p for p in phases if isinstance(p, bool) or p not in (1, 2, 3)]
    if bad or not phases:
        raise ExportSelectionError(f"phases must be a non-empty list of 1, 2, 3, got {list(phases)}")
    if isinstance(min_reward, bool) or not 0.0 <= float(min_reward) <= 1.0:
        raise ExportSelectionError(f"min_reward must be in [0, 1], got {min_reward!r}")
    where = build_where(success=success, min_reward=float(min_reward), status="ok")
    return f"{where} AND (phase IN ({', '.join(str(int(p)) for p in sorted(set(phases)))}))"


def video_relpath(episode_id: str, shards: int) -> str:
    """Where an episode's mp4 goes inside the dataset (a stable shard of its id)."""
    shard = int(hashlib.sha256(episode_id.encode()).hexdigest()[:8], 16) % shards
    return f"videos/{shard:03d}/{episode_id}.mp4"


def newest_writes(ids: Iterable[str], updated_at: Iterable[float], write_ids: Iterable[str]) -> set[tuple[str, str]]:
    """``(id, write_id)`` of the newest write of each episode (memory may hold stale copies on an
    object store until it is optimised; the newest one wins, as memory's own reads do)."""
    best: dict[str, tuple[float, str]] = {}
    for i, t, w in zip(ids, updated_at, write_ids):
        if i not in best or (t, w) > best[i]:
            best[i] = (t, w)
    return {(i, w) for i, (_, w) in best.items()}


def export_row(ep: Episode, video: str) -> dict[str, Any]:
    """The dataset row of one episode whose video is copied to ``video`` (relative path)."""
    r = ep.rollout
    v = ep.verdict
    gt_steps = {s.index: s for s in (r.ground_truth.steps if r and r.ground_truth else [])}
    spans = {s.step: s for s in (r.step_frames if r else [])}
    steps = []
    for s in (ep.plan.steps if ep.plan else []):
        span = spans.get(s.step)
        outcome = gt_steps.get(s.step - 1)
        steps.append({"step": s.step, "action": s.action,
                      "start": span.start if span else None, "stop": span.stop if span else None,
                      "status": outcome.status.value if outcome else None})
    return {
        "episode_id": ep.id, "run_id": ep.run_id, "task_id": ep.task.id, "goal": ep.task.goal,
        "phase": ep.task.phase, "split": ep.task.split, "plan": ep.plan.actions if ep.plan else [],
        "steps": steps, "scores": v.scores.as_dict() if v else None, "reward": float(ep.reward),
        "success": ep.success, "policy_version": ep.policy_version, "caption": v.state_caption if v else "",
        "world": r.world if r else "", "num_frames": r.num_frames if r else 0, "video": video,
        "source_video": r.video_uri if r else None,
    }


def exportable(ep: Episode) -> str | None:
    """Why an episode cannot become a video-action pair (``None`` if it can)."""
    if ep.status != "ok":
        return f"status {ep.status}"
    if ep.plan is None or not ep.plan.steps:
        return "no plan"
    if ep.rollout is None or ep.rollout.error or not ep.rollout.video_uri:
        return "no video"
    return None


def memory_table_uri(run_dir: str) -> str:
    """The Lance dataset of a run folder's memory: ``<memory uri>/<table>.lance``, from the run's
    ``config.yaml`` (``memory.uri``/``memory.table``) and ``run.json`` (its artefact root)."""
    import yaml

    from ..config import validate_tree

    local = Path(run_dir)
    if not (local / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
    cfg = validate_tree(yaml.safe_load((local / "config.yaml").read_text()), source=str(local / "config.yaml"))
    meta = json.loads((local / "run.json").read_text()) if (local / "run.json").exists() else {}
    artifacts = meta.get("artifacts") or str(local.resolve())
    uri = cfg.memory.uri or f"{artifacts.rstrip('/')}/memory"
    return f"{uri.rstrip('/')}/{cfg.memory.table}.lance"


# --------------------------------------------------------------------------- reading back


def _fs(root: str):
    import fsspec

    return fsspec.core.url_to_fs(root)


class VideoActionDataset(Dataset):
    """An exported dataset as a ``torch.utils.data.Dataset`` (map-style).

    Args:
        root (`str`): the dataset folder (local path or fsspec URI).
        mode (`str`, *optional*, defaults to `"episode"`): ``"episode"`` yields one item per
            episode; ``"step"`` one item per plan step that has a frame range (a clip and the
            action text that drove it).

    Items (dicts): ``frames`` (uint8 tensor ``T x H x W x 3``), ``episode_id``, ``goal``,
    ``reward``, ``success``, ``policy_version``; per episode also ``actions`` (list of str) and
    ``frame_ranges`` (int64 tensor ``S x 2``, ``-1`` where unknown); per step ``action``, ``step``.
    """

    def __init__(self, root: str, mode: str = "episode"):
        import pyarrow.dataset as pads

        if mode not in ("episode", "step"):
            raise ValueError(f"mode must be 'episode' or 'step', got {mode!r}")
        self.root = root.rstrip("/")
        self.mode = mode
        fs, path = _fs(self.root)
        rows_dir = f"{path.rstrip('/')}/rows"
        if not fs.exists(rows_dir):
            raise FileNotFoundError(f"{self.root} has no rows/ folder: not an exported video-action dataset")
        table = pads.dataset(rows_dir, format="parquet", filesystem=fs).to_table()
        self.rows = sorted(table.to_pylist(), key=lambda r: r["episode_id"])
        self.index: list[tuple[int, int]] = []
        for i, r in enumerate(self.rows):
            if mode == "episode":
                self.index.append((i, -1))
            else:
                self.index += [(i, j) for j, s in enumerate(r["steps"]) if s["start"] is not None]

    def __len__(self) -> int:
        return len(self.index)

    def frames(self, i: int) -> Any:
        """All frames of row ``i`` as a uint8 tensor ``T x H x W x 3``."""
        import imageio.v3 as iio
        import numpy as np
        import torch

        fs, path = _fs(self.root)
        with fs.open(f"{path.rstrip('/')}/{self.rows[i]['video']}", "rb") as f:
            arr = np.asarray(iio.imread(f.read(), extension=".mp4"))
        return torch.from_numpy(np.ascontiguousarray(arr[..., :3]))

    def __getitem__(self, k: int) -> dict[str, Any]:
        import torch

        if not -len(self) <= k < len(self):
            raise IndexError(f"index {k} out of range for {len(self)} items")
        i, j = self.index[k]
        r = self.rows[i]
        frames = self.frames(i)
        item = {"episode_id": r["episode_id"], "goal": r["goal"], "reward": r["reward"], "success": r["success"],
                "policy_version": r["policy_version"]}
        if j < 0:
            ranges = [[s["start"] if s["start"] is not None else -1, s["stop"] if s["stop"] is not None else -1]
                      for s in r["steps"]]
            item.update(frames=frames, actions=[s["action"] for s in r["steps"]],
                        frame_ranges=torch.tensor(ranges, dtype=torch.int64).reshape(-1, 2))
        else:
            s = r["steps"][j]
            item.update(frames=frames[s["start"]:s["stop"]], action=s["action"], step=s["step"])
        return item
