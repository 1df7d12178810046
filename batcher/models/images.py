"""A client's image, from its bytes to the RGB picture a model's image processor reads:
as transformers' `load_image` (what `pipeline("image-classification")` and
sentence-transformers' CLIP read) decodes it, so the pixels equal the reference's, and
with the limits a server needs before it trusts an upload.

What a client sends: base64 (standard or URL-safe alphabet, padding optional), or a data
URI (`data:image/png;base64,...`). URLs are not fetched here.

What is refused, each with its reason (`BadImage.kind`):
- `not_an_image`: not base64, or bytes no decoder recognises;
- `unsupported_format`: a format outside `ImageLimits.formats` (Pillow reads dozens,
  some of them through external programs; a server reads the common few);
- `too_many_bytes`: more than `ImageLimits.max_bytes`, checked before decoding;
- `too_many_pixels`: more than `ImageLimits.max_pixels`, read from the header before the
  pixels are (a decompression bomb: a small file of a huge picture);
- `truncated`: the file ends before its pixels do, or its data are corrupt;
- `unsupported_mode`: a pixel mode that has no RGB conversion.

Runs on a thread of the tokenizer's pool, never on the event loop: decoding costs
milliseconds.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image, ImageOps, UnidentifiedImageError

BadImageKind = Literal[
    "not_an_image", "unsupported_format", "too_many_bytes", "too_many_pixels", "truncated",
    "unsupported_mode",
]  # fmt: skip
FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"})
"""The formats read by default: what cameras, browsers and screenshot tools write."""
DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,", re.I)


class BadImage(ValueError):
    """An image that cannot be read, and why (`kind`); the message says it in words."""

    def __init__(self, kind: BadImageKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    """The encoded file's size (after base64)."""
    max_pixels: int = 50_000_000
    """Width times height: a 50-megapixel photo, and a bound on the memory one image can
    take once decoded (about 150 MB in RGB)."""
    formats: frozenset[str] = field(default=FORMATS)


def image_bytes(text: str, limits: ImageLimits) -> bytes:
    """The file a client's string holds: base64, or a data URI of an image. Raises
    BadImage."""
    text = text.strip()
    if text[:8].lower().startswith(("http://", "https://")):
        raise BadImage("not_an_image", "URLs are not fetched: send the image itself, as "
                       "base64 or a data URI")  # fmt: skip
    if text[:5].lower() == "data:":
        match = DATA_URI.match(text)
        if match is None:
            raise BadImage("not_an_image", "a data URI of an image is data:image/...;base64,...")
        mime = (match["mime"] or "").lower()
        if not mime.startswith("image/"):
            raise BadImage("not_an_image", f"a data URI of {mime or 'no type'}, not an image")
        text = text[match.end() :]
    if len(text) * 3 // 4 > limits.max_bytes:
        raise BadImage("too_many_bytes", f"the image is over {limits.max_bytes} bytes")
    compact = re.sub(r"\s+", "", text)
    alphabet = b"-_" if ("-" in compact or "_" in compact) else None
    padded = compact + "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(padded, altchars=alphabet, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage("not_an_image", "the image is not base64") from None


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """The picture in `data`, upright (its EXIF orientation applied) and in RGB, as
    transformers' `load_image` makes it. Raises BadImage."""
    if len(data) > limits.max_bytes:
        raise BadImage("too_many_bytes", f"the image is over {limits.max_bytes} bytes")
    formats = sorted(limits.formats)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError:
        found = _format_of(data)
        if found is not None and found not in limits.formats:
            raise BadImage("unsupported_format", f"{found} images are not read here; "
                           f"send one of {', '.join(formats)}") from None  # fmt: skip
        raise BadImage("not_an_image", "the bytes are not an image of a known format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("too_many_pixels", f"the image is over {limits.max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage("truncated", f"the image cannot be read: {exc}") from None
    width, height = picture.size
    if width * height > limits.max_pixels:
        raise BadImage("too_many_pixels", f"the image is {width} x {height}, over "
                       f"{limits.max_pixels} pixels")  # fmt: skip
    try:
        picture.load()
        upright = ImageOps.exif_transpose(picture)
        return upright.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if "conversion" in str(exc) or "mode" in str(exc):
            raise BadImage("unsupported_mode", f"{picture.mode} images have no RGB "
                           "conversion") from None  # fmt: skip
        raise BadImage("truncated", f"the image is cut short or corrupt: {exc}") from None


def _format_of(data: bytes) -> str | None:
    """The format Pillow would read `data` as, with every decoder it has."""
    try:
        with Image.open(io.BytesIO(data)) as found:
            return found.format
    except Exception:  # any decoder's failure: no format then
        return None
