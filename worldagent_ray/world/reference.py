"""Loading and validating a task's reference image (path or fsspec URI).

Every world backend that accepts ``reference_image`` calls :func:`load_reference_image`
first, so that an oversized, corrupt or non-image file fails with one clear error
(:class:`ReferenceImageError`) instead of deep inside a pipeline. The sandbox ignores the
pixels but still validates them; the diffusers backend conditions on them.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

ALLOWED_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG", "WEBP", "BMP", "GIF"})
"""Image formats accepted as a reference image (PIL format names)."""

MAX_REFERENCE_BYTES = 64 * 1024 * 1024
"""Files larger than this are rejected before decoding."""


class ReferenceImageError(ValueError):
    """A reference image that cannot be used; the message names the URI and the problem."""


def _read(uri: str) -> bytes:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
        size = fs.size(path)
    except FileNotFoundError:
        raise ReferenceImageError(f"reference image {uri!r} does not exist") from None
    except Exception as e:  # bad protocol, permission, ...
        raise ReferenceImageError(f"reference image {uri!r} cannot be opened: {type(e).__name__}: {e}") from None
    if size is not None and size > MAX_REFERENCE_BYTES:
        raise ReferenceImageError(
            f"reference image {uri!r} is {size} bytes, more than the {MAX_REFERENCE_BYTES}-byte limit"
        )
    try:
        with fs.open(path, "rb") as f:
            return f.read(MAX_REFERENCE_BYTES + 1)
    except Exception as e:
        raise ReferenceImageError(f"reference image {uri!r} cannot be read: {type(e).__name__}: {e}") from None


def load_reference_image(uri: str, max_pixels: int) -> Image.Image:
    """Open, validate and decode a reference image to RGB.

    Args:
        uri (`str`):
            Local path or fsspec URI (``s3://...``, ``memory://...``).
        max_pixels (`int`):
            Largest accepted ``width * height``; checked from the header, before decoding,
            so a decompression bomb is refused without allocating it.

    Returns:
        `PIL.Image.Image`: the decoded image in RGB mode.

    Raises:
        ReferenceImageError: the URI is empty or missing, the file is not an image, its
            format is not one of :data:`ALLOWED_FORMATS`, it is truncated or corrupt, or it
            has more than ``max_pixels`` pixels.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ReferenceImageError(f"reference image must be a non-empty path or URI, got {uri!r}")
    if max_pixels < 1:
        raise ReferenceImageError(f"max_pixels must be >= 1, got {max_pixels}")
    data = _read(uri)
    if not data:
        raise ReferenceImageError(f"reference image {uri!r} is an empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ReferenceImageError(f"reference image {uri!r} is too large (decompression bomb guard)") from None
        except Exception as e:
            raise ReferenceImageError(
                f"reference image {uri!r} is not a readable image ({type(e).__name__}); "
                f"accepted formats: {sorted(ALLOWED_FORMATS)}"
            ) from None
        fmt = img.format or "unknown"
        if fmt not in ALLOWED_FORMATS:
            raise ReferenceImageError(
                f"reference image {uri!r} has format {fmt}; allowed: {sorted(ALLOWED_FORMATS)}"
            )
        w, h = img.size
        if w * h > max_pixels:
            raise ReferenceImageError(
                f"reference image {uri!r} is {w}x{h} = {w * h} pixels, more than max_pixels={max_pixels}"
            )
        try:
            img.load()
        except Exception as e:
            raise ReferenceImageError(
                f"reference image {uri!r} is corrupt or truncated ({type(e).__name__}: {e})"
            ) from None
    return img.convert("RGB")


def validate_reference_image(uri: str, max_pixels: int) -> str | None:
    """Return ``None`` if the image is usable, else the error message (never raises)."""
    try:
        load_reference_image(uri, max_pixels)
    except ReferenceImageError as e:
        return str(e)
    return None
