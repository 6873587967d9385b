"""Reference images: loading them safely, and giving every task one (its starting scene).

Loading. Every image that enters the system from a location (a task's reference image, a
frame the critic judges, an image in a VLM prompt) is read through
:mod:`worldagent_ray.storage` (a local path or a URI; remote reads have a deadline and
retries) and decoded by :func:`decode_image_capped`: the byte size is bounded before the
download, the pixel count is read from the header and checked BEFORE the pixels are
decoded (a 300-byte PNG that claims 100 Mpx is refused without allocating them), and the
format must be one of :data:`ALLOWED_FORMATS`. Failures raise :class:`ImageLoadError`
(:class:`ReferenceImageError` for reference images) naming the location and the problem.

Reference scenes. :class:`ReferenceScenes` renders a task's starting scene with the sandbox
kitchen, writes it as a PNG under the run root and returns the task with
``reference_image`` set, so the Action prompt (VLM), the world (image-to-video) and the
judge all see the same picture of where the task starts.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING, Any

from PIL import Image

from .. import storage

if TYPE_CHECKING:
    from ..config import WorldConfig
    from ..schemas import Task

ALLOWED_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG", "WEBP", "BMP", "GIF"})
"""Image formats accepted (PIL format names)."""

MAX_REFERENCE_BYTES = 64 * 1024 * 1024
"""Files larger than this are refused before they are downloaded."""

MAX_FRAME_PIXELS = 4096 * 4096
"""Pixel cap of a frame read for the critic (frames come from the world, at video size)."""

REMOTE_TIMEOUT_S = 20.0
"""Deadline of one attempt to read an image from a remote URI (see :mod:`worldagent_ray.storage`)."""

REMOTE_RETRIES = 2
"""Retries of a remote image read after a transient error."""


class ImageLoadError(ValueError):
    """An image that cannot be used; the message names the location and the problem."""


class ReferenceImageError(ImageLoadError):
    """A task's reference image that cannot be used."""


