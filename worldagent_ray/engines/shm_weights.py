"""Hand a state dict to another process on the same machine through one shared-memory file.

The vLLM engine runs its model in an engine-core process; a weight update must reach it.
Pickling tensors into an RPC costs seconds (and vLLM's RPC drops tensors), a safetensors file
costs a serialisation, a write and a read. Instead the replica copies every tensor once into
a reusable file in ``/dev/shm`` (casting to the engine's dtype on the way), and sends only a
small manifest (name, dtype, shape, offset) through the RPC; the worker maps the same file
and hands ``reload_weights`` views into it, with no copy of its own.

The file is reused across updates (its pages stay resident, so later copies fault nothing
in), grown when a payload is larger, and removed by :meth:`SharedWeights.close` (also at
interpreter exit). :func:`remove_orphans` deletes files left behind by dead processes.
"""

from __future__ import annotations

import atexit
import os
import re
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Iterator, Mapping

import torch

__all__ = ["SHM_PREFIX", "SharedWeights", "read_shared_weights", "remove_orphans", "shm_dir"]

SHM_PREFIX = "worldagent-weights-"
_ALIGN = 64
Entry = tuple[str, str, list[int], int, int]  # name, dtype, shape, offset, nbytes (plain types: RPC-safe)


def shm_dir() -> str:
    """``/dev/shm`` when it is writable, else the temp folder."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class SharedWeights:
    """A reusable shared-memory file holding one state dict at a time.

    Not thread-safe: the caller serialises :meth:`write` calls and does not write while a
    reader still maps the previous payload (the vLLM engine writes, then waits for the
    worker's reload to return, under its own load lock).

    Args:
        directory: where the file lives (default :func:`shm_dir`).
    """

    def __init__(self, directory: str | None = None):
        self.path = os.path.join(directory or shm_dir(), f"{SHM_PREFIX}{os.getpid()}-{uuid.uuid4().hex}.bin")
        self._buf: torch.Tensor | None = None
        self._capacity = 0
        self._lock = threading.Lock()
        atexit.register(self.close)

    @property
    def capacity(self) -> int:
        """Bytes the file holds now."""
        return self._capacity

    def write(self, named_tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
              ) -> tuple[list[Entry], int]:
        """Copy every tensor into the file (floating tensors cast to ``dtype`` when given).

        Returns:
            The manifest (one entry per tensor, in the mapping's order) and the bytes used.
        """
        with self._lock:
            plan: list[tuple[str, torch.Tensor, torch.dtype, int, int]] = []
            offset = 0
            for name, t in named_tensors.items():
                target = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
                nbytes = t.numel() * torch.empty((), dtype=target).element_size()
                plan.append((name, t, target, offset, nbytes))
                offset += -(-nbytes // _ALIGN) * _ALIGN
            size = max(offset, _ALIGN)
            if size > self._capacity:
                self._buf = None
                # from_file(shared=True) creates the file and sizes it (MAP_SHARED mapping)
                self._buf = torch.from_file(self.path, shared=True, size=size, dtype=torch.uint8)
                self._capacity = size
            assert self._buf is not None
            entries: list[Entry] = []
            for name, t, target, off, nbytes in plan:
                view = self._buf[off : off + nbytes].view(target).view(t.shape)
                view.copy_(t.detach())
                entries.append((name, _dtype_name(target), [int(x) for x in t.shape], off, nbytes))
            return entries, size

    def close(self) -> None:
        """Unmap and delete the file (safe to call twice)."""
        with self._lock:
            self._buf = None
            self._capacity = 0
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def read_shared_weights(path: str, entries: list[Entry], size: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` views into a file written by :meth:`SharedWeights.write`.

    The file is mapped copy-on-write (the writer's pages are read in place, never copied
    here). The views are valid while the caller holds them; copy what must outlive the file.
    """
    buf = torch.from_file(path, shared=False, size=int(size), dtype=torch.uint8)
    for name, dtype, shape, offset, nbytes in entries:
        yield name, buf[int(offset) : int(offset) + int(nbytes)].view(getattr(torch, dtype)).view(list(shape))


_NAME = re.compile(rf"^{re.escape(SHM_PREFIX)}(\d+)-[0-9a-f]+\.(bin|safetensors)$")


def remove_orphans(directory: str | None = None) -> list[str]:
    """Delete weight files whose writing process no longer exists; returns what was removed."""
    removed = []
    for f in Path(directory or shm_dir()).glob(f"{SHM_PREFIX}*"):
        m = _NAME.match(f.name)
        if not m:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user
        try:
            f.unlink()
            removed.append(str(f))
        except FileNotFoundError:
            pass
    return removed
