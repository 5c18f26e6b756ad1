"""Opening an image that may be hostile or broken: the one way, for validation, serving and scans.

The size is read from the header before a single pixel is decoded (a small compressed file can
declare billions of pixels; PIL's own bomb check only fires at twice its limit, and then says
"not readable" rather than "too large"). Decoding runs with truncated files refused and PIL's
limits set for the call only: process-wide state is restored afterwards.
"""
from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageFile

from medrega.errors import BadInput

TOO_LARGE, UNREADABLE, FORMAT, CORRUPT = "too large", "unreadable", "format", "corrupt"


class ImageRefused(BadInput):
    """An image we will not decode; `reason` is TOO_LARGE, UNREADABLE (no image header), FORMAT
    (not an accepted format) or CORRUPT (a header, but the pixels do not decode)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@contextmanager
def _limits(max_pixels: int | None) -> Iterator[None]:
    old, old_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must not "decode" with grey padding
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old, old_truncated


def _source(source: Path | bytes | BinaryIO):
    return io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source


def header(source: Path | bytes | BinaryIO) -> tuple[str | None, int, int]:
    """(format, width, height) from the header alone; ImageRefused(UNREADABLE) when there is none."""
    try:
        with _limits(None), Image.open(_source(source)) as im:
            return im.format, im.width, im.height
    except Exception as exc:  # noqa: BLE001 - any failure to read a header means "not an image"
        cause = str(exc).split(" <_io.")[0].split(f" {source!s}")[0] if not isinstance(source, bytes) else \
            str(exc).split(" <_io.")[0]
        raise ImageRefused(UNREADABLE, f"not a readable image ({type(exc).__name__}: {cause})") from None


def open_image(source: Path | bytes | BinaryIO, max_pixels: int, formats: tuple[str, ...] | None = None) -> Image.Image:
    """The fully decoded image, or ImageRefused saying why (size from the header first)."""
    fmt, width, height = header(source)
    if formats and fmt not in formats:
        raise ImageRefused(FORMAT, f"{fmt} is not accepted (expected {' or '.join(formats)})")
    if width * height > max_pixels:
        raise ImageRefused(TOO_LARGE, f"{width}x{height} is more than {max_pixels / 1e6:g} Mpx")
    if hasattr(source, "seek"):
        source.seek(0)
    try:
        with _limits(max_pixels):
            image = Image.open(_source(source))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRefused(TOO_LARGE, f"decompression bomb refused: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder error means "does not decode"
        raise ImageRefused(CORRUPT, f"cannot be decoded ({type(exc).__name__}: {exc})") from None
    return image
