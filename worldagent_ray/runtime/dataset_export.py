"""The video-action dataset export on Ray Data (the shell around ``datasets/video_action.py``).

Reads world memory (the LanceDB episodes tables of one or more run folders, or memory URIs)
with ``ray.data.read_lance``, pushing the selection (phases, success, reward, finished
episodes) down to Lance, keeps the newest write of each episode, copies each episode's mp4 into
the dataset's video shards, and writes the rows as sharded Parquet, all on any ``run.root``
filesystem (a local path or an fsspec URI). Re-exporting into the same folder replaces the rows
(the videos are rewritten in place: same episode, same path).

    manifest = export_video_action(cfg, runs=["runs/evolve-20261122-101500"])
    ds = VideoActionDataset(manifest["out"])
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Sequence

import pyarrow as pa
import ray

from ..config import Config
from ..datasets.video_action import (
    FORMAT_VERSION,
    MEMORY_COLUMNS,
    ROW_SCHEMA,
    export_row,
    exportable,
    memory_table_uri,
    newest_writes,
    selection_where,
    video_relpath,
)
from ..schemas import Episode

log = logging.getLogger(__name__)


def default_out(cfg: Config) -> str:
    """``export.out``, else ``<run.root>/datasets/video_action``."""
    return cfg.export.out or f"{cfg.run.root.rstrip('/')}/datasets/video_action"


def _pyarrow_fs(uri: str) -> tuple[Any, str]:
    """A pyarrow filesystem and path for a local path or any fsspec URI."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        return None, os.path.abspath(path)
    return PyFileSystem(FSSpecHandler(fs)), path


def _copy(src: str, dst: str) -> None:
    import fsspec

    with fsspec.open(src, "rb") as f:
        data = f.read()
    fs, path = fsspec.core.url_to_fs(dst)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


class _ToRows:
    """Ray Data ``map_batches`` callable: memory rows -> dataset rows (copying the mp4s)."""

    def __init__(self, out: str, shards: int, winners: set[tuple[str, str]]):
        self.out = out.rstrip("/")
        self.shards = shards
        self.winners = winners

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for rec in batch.select(MEMORY_COLUMNS).to_pylist():
            if (rec["id"], rec["write_id"]) not in self.winners:
                continue  # a stale copy of an episode written again later
            ep = Episode.model_validate_json(rec["episode_json"])
            if exportable(ep) is not None:
                continue
            rel = video_relpath(ep.id, self.shards)
            _copy(ep.rollout.video_uri, f"{self.out}/{rel}")  # type: ignore[union-attr]
            rows.append(export_row(ep, rel))
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def export_video_action(cfg: Config, runs: Sequence[str] = (), memory_uris: Sequence[str] = (),
                        out: str | None = None) -> dict[str, Any]:
    """Export the video-action pairs selected by ``cfg.export`` and return the manifest.

    Args:
        cfg (`Config`): ``export`` (phases, success, min_reward, rows_per_file, video_shards, out)
            and ``run.root`` (the default output's root).
        runs (`Sequence[str]`): run folders; each one's memory table is read.
        memory_uris (`Sequence[str]`): Lance datasets to read as well (``<memory uri>/<table>.lance``).
        out (`str`, *optional*): output folder or URI (default :func:`default_out`).

    Raises:
        ValueError: no source given, or a bad filter (named).
        FileNotFoundError: a run folder or a memory table that does not exist.
    """
    import fsspec

    e = cfg.export
    sources = [memory_table_uri(r) for r in runs] + list(memory_uris)
    if not sources:
        raise ValueError("give at least one run folder or memory table to export from")
    for s in sources:
        fs, path = fsspec.core.url_to_fs(s)
        if not fs.exists(path):
            raise FileNotFoundError(f"memory table {s!r} does not exist (nothing was written to that memory?)")
    where = selection_where(e.phases, e.success, e.min_reward)
    out = (out or default_out(cfg)).rstrip("/")
    t0 = time.time()
    ds = ray.data.read_lance(sources if len(sources) > 1 else sources[0],
                             columns=MEMORY_COLUMNS + ["phase", "success", "reward", "status"], filter=where)
    keys = ds.select_columns(["id", "updated_at", "write_id"]).to_arrow_refs()
    key_table = pa.concat_tables(ray.get(keys)) if keys else pa.table({"id": [], "updated_at": [], "write_id": []})
    winners = newest_writes(key_table["id"].to_pylist(), key_table["updated_at"].to_pylist(),
                            key_table["write_id"].to_pylist())
    rows = ds.map_batches(_ToRows(out, e.video_shards, winners), batch_format="pyarrow", batch_size=64,
                          zero_copy_batch=True).materialize()
    n = rows.count()
    fs, path = _pyarrow_fs(f"{out}/rows")
    if n:
        rows.write_parquet(path, filesystem=fs, max_rows_per_file=e.rows_per_file,
                           mode=ray.data.SaveMode.OVERWRITE)
    else:  # nothing selected: no rows of an earlier export may linger under this manifest
        ffs, fpath = fsspec.core.url_to_fs(f"{out}/rows")
        if ffs.exists(fpath):
            ffs.rm(fpath, recursive=True)
    manifest = {
        "format": "worldagent-video-action", "version": FORMAT_VERSION, "out": out, "rows": n,
        "episodes_selected": len(winners), "skipped": len(winners) - n, "sources": sources,
        "filters": {"phases": list(e.phases), "success": e.success, "min_reward": e.min_reward, "where": where},
        "rows_per_file": e.rows_per_file, "video_shards": e.video_shards, "elapsed_s": round(time.time() - t0, 3),
        "created_at": time.time(),
    }
    with fsspec.open(f"{out}/manifest.json", "w") as f:
        f.write(json.dumps(manifest, indent=2))
    log.info("exported %d video-action pairs to %s", n, out)
    return manifest
