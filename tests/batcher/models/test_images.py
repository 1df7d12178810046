"""Images as the reference reads them, and every broken one refused with its reason:
`decode_image` against transformers' `load_image` (what `pipeline("image-classification")`
and sentence-transformers' CLIP decode with) over generated pictures of many sizes,
modes and formats, EXIF-rotated ones included; then a fuzz of broken files."""

from __future__ import annotations

import base64
import io
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from batcher.models.images import BadImage, ImageLimits, decode_image, image_bytes

load_image = pytest.importorskip("transformers.image_utils").load_image


def picture(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    if mode == "P":
        return rgb.quantize(colors=64)
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8), "L")
        rgba = rgb.convert("RGBA")
        rgba.putalpha(alpha)
        return rgba
    if mode == "I;16":  # 16-bit grey, built directly (Pillow before 11 cannot convert to it)
        grey = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        return Image.fromarray(grey)
    return rgb.convert(mode)


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


CASES = [
    ("RGB", "PNG"), ("RGBA", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"),
    ("I;16", "PNG"), ("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "WEBP"),
    ("RGBA", "WEBP"), ("P", "GIF"), ("RGB", "BMP"), ("1", "BMP"), ("CMYK", "TIFF"),
    ("RGB", "TIFF"),
]  # fmt: skip


@pytest.mark.parametrize(("mode", "fmt"), CASES, ids=[f"{m}-{f}" for m, f in CASES])
@pytest.mark.parametrize("size", [(1, 1), (17, 33), (224, 224), (640, 480)])
def test_pixels_equal_load_images(mode: str, fmt: str, size: tuple[int, int]) -> None:
    data = encoded(picture(mode, size), fmt)
    ours = decode_image(data)
    theirs = load_image(base64.b64encode(data).decode())
    assert ours.mode == theirs.mode == "RGB"
    assert ours.size == theirs.size == size
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_an_exif_rotated_photo_is_turned_upright_as_the_reference_turns_it(
    orientation: int,
) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(picture("RGB", (40, 24)), "JPEG", exif=exif.tobytes())
    ours = decode_image(data)
    theirs = load_image(base64.b64encode(data).decode())
    assert ours.size == theirs.size
    assert ours.size == ((24, 40) if orientation >= 5 else (40, 24))
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_base64_and_data_uris_of_every_usual_spelling() -> None:
    data = encoded(picture("RGB", (8, 8)), "PNG")
    plain = base64.b64encode(data).decode()
    limits = ImageLimits()
    for text in (
        plain,
        plain.rstrip("="),
        base64.urlsafe_b64encode(data).decode(),
        f"data:image/png;base64,{plain}",
        f"DATA:image/png;charset=binary;base64,{plain}",
        "\n".join(plain[i : i + 76] for i in range(0, len(plain), 76)),
    ):
        assert image_bytes(text, limits) == data


def bomb(width: int, height: int) -> bytes:
    """A PNG header claiming width x height, with a tiny compressed all-zero body."""
    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", "not_an_image"),
        (b"not an image at all", "not_an_image"),
        (encoded(picture("RGB", (64, 64)), "PNG")[:200], "truncated"),
        (encoded(picture("RGB", (64, 64)), "JPEG")[:300], "truncated"),
        (bomb(10_000, 10_000), "too_many_pixels"),
        (encoded(picture("RGB", (32, 32)), "ICO"), "unsupported_format"),
        (encoded(picture("RGB", (8, 8)), "PPM"), "unsupported_format"),
    ],
    ids=["empty", "text", "truncated-png", "truncated-jpeg", "bomb", "ico", "ppm"],
)
def test_a_bad_image_is_refused_with_its_reason(data: bytes, kind: str) -> None:
    with pytest.raises(BadImage) as refused:
        decode_image(data, ImageLimits(max_pixels=4_000_000))
    assert refused.value.kind == kind, str(refused.value)
    assert str(refused.value)


