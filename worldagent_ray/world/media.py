"""Writing frames and videos to a local folder or a filesystem URI (fsspec)."""

from __future__ import annotations

import io
import os
from typing import Sequence

import fsspec
from fsspec.implementations.local import LocalFileSystem
import imageio.v3 as iio
import numpy as np


def join(base: str, *parts: str) -> str:
    """Join path parts for local paths and URIs alike."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def makedirs(uri: str) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(path, exist_ok=True)


def write_bytes(uri: str, data: bytes) -> str:
    """Write atomically on local disk (tmp + rename); plain put on object stores."""
    fs, path = fsspec.core.url_to_fs(uri)
    parent = os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)
    return uri


def read_bytes(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as f:
        return f.read()


def _as_uint8(frames: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"frames must have shape (T, H, W, C) with C in 1/3/4, got {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.asarray(arr, dtype=np.float32), 0.0, 1.0 if arr.max() <= 1.0 else 255.0)
        if arr.max() <= 1.0:
            arr = arr * 255.0
        arr = arr.round().astype(np.uint8)
    return arr


def encode_mp4(frames: Sequence[np.ndarray] | np.ndarray, fps: int = 8) -> bytes:
    arr = _as_uint8(frames)
    return iio.imwrite("<bytes>", arr, extension=".mp4", fps=fps, codec="libx264", macro_block_size=16)


def encode_gif(frames: Sequence[np.ndarray] | np.ndarray, fps: int = 8) -> bytes:
    arr = _as_uint8(frames)
    return iio.imwrite("<bytes>", arr, extension=".gif", duration=int(1000 / fps), loop=0)


def encode_png(frame: np.ndarray) -> bytes:
    return iio.imwrite("<bytes>", _as_uint8(frame[None])[0], extension=".png")


def decode_image(data: bytes) -> np.ndarray:
    return iio.imread(io.BytesIO(data))


def sample_indices(num_frames: int, k: int) -> list[int]:
    """k frame indices spread evenly over a video, first and last included."""
    if num_frames <= 0:
        return []
    if k >= num_frames:
        return list(range(num_frames))
    if k == 1:
        return [num_frames - 1]
    return [round(i * (num_frames - 1) / (k - 1)) for i in range(k)]


def write_video_artifacts(
    frames: Sequence[np.ndarray] | np.ndarray,
    out_dir: str,
    stem: str,
    fps: int = 8,
    mp4: bool = True,
    gif: bool = True,
    sample_frames: int = 4,
) -> dict[str, object]:
    """Write mp4, GIF and sampled PNG frames; return their URIs."""
    arr = _as_uint8(frames)
    out: dict[str, object] = {"video_uri": None, "gif_uri": None, "frame_uris": []}
    if mp4:
        out["video_uri"] = write_bytes(join(out_dir, f"{stem}.mp4"), encode_mp4(arr, fps))
    if gif:
        out["gif_uri"] = write_bytes(join(out_dir, f"{stem}.gif"), encode_gif(arr, fps))
    uris = []
    for i in sample_indices(len(arr), sample_frames):
        uris.append(write_bytes(join(out_dir, f"{stem}.f{i:04d}.png"), encode_png(arr[i])))
    out["frame_uris"] = uris
    return out
