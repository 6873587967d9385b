"""Videos and frames as bytes, written and read through :mod:`worldagent_ray.storage`.

A world writes each rollout as an mp4, a GIF and a few PNG frames for the critic under its
``out_dir``, a local folder or a URI under ``run.root`` (``s3://bucket/run/videos/<task>``).
The Rollout holds the returned locations, so a critic on another node reads the same frames
with :func:`worldagent_ray.storage.read_bytes`; a plain ``out_dir`` is made absolute first
(a Ray worker's working folder is not the driver's). Decoding is capped
(:func:`decode_image` checks the pixel count from the header before decoding).
"""

from __future__ import annotations

import io
from typing import Sequence

import imageio.v3 as iio
import numpy as np

from ..storage import join, makedirs, normalize, read_bytes, write_bytes
from .reference import MAX_FRAME_PIXELS, decode_image_capped

__all__ = [
    "critic_frames_or_default", "decode_image", "decode_video", "encode_gif", "encode_mp4", "encode_png", "join",
    "makedirs", "normalize", "read_bytes", "read_video", "sample_indices", "write_bytes", "write_video_artifacts",
]  # join / makedirs / normalize / read_bytes / write_bytes: the storage layer's, re-exported


def _as_uint8(frames: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"frames must have shape (T, H, W, C) with C in 1/3/4, got {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.nan_to_num(np.asarray(arr, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        unit = arr.size > 0 and float(arr.max()) <= 1.0  # [0, 1] floats (diffusers' np output)
        arr = np.clip(arr * 255.0 if unit else arr, 0.0, 255.0).round().astype(np.uint8)
    return arr


def encode_mp4(frames: Sequence[np.ndarray] | np.ndarray, fps: int = 8) -> bytes:
    arr = _as_uint8(frames)
    return iio.imwrite("<bytes>", arr, extension=".mp4", fps=fps, codec="libx264", macro_block_size=16)


def encode_gif(frames: Sequence[np.ndarray] | np.ndarray, fps: int = 8) -> bytes:
    arr = _as_uint8(frames)
    return iio.imwrite("<bytes>", arr, extension=".gif", duration=int(1000 / fps), loop=0)


def encode_png(frame: np.ndarray) -> bytes:
    return iio.imwrite("<bytes>", _as_uint8(frame[None])[0], extension=".png")


def decode_image(data: bytes, max_pixels: int = MAX_FRAME_PIXELS) -> np.ndarray:
    """An RGB ``(H, W, 3)`` uint8 array from image bytes; ``ImageLoadError`` for a corrupt
    file, a format outside the allowed ones, or more than ``max_pixels`` pixels (checked
    from the header before decoding)."""
    return np.asarray(decode_image_capped(data, max_pixels, "image bytes"))


def decode_video(data: bytes, extension: str) -> np.ndarray:
    """All frames ``(T, H, W, C)`` of mp4 or GIF bytes (``extension`` ``".mp4"``/``".gif"``)."""
    return np.asarray(iio.imread(io.BytesIO(data), extension=extension))


def read_video(uri: str) -> np.ndarray:
    """Read an mp4 or GIF through the storage layer and decode all its frames."""
    ext = "." + uri.rsplit(".", 1)[-1].lower()
    if ext not in (".mp4", ".gif"):
        raise ValueError(f"{uri}: expected an .mp4 or .gif video")
    return decode_video(read_bytes(uri), ext)


def sample_indices(num_frames: int, k: int) -> list[int]:
    """k frame indices spread evenly over a video, first and last included."""
    if num_frames <= 0 or k <= 0:
        return []
    if k >= num_frames:
        return list(range(num_frames))
    if k == 1:
        return [num_frames - 1]
    return [round(i * (num_frames - 1) / (k - 1)) for i in range(k)]


def critic_frames_or_default(n: int | None) -> int:
    """``n`` (the frames a world writes per rollout for the critic: ``agents.critic.num_frames``),
    or, when a world is built without it, that config field's default."""
    if n is None:
        from ..config import CriticConfig

        return int(CriticConfig.model_fields["num_frames"].default)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"critic_frames must be an integer >= 1 (agents.critic.num_frames), got {n!r}")
    return n


def write_video_artifacts(
    frames: Sequence[np.ndarray] | np.ndarray,
    out_dir: str,
    stem: str,
    fps: int = 8,
    mp4: bool = True,
    gif: bool = True,
    sample_frames: int = 4,
) -> dict[str, object]:
    """Write ``<stem>.mp4``, ``<stem>.gif`` and ``sample_frames`` PNG frames (evenly spread,
    first and last included; every frame if the video is shorter) under ``out_dir``.

    Returns ``{"video_uri", "gif_uri", "frame_uris"}``: locations in the style of
    ``out_dir`` (a URI stays a URI, a plain path becomes absolute), readable from any node
    that can reach the storage. Raises :class:`~worldagent_ray.storage.StorageError`
    naming the location when a write fails.
    """
    arr = _as_uint8(frames)
    out_dir = normalize(out_dir)
    out: dict[str, object] = {"video_uri": None, "gif_uri": None, "frame_uris": []}
    if mp4:
        out["video_uri"] = write_bytes(join(out_dir, f"{stem}.mp4"), encode_mp4(arr, fps))
    if gif:
        out["gif_uri"] = write_bytes(join(out_dir, f"{stem}.gif"), encode_gif(arr, fps))
    out["frame_uris"] = [
        write_bytes(join(out_dir, f"{stem}.f{i:04d}.png"), encode_png(arr[i]))
        for i in sample_indices(len(arr), sample_frames)
    ]
    return out
