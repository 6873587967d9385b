"""Images in prompts: find them in chat messages, fetch and decode them with hard caps.

Every image an engine decodes goes through :func:`load_image`:

- **Pixel cap.** The size is read from the file header and checked against ``max_pixels``
  *before* any pixel is decoded, so a decompression bomb (a few hundred bytes that expand to
  100 Mpx) is refused without allocating it. An already-decoded ``PIL.Image`` is checked too.
- **Byte cap.** At most ``max_bytes`` are read from any file or URI.
- **Timeout.** A remote URI (``s3://``, ``http(s)://``, ``gs://``... anything fsspec opens)
  is fetched on a helper thread and abandoned after ``timeout_s`` with a :class:`TimeoutError`
  naming the URI (the abandoned read finishes or fails on its own daemon thread).

Images are data: they are decoded by Pillow, never executed.
"""

from __future__ import annotations

import io
import threading
import warnings
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageTooLargeError",
    "load_image",
    "prompt_images",
]

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024
DEFAULT_FETCH_TIMEOUT_S = 30.0


class ImageTooLargeError(ValueError):
    """An image over the pixel or byte cap; the message names the image and the cap."""


def prompt_images(prompt: Any) -> list[Any]:
    """The image parts of a chat conversation, in order (a raw string has none)."""
    if isinstance(prompt, str):
        return []
    images = []
    for msg in prompt:
        content = msg.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping) and part.get("type") == "image":
                    if "image" not in part:
                        raise ValueError(f"image part {dict(part)!r:.80} has no 'image' (a path or PIL image)")
                    images.append(part["image"])
    return images


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _read_remote(uri: str, timeout_s: float, max_bytes: int) -> bytes:
    box: dict[str, Any] = {}
    done = threading.Event()

    def fetch() -> None:
        try:
            import fsspec

            with fsspec.open(uri, "rb") as f:
                box["data"] = f.read(max_bytes + 1)
        except BaseException as e:  # reported to the caller below
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=fetch, name="image-fetch", daemon=True).start()
    if not done.wait(timeout_s):
        raise TimeoutError(f"image {uri!r} was not fetched within {timeout_s:g}s")
    if "error" in box:
        e = box["error"]
        if isinstance(e, FileNotFoundError):
            raise FileNotFoundError(f"image {uri!r} does not exist") from e
        raise OSError(f"image {uri!r} cannot be read: {type(e).__name__}: {e}") from e
    return box["data"]


def _read_local(path: Path, max_bytes: int) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)


def _check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image {what} is {width}x{height} = {width * height} pixels, over the cap of {max_pixels} "
            f"(engines.<name>.max_image_pixels)"
        )


def load_image(
    image: Any,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
):
    """Open an image given as a path, a URI, bytes or a ``PIL.Image``, as RGB.

    Raises:
        ImageTooLargeError: more than ``max_pixels`` pixels (checked from the header, before
            decoding) or more than ``max_bytes`` bytes.
        TimeoutError: a remote URI was not fetched within ``timeout_s``.
        FileNotFoundError: the path or URI does not exist.
        ValueError: the data is not a decodable image.
        TypeError: ``image`` is none of the accepted kinds.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        _check_pixels(image.width, image.height, max_pixels, f"<PIL {image.mode}>")
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray, memoryview)):
        data, what = bytes(image), f"<{len(image)} bytes>"
    elif isinstance(image, (str, Path)):
        what = repr(str(image))
        s = str(image)
        if isinstance(image, str) and _is_remote(s):
            data = _read_remote(s, timeout_s, max_bytes)
        else:
            data = _read_local(Path(s.removeprefix("file://")), max_bytes)
    else:
        raise TypeError(f"an image part must be a path, URI, bytes or PIL.Image, got {type(image).__name__}")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"image {what} is larger than {max_bytes} bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(f"image {what} is too large: {e}") from None
        except Exception as e:
            raise ValueError(f"image {what} is not a decodable image: {type(e).__name__}: {e}") from None
        _check_pixels(im.width, im.height, max_pixels, what)
        try:
            return im.convert("RGB")
        except Exception as e:  # truncated or corrupt pixel data
            raise ValueError(f"image {what} could not be decoded: {type(e).__name__}: {e}") from None
