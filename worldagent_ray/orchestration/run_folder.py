"""The run folder: config snapshot, task ledger, episode ledger (metrics.jsonl), curriculum
state, videos, memory and the report. Ledgers are append-only JSON lines; every line is
flushed and fsynced, so a crash loses at most the line being written."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from ..config import Config, dump_config, validate_tree
from ..schemas import CurriculumState, Task

import yaml


def _is_uri(p: str) -> bool:
    return "://" in p and not p.startswith("file://")


class RunFolder:
    """``local`` holds ledgers and the report; ``artifacts`` (local or a URI) holds videos and memory."""

    def __init__(self, local: str | os.PathLike[str], artifacts: str | None = None):
        self.local = Path(local)
        self.local.mkdir(parents=True, exist_ok=True)
        self.artifacts = artifacts or str(self.local.resolve())
        self.run_id = self.local.name

    @classmethod
    def create(cls, cfg: Config, name: str | None = None) -> "RunFolder":
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_name = name or f"{cfg.run.name}-{stamp}"
        if _is_uri(cfg.run.root):
            folder = cls(Path("runs") / run_name, artifacts=f"{cfg.run.root.rstrip('/')}/{run_name}")
        else:
            folder = cls(Path(cfg.run.root) / run_name)
        if (folder.local / "config.yaml").exists():
            raise FileExistsError(f"run folder {folder.local} already exists; use --resume {folder.local}")
        folder.save_config(cfg)
        return folder

    @classmethod
    def open(cls, local: str | os.PathLike[str]) -> "RunFolder":
        p = Path(local)
        if not (p / "config.yaml").exists():
            raise FileNotFoundError(f"{p} is not a run folder (no config.yaml); cannot resume it")
        meta = json.loads((p / "run.json").read_text()) if (p / "run.json").exists() else {}
        return cls(p, artifacts=meta.get("artifacts"))

    # ------------------------------------------------------------------ paths
    @property
    def videos(self) -> str:
        return f"{self.artifacts.rstrip('/')}/videos"

    @property
    def metrics_path(self) -> Path:
        return self.local / "metrics.jsonl"

    @property
    def tasks_path(self) -> Path:
        return self.local / "tasks.jsonl"

    # ------------------------------------------------------------------ config
    def save_config(self, cfg: Config) -> None:
        (self.local / "config.yaml").write_text(dump_config(cfg))
        (self.local / "run.json").write_text(json.dumps({"run_id": self.run_id, "artifacts": self.artifacts}))

    def load_config(self) -> Config:
        tree = yaml.safe_load((self.local / "config.yaml").read_text())
        return validate_tree(tree, source=str(self.local / "config.yaml"))

    # ------------------------------------------------------------------ ledgers
    def _append(self, path: Path, rows: list[dict[str, Any]]) -> None:
        with open(path, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def _read(path: Path) -> Iterator[dict[str, Any]]:
        if not path.exists():
            return
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a crash; its episode is redone on resume

    def record_tasks(self, round_index: int, tasks: list[Task], sources: list[str]) -> None:
        self._append(self.tasks_path, [
            {"round": round_index, "slot": i, "source": s, "task": t.model_dump(mode="json")}
            for i, (t, s) in enumerate(zip(tasks, sources))
        ])

    def tasks(self) -> list[tuple[int, int, Task]]:
        return [(r["round"], r["slot"], Task.model_validate(r["task"])) for r in self._read(self.tasks_path)]

    def record_episodes(self, rows: list[dict[str, Any]]) -> None:
        self._append(self.metrics_path, rows)

    def episode_rows(self) -> list[dict[str, Any]]:
        return [r for r in self._read(self.metrics_path) if r.get("kind") == "episode"]

    def record_event(self, **row: Any) -> None:
        self._append(self.metrics_path, [{"kind": "event", "t": time.time(), **row}])

    # ------------------------------------------------------------------ curriculum
    def save_curriculum(self, state: CurriculumState) -> None:
        tmp = self.local / "curriculum.json.tmp"
        tmp.write_text(state.model_dump_json())
        os.replace(tmp, self.local / "curriculum.json")

    def load_curriculum(self) -> CurriculumState | None:
        p = self.local / "curriculum.json"
        return CurriculumState.model_validate_json(p.read_text()) if p.exists() else None
