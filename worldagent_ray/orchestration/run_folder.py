"""The run folder: config snapshot, task ledger, episode ledger (``metrics.jsonl``), curriculum
state, videos, memory and the report.

Ledgers are append-only JSON lines, each row flushed and fsynced. A crash can tear only the
line being written; every ledger is **repaired when it is opened**: a torn last line (no
newline at the end) is moved to ``<ledger>.torn`` (kept, never silently dropped) and the file
is truncated back to its last complete row, so the next append never glues onto a fragment.
Readers skip (and count) any line that is not a complete JSON row.

When ``artifacts`` is a URI (``run.root`` on object storage, e.g. ``s3://...``) the local
folder is only the driver's working copy (on a cluster it lives in the job's ephemeral working
directory), so after every write the ledgers, the config snapshot and the curriculum state are
copied to ``<artifacts>/<same name>`` (:meth:`RunFolder.mirror`: whole-file PUTs, each atomic).
A failed copy is logged and counted (``mirror_errors``) and retried by the next write; the
local ledger stays the source of truth, so no row is lost.

``tasks.jsonl`` holds one :class:`~worldagent_ray.schemas.RoundRow` per curriculum round: a
round is written in one line before any of its tasks is dispatched, so it is recorded entirely
or not at all (a torn round is proposed again on resume).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from ..config import Config, dump_config, validate_tree
from ..schemas import CurriculumState, EpisodeRow, EventRow, LearnerStep, RoundRow, Task

log = logging.getLogger(__name__)

MIRRORED = ("config.yaml", "run.json", "tasks.jsonl", "metrics.jsonl", "curriculum.json")
"""The run-folder files copied to a URI ``artifacts`` after every write (:meth:`RunFolder.mirror`)."""

M = TypeVar("M", bound=BaseModel)


def is_uri(p: str) -> bool:
    """True for object-store style URIs (``s3://...``); plain paths and ``file://`` are local."""
    return "://" in p and not p.startswith("file://")


class Ledger:
    """One append-only JSON-lines file, repaired on open (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path
        self.skipped = 0  # unreadable lines met by the last read
        self._repaired = False

    def repair(self) -> int:
        """Move a torn last line to ``<path>.torn``; return its size in bytes (0: nothing torn)."""
        self._repaired = True
        if not self.path.exists():
            return 0
        with open(self.path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size == 0:
                return 0
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return 0
            # find the start of the torn line: after the last newline
            block = 1 << 16
            pos = size
            start = 0
            while pos > 0:
                step = min(block, pos)
                pos -= step
                f.seek(pos)
                chunk = f.read(step)
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    start = pos + nl + 1
                    break
            f.seek(start)
            torn = f.read()
            with open(self.path.with_name(self.path.name + ".torn"), "ab") as q:
                q.write(torn + b"\n")
                q.flush()
                os.fsync(q.fileno())
            f.truncate(start)
            f.flush()
            os.fsync(f.fileno())
            return len(torn)

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Append rows (one line each) and fsync. Raises ``OSError`` (e.g. a full disk)."""
        if not rows:
            return
        if not self._repaired:
            self.repair()
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every complete row, in order (lines that are not a JSON object are counted in ``skipped``)."""
        self.skipped = 0
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    self.skipped += 1  # torn tail not repaired yet (a reader never writes)
                    continue
                line = raw.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line.decode("utf-8"))
                except (UnicodeDecodeError, ValueError, RecursionError):
                    self.skipped += 1
                    continue
                if isinstance(row, dict):
                    yield row
                else:
                    self.skipped += 1


class RunFolder:
    """``local`` holds ledgers and the report; ``artifacts`` (local or a URI) holds videos and memory."""

    def __init__(self, local: str | os.PathLike[str], artifacts: str | None = None):
        self.local = Path(local)
        self.local.mkdir(parents=True, exist_ok=True)
        self.artifacts = artifacts or str(self.local.resolve())
        self.run_id = self.local.name
        self.tasks_ledger = Ledger(self.local / "tasks.jsonl")
        self.metrics_ledger = Ledger(self.local / "metrics.jsonl")
        self.mirror_errors = 0  # failed copies to a URI ``artifacts`` (see mirror())

    def mirror(self, names: tuple[str, ...] = MIRRORED) -> int:
        """Copy the named run-folder files that exist to ``<artifacts>/<name>`` when
        ``artifacts`` is a URI (a no-op for a local run root, where they already are). Returns
        how many were copied; a failure is logged, counted in ``mirror_errors`` and left to
        the next call (the local file is the source of truth)."""
        if not is_uri(self.artifacts):
            return 0
        from .. import storage

        copied = 0
        for name in names:
            p = self.local / name
            if not p.exists():
                continue
            try:
                storage.write_bytes(f"{self.artifacts.rstrip('/')}/{name}", p.read_bytes())
                copied += 1
            except OSError as e:  # StorageError is an OSError
                self.mirror_errors += 1
                log.warning("copy of %s to %s failed (kept locally, retried on the next write): %s",
                            name, self.artifacts, e)
        return copied

    @classmethod
    def create(cls, cfg: Config, name: str | None = None) -> "RunFolder":
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_name = name or f"{cfg.run.name}-{stamp}"
        if is_uri(cfg.run.root):
            folder = cls(Path("runs") / run_name, artifacts=f"{cfg.run.root.rstrip('/')}/{run_name}")
        else:
            folder = cls(Path(cfg.run.root.removeprefix("file://")) / run_name)
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
        folder = cls(p, artifacts=meta.get("artifacts"))
        folder.tasks_ledger.repair()
        folder.metrics_ledger.repair()
        return folder

    # ------------------------------------------------------------------ paths
    @property
    def videos(self) -> str:
        return f"{self.artifacts.rstrip('/')}/videos"

    @property
    def metrics_path(self) -> Path:
        return self.metrics_ledger.path

    @property
    def tasks_path(self) -> Path:
        return self.tasks_ledger.path

    # ------------------------------------------------------------------ config
    def save_config(self, cfg: Config) -> None:
        (self.local / "config.yaml").write_text(dump_config(cfg))
        (self.local / "run.json").write_text(json.dumps({"run_id": self.run_id, "artifacts": self.artifacts}))
        self.mirror(("config.yaml", "run.json"))

    def load_config(self) -> Config:
        tree = yaml.safe_load((self.local / "config.yaml").read_text())
        return validate_tree(tree, source=str(self.local / "config.yaml"))

    # ------------------------------------------------------------------ ledgers
    def record_round(self, round_index: int, tasks: list[Task], sources: list[str]) -> None:
        row = RoundRow(round=round_index, tasks=tasks, sources=sources, t=time.time())
        self.tasks_ledger.append([row.model_dump(mode="json")])
        self.mirror(("tasks.jsonl",))

    def rounds(self) -> list[RoundRow]:
        """Every completely recorded round, the last record of a round winning."""
        out: dict[int, RoundRow] = {}
        for r in self.tasks_ledger.rows():
            try:
                row = RoundRow.model_validate(r)
            except ValidationError:
                self.tasks_ledger.skipped += 1
                continue
            out[row.round] = row
        return [out[k] for k in sorted(out)]

    def record_episodes(self, rows: list[EpisodeRow]) -> None:
        self.metrics_ledger.append([r.model_dump(mode="json") for r in rows])
        self.mirror(("metrics.jsonl",))

    def episode_rows(self) -> list[EpisodeRow]:
        """Every episode row, in the order written (several rows per id when retried)."""
        return self._typed_rows("episode", EpisodeRow)

    def record_event(self, event: str, **fields: Any) -> None:
        row = EventRow(t=time.time(), event=event, **fields)
        self.metrics_ledger.append([row.model_dump(mode="json")])
        self.mirror(("metrics.jsonl",))

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.metrics_ledger.rows()
                if r.get("kind") == "event" and (event is None or r.get("event") == event)]

    def record_learner_steps(self, steps: list[LearnerStep]) -> None:
        """The learner's per-step records (``kind: "learner"`` rows; the report's learning curve)."""
        if steps:
            self.metrics_ledger.append([s.model_dump(mode="json", exclude_none=True) for s in steps])
            self.mirror(("metrics.jsonl",))

    def learner_steps(self) -> list[LearnerStep]:
        """Every learner step recorded, in order (a resumed learner may repeat a step)."""
        return self._typed_rows("learner", LearnerStep)

    def _typed_rows(self, kind: str, model: type[M]) -> list[M]:
        """The ledger rows of ``kind`` validated as ``model``; a row that does not validate is
        counted in ``metrics_ledger.skipped`` and left out."""
        out = []
        for r in self.metrics_ledger.rows():
            if r.get("kind") != kind:
                continue
            try:
                out.append(model.model_validate(r))
            except ValidationError:
                self.metrics_ledger.skipped += 1
        return out

    # ------------------------------------------------------------------ curriculum
    def save_curriculum(self, state: CurriculumState) -> None:
        tmp = self.local / "curriculum.json.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(state.model_dump_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.local / "curriculum.json")
        self.mirror(("curriculum.json",))

    def load_curriculum(self) -> CurriculumState | None:
        p = self.local / "curriculum.json"
        return CurriculumState.model_validate_json(p.read_text()) if p.exists() else None