def decode_image_capped(data: bytes, max_pixels: int, name: str,
                        error: type[ImageLoadError] = ImageLoadError) -> Image.Image:
    """Decode image bytes to RGB, refusing more than ``max_pixels`` before decoding.

    Args:
        data: the encoded image.
        max_pixels: largest accepted ``width * height``, read from the header.
        name: the location, for messages.
        error: the exception class raised.

    Raises:
        ImageLoadError (or ``error``): empty, not an image, a format outside
            :data:`ALLOWED_FORMATS`, too many pixels, or corrupt/truncated.
    """
    if max_pixels < 1:
        raise error(f"max_pixels must be >= 1, got {max_pixels}")
    if not data:
        raise error(f"image {name!r} is an empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise error(f"image {name!r} is too large (decompression bomb guard)") from None
        except Exception as e:
            raise error(
                f"image {name!r} is not a readable image ({type(e).__name__}); "
                f"accepted formats: {sorted(ALLOWED_FORMATS)}"
            ) from None
        fmt = img.format or "unknown"
        if fmt not in ALLOWED_FORMATS:
            raise error(f"image {name!r} has format {fmt}; allowed: {sorted(ALLOWED_FORMATS)}")
        w, h = img.size
        if w * h > max_pixels:
            raise error(f"image {name!r} is {w}x{h} = {w * h} pixels, more than max_pixels={max_pixels}")
        try:
            img.load()
            return img.convert("RGB")
        except Exception as e:
            raise error(f"image {name!r} is corrupt or truncated ({type(e).__name__}: {e})") from None


def open_image(source: Any, max_pixels: int, *, timeout_s: float | None = None,
               retries: int | None = None, max_bytes: int = MAX_REFERENCE_BYTES,
               error: type[ImageLoadError] = ImageLoadError) -> Image.Image:
    """An RGB image from a path or URI (read through the storage layer), bytes, or a PIL image.

    Every path is capped: ``max_bytes`` before download, ``max_pixels`` before decode,
    ``timeout_s`` per attempt of a remote read (``retries`` more on transient errors;
    defaults :data:`REMOTE_TIMEOUT_S` and :data:`REMOTE_RETRIES`). An engine that decodes
    prompt images can call this for each image part.

    Raises:
        ImageLoadError (or ``error``): naming the location and the problem.
    """
    if isinstance(source, Image.Image):
        w, h = source.size
        if w * h > max_pixels:
            raise error(f"image of {w}x{h} = {w * h} pixels, more than max_pixels={max_pixels}")
        return source.convert("RGB")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image_capped(bytes(source), max_pixels, "<bytes>", error)
    if not isinstance(source, str) or not source.strip():
        raise error(f"an image must be a non-empty path or URI, bytes or a PIL image, got {source!r:.80}")
    try:
        data = storage.read_bytes(source, timeout_s=REMOTE_TIMEOUT_S if timeout_s is None else timeout_s,
                                  retries=REMOTE_RETRIES if retries is None else retries, max_bytes=max_bytes)
    except storage.StorageNotFoundError:
        raise error(f"image {source!r} does not exist") from None
    except storage.StorageTimeoutError as e:
        raise error(f"image {source!r} could not be read in time: {e}") from None
    except (storage.StorageError, ValueError) as e:
        raise error(f"image {source!r} cannot be read: {e}") from None
    return decode_image_capped(data, max_pixels, source, error)


def load_reference_image(uri: str, max_pixels: int, timeout_s: float | None = None) -> Image.Image:
    """Open, validate and decode a task's reference image to RGB.

    Args:
        uri (`str`):
            Local path or URI (``s3://...``, ``file://...``, ``https://...``).
        max_pixels (`int`):
            Largest accepted ``width * height``; checked from the header, before decoding.
        timeout_s (`float`, *optional*):
            Deadline of one attempt to read a remote URI (default :data:`REMOTE_TIMEOUT_S`).

    Raises:
        ReferenceImageError: the URI is empty or missing, cannot be read in time, is not an
            image, its format is not one of :data:`ALLOWED_FORMATS`, it is truncated or
            corrupt, or it has more than ``max_pixels`` pixels.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ReferenceImageError(f"reference image must be a non-empty path or URI, got {uri!r}")
    return open_image(uri, max_pixels, timeout_s=timeout_s, error=ReferenceImageError)


def validate_reference_image(uri: str, max_pixels: int, timeout_s: float | None = None) -> str | None:
    """Return ``None`` if the image is usable, else the error message (never raises)."""
    try:
        load_reference_image(uri, max_pixels, timeout_s)
    except ReferenceImageError as e:
        return str(e)
    return None


def reference_or_error(uri: str | None, max_pixels: int) -> tuple[Image.Image | None, str | None]:
    """``(image, None)`` for a usable reference image, ``(None, "reference_image: ...")`` for a bad
    one, ``(None, None)`` when there is none (never raises)."""
    if uri is None:
        return None, None
    try:
        return load_reference_image(uri, max_pixels), None
    except ReferenceImageError as e:
        return None, f"reference_image: {e}"


# --------------------------------------------------------------------------- reference scenes


class ReferenceScenes:
    """Give tasks their starting scene as ``reference_image`` (pure; no Ray).

    Args:
        world_cfg (`WorldConfig`):
            ``reference_scene`` switches it on; the image is the sandbox kitchen's starting
            scene of the task (its family's placement, or a default scene for free text),
            ``sandbox.image_size`` square for the sandbox world, letterboxed to the video's
            ``height x width`` for the diffusers world (the pipeline conditions on it).

    :func:`~worldagent_ray.world.build_world` hands one to the backend, whose
    ``prepare_task(task, out_dir)`` calls :meth:`attach`; the driver calls that (through the
    world deployment's ``prepare``) once per proposed task, before recording it. Directly::

        scenes = ReferenceScenes(cfg.world)
        task = scenes.attach(task, f"{run.artifacts}/reference")
    """

    def __init__(self, world_cfg: "WorldConfig"):
        from .sandbox import SandboxWorld

        self.enabled = world_cfg.reference_scene
        self.world = SandboxWorld(world_cfg.sandbox)
        if world_cfg.backend == "diffusers":
            self.size: tuple[int, int] | None = (world_cfg.diffusers.height, world_cfg.diffusers.width)
        else:
            self.size = None

    def uri_for(self, task: "Task", out_dir: str) -> str:
        """Where the task's scene goes: ``<out_dir>/<task id>.start.png`` (deterministic, so
        a resumed run finds it again)."""
        return storage.join(storage.normalize(out_dir), f"{task.id.replace(':', '_')}.start.png")

    def attach(self, task: "Task", out_dir: str) -> "Task":
        """The task with ``reference_image`` set to its rendered starting scene. A task that
        already has one, or any task when ``world.reference_scene`` is off, is returned
        unchanged. Raises :class:`~worldagent_ray.storage.StorageError` when the write fails."""
        if not self.enabled or task.reference_image:
            return task
        uri = self.world.reference_image(task, self.uri_for(task, out_dir), size=self.size)
        return task.model_copy(update={"reference_image": uri})