def test_the_byte_limit_holds_before_anything_is_decoded() -> None:
    data = encoded(picture("RGB", (64, 64)), "PNG")
    limits = ImageLimits(max_bytes=len(data) - 1)
    with pytest.raises(BadImage) as over:
        decode_image(data, limits)
    assert over.value.kind == "too_many_bytes"
    with pytest.raises(BadImage) as text_over:
        image_bytes(base64.b64encode(data).decode(), ImageLimits(max_bytes=100))
    assert text_over.value.kind == "too_many_bytes"


@pytest.mark.parametrize(
    "text",
    ["not base64!", "data:text/plain;base64,aGVsbG8=", "data:image/png,rawbytes", "abc"],
)
def test_what_is_not_base64_of_an_image_says_so(text: str) -> None:
    with pytest.raises(BadImage) as refused:
        decode_image(image_bytes(text, ImageLimits()))
    assert refused.value.kind == "not_an_image"


VALID = encoded(picture("RGB", (16, 16)), "PNG")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzzed_files_decode_or_are_refused_never_anything_else(data: st.DataObject) -> None:
    """Flipped bytes, cut files and random bytes: an RGB picture or a BadImage."""
    kind = data.draw(st.sampled_from(["flip", "cut", "random", "zlib"]))
    if kind == "flip":
        blob = bytearray(VALID)
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        raw = bytes(blob)
    elif kind == "cut":
        raw = VALID[: data.draw(st.integers(0, len(VALID)))]
    elif kind == "zlib":
        raw = VALID[:33] + zlib.compress(data.draw(st.binary(max_size=200)))
    else:
        raw = data.draw(st.binary(max_size=300))
    outcome: str
    try:
        outcome = decode_image(raw, ImageLimits(max_pixels=1_000_000)).mode
    except BadImage as refused:
        outcome = refused.kind
    assert outcome in ("RGB", "not_an_image", "truncated", "too_many_pixels",
                       "unsupported_format", "unsupported_mode")  # fmt: skip


PREFIXES = ("https://images.example.com/public/", "http://127.0.0.1:8123")


@pytest.mark.parametrize(
    ("url", "fetched"),
    [
        ("https://images.example.com/public/cat.jpg", True),
        ("https://IMAGES.example.com/public/a/b.png", True),
        ("https://images.example.com:443/public/cat.jpg", True),
        ("http://127.0.0.1:8123/anything.png", True),
        ("https://images.example.com/publicity/cat.jpg", False),  # not at a segment boundary
        ("https://images.example.com/private/cat.jpg", False),
        ("https://images.example.com/public/../private/cat.jpg", False),
        ("https://images.example.com/public/%2e%2e/private/cat.jpg", False),
        ("http://images.example.com/public/cat.jpg", False),  # another scheme
        ("https://images.example.com.evil.test/public/cat.jpg", False),
        ("https://user@images.example.com/public/cat.jpg", False),
        ("https://images.example.com:8443/public/cat.jpg", False),
        ("http://127.0.0.1:8124/anything.png", False),
        ("http://127.0.0.1/anything.png", False),
        ("http://[::1/broken", False),
    ],
)
def test_only_urls_under_an_allowed_prefix_are_fetched(url: str, fetched: bool) -> None:
    from batcher.models.images import allowed

    assert allowed(url, PREFIXES) is fetched


def test_no_url_is_fetched_by_default() -> None:
    with pytest.raises(BadImage) as refused:
        image_bytes("https://images.example.com/public/cat.jpg", ImageLimits())
    assert refused.value.kind == "url_not_allowed"
    assert "send the image itself" in str(refused.value)


@pytest.mark.parametrize(
    "prefix",
    ["ftp://host/", "images.example.com/public/", "https://u:p@host/", "https://host/?q=1",
     "https://host:99999/"],
)  # fmt: skip
def test_a_prefix_that_is_not_a_plain_http_url_is_refused(prefix: str) -> None:
    from batcher.models.images import prefix_problem

    assert prefix_problem(prefix) is not None
    assert prefix_problem("https://images.example.com/public/") is None
