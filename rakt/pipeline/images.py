"""The one way rakt opens an encoded image: PIL reads the header, and the declared facts decide before any pixel is
decoded. Refused: more pixels than PIL's own bomb limit (`Image.MAX_IMAGE_PIXELS`; PIL holds at most 4 bytes per
pixel, whatever the file's depth, so this bounds the bytes too) and a longer side more than `MAX_ASPECT` times the
shorter one: resizing the shorter side to the model's size multiplies the longer one, so a 667-byte 1 x 200,000
PNG would need gigabytes at 96 px. Readers leave an image file or tar member over `MAX_FILE_BYTES` unread. A
refused or broken image is one counted skip (`skip_cause`), never the run.
"""
from __future__ import annotations

import contextlib
import io
from typing import Iterator

from PIL import Image

MAX_ASPECT = 20  # longest / shortest side; panoramas and banners stay under it
MAX_FILE_BYTES = 256 << 20  # an encoded image larger than this (declared file or tar member size) is not read
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class ImageRefused(ValueError):
    """An image refused on its declared size; `cause` is the skip it counts as."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.cause = cause


@contextlib.contextmanager
def open_image(data: bytes) -> Iterator[Image.Image]:
    """PIL's lazy open of encoded bytes, checked on its declared width and height; raises ImageRefused, or
    PIL's own errors for bytes that are no image (all in DECODE_ERRORS)."""
    with Image.open(io.BytesIO(data)) as img:
        check_size(*img.size)
        yield img


def check_size(width: int, height: int) -> None:
    """Refuse an empty image, one over PIL's pixel limit, or one of extreme aspect ratio."""
    if width < 1 or height < 1:
        raise ImageRefused("empty_image", f"declared size {width}x{height}")
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise ImageRefused("image_too_large", f"{width}x{height} is more than {limit:,} pixels")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageRefused("extreme_aspect_ratio", f"{width}x{height}: one side more than {MAX_ASPECT} times "
                                                   f"the other")


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> a decoded RGB image, after the checks of `open_image`."""
    with open_image(data) as img:
        return img.convert("RGB")


def skip_cause(error: Exception) -> str:
    """The counted skip of an image that could not be opened: the refusal's cause, else undecodable_image."""
    return error.cause if isinstance(error, ImageRefused) else "undecodable_image"
