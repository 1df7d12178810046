"""A client's image, from its bytes to the RGB picture a model's image processor reads:
as transformers' `load_image` (what `pipeline("image-classification")` and
sentence-transformers' CLIP read) decodes it, so the pixels equal the reference's, and
with the limits a server needs before it trusts an upload.

What a client sends: base64 (standard or URL-safe alphabet, padding optional), a data
URI (`data:image/png;base64,...`), or a URL under one of the operator's allowed prefixes
(`ImageLimits.url_prefixes`; none by default: a server that fetches any URL a client
names is a server-side request forgery hole). A URL is fetched with no redirects, within
`FETCH_TIMEOUT_S` and `max_bytes`.

What is refused, each with its reason (`BadImage.kind`):
- `not_an_image`: not base64, or bytes no decoder recognises;
- `unsupported_format`: a format outside `ImageLimits.formats` (Pillow reads dozens,
  some of them through external programs; a server reads the common few);
- `too_many_bytes`: more than `ImageLimits.max_bytes`, checked before decoding;
- `too_many_pixels`: more than `ImageLimits.max_pixels`, read from the header before the
  pixels are (a decompression bomb: a small file of a huge picture);
- `truncated`: the file ends before its pixels do, or its data are corrupt;
- `unsupported_mode`: a pixel mode that has no RGB conversion;
- `url_not_allowed`: a URL outside the allowed prefixes (or any URL, by default);
- `url_failed`: an allowed URL that did not answer 200 with the image in time (a
  redirect, an error status, a timeout, a refused connection).

Runs on a thread of the tokenizer's pool, never on the event loop: decoding costs
milliseconds.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.error
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from PIL import Image, ImageOps, UnidentifiedImageError

BadImageKind = Literal[
    "not_an_image", "unsupported_format", "too_many_bytes", "too_many_pixels", "truncated",
    "unsupported_mode", "url_not_allowed", "url_failed",
]  # fmt: skip
FETCH_TIMEOUT_S = 10.0
"""How long an allowed URL has to answer, for each of connecting and each read."""
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
    url_prefixes: tuple[str, ...] = ()
    """URLs fetched: those under one of these (`https://images.example.com/public/`);
    none by default."""


def image_bytes(text: str, limits: ImageLimits) -> bytes:
    """The file a client's string holds: base64, a data URI of an image, or the file at
    an allowed URL (`fetch`). Raises BadImage."""
    text = text.strip()
    if text[:8].lower().startswith(("http://", "https://")):
        return fetch(text, limits)
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


def allowed(url: str, prefixes: Sequence[str]) -> bool:
    """Whether `url` is under one of `prefixes`: the same scheme, host and port, and a
    path that starts with the prefix's path at a segment boundary. A URL with a user or
    password, or one that does not parse, is under none."""
    try:
        target = urlsplit(url)
        port = target.port
    except ValueError:
        return False
    if target.username is not None or target.password is not None or not target.hostname:
        return False
    if any(part in (".", "..") for part in unquote(target.path).split("/")):
        return False  # a server would resolve it out of the prefix
    for prefix in prefixes:
        base = urlsplit(prefix)
        if (target.scheme.lower(), target.hostname, port or _PORTS.get(target.scheme.lower())) != (
            base.scheme.lower(), base.hostname, base.port or _PORTS.get(base.scheme.lower())
        ):  # fmt: skip
            continue
        path = base.path if base.path.endswith("/") else base.path + "/"
        if (target.path or "/").startswith(path) or target.path == base.path:
            return True
    return False


def prefix_problem(prefix: str) -> str | None:
    """Why `prefix` cannot be an allowed URL prefix, or None."""
    try:
        parts = urlsplit(prefix)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError as exc:
        return f"{prefix!r} is not a URL: {exc}"
    if parts.scheme.lower() not in _PORTS or not parts.hostname:
        return f"{prefix!r} is not an http:// or https:// URL with a host"
    if parts.username or parts.password or parts.query or parts.fragment:
        return f"{prefix!r} has a user, password, query or fragment; give scheme, host and path"
    return None


_PORTS = {"http": 80, "https": 443}


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx is then an HTTPError: a redirect could leave the allow-list


_OPENER = urllib.request.build_opener(_NoRedirects)


def fetch(url: str, limits: ImageLimits) -> bytes:
    """The file at `url`, if `limits` allow it: at most `max_bytes`, no redirects, within
    FETCH_TIMEOUT_S. Raises BadImage."""
    if not allowed(url, limits.url_prefixes):
        where = "this server fetches no URLs" if not limits.url_prefixes else (
            "it is outside the URLs this server fetches (--image-url-allow)")  # fmt: skip
        raise BadImage("url_not_allowed", f"the image's URL is not fetched: {where}; send "
                       "the image itself, as base64 or a data URI")  # fmt: skip
    request = urllib.request.Request(url, headers={"User-Agent": "microbatch"})
    try:
        with _OPENER.open(request, timeout=FETCH_TIMEOUT_S) as reply:
            data: bytes = reply.read(limits.max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise BadImage("url_failed", f"the image's URL answered {exc.code} (redirects are "
                       "not followed)") from None  # fmt: skip
    except (OSError, ValueError) as exc:  # refused, timed out, reset, a bad URL
        raise BadImage("url_failed", f"the image's URL could not be read: {exc}") from None
    if len(data) > limits.max_bytes:
        raise BadImage("too_many_bytes", f"the image is over {limits.max_bytes} bytes")
    return data


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
    except Exception as exc:  # a decoder's own failure on a malformed header
        raise BadImage("truncated", f"the image cannot be read ({type(exc).__name__})") from None
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
    except Exception as exc:  # a decoder's own failure on malformed data
        raise BadImage("truncated", f"the image is corrupt ({type(exc).__name__})") from None


def _format_of(data: bytes) -> str | None:
    """The format Pillow would read `data` as, with every decoder it has."""
    try:
        with Image.open(io.BytesIO(data)) as found:
            return found.format
    except Exception:  # any decoder's failure: no format then
        return None
