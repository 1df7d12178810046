"""Images on the HTTP side of the seam: a client's image becomes `Pixels`, the model's
own image processor's output for it, here; the engine (in this process or another)
receives only those and stacks them into one `[B, 3, H, W]` tensor.

`ImageEncoder` is the `Encoder` of an image model (`batcher.models.vision`): images go
through `encode_images` (decoded as transformers' `load_image` does, then the model's
image processor, in its Pillow backend: the pixels equal the reference's); texts, for a
CLIP-like model, through its text tower's `TextEncoder`. An image classifier takes no
text, and says so. It pickles as its spec and its image processor (plain Python and
numpy), for a front-end process."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from batcher.models.chunking import Chunks
from batcher.models.encoder import EncoderSpec, TextEncoder, Token, TruncationDirection
from batcher.models.images import BadImage, ImageLimits, decode_image, image_bytes
from batcher.models.inputs import DEFAULT_OPTIONS, Encoded, InvalidOption, Options
from batcher.models.options import Task
from batcher.models.quantize import Calibration
from batcher.models.static_sparse import StaticSparse

VisionKind = Literal["classifier", "clip", "siglip"]
"""An image classifier (`AutoModelForImageClassification`), or a model that embeds
images and texts in one space (CLIP's `get_image_features`/`get_text_features`, and
SigLIP's)."""


@dataclass(frozen=True, slots=True)
class Pixels:
    """One image as its model's processor made it: float32 `[3, H, W]` (little-endian
    bytes, cheap to pickle and to hash), and what its output must look like."""

    data: bytes
    shape: tuple[int, int, int]
    digest: bytes
    """sha256 of the pixels: what makes two images compute the same output."""
    patches: int
    """The tokens the vision encoder sees (its cost in a batch)."""
    normalize: bool = False
    dimensions: int | None = None
    raw_scores: bool = False

    # What the server reads of a text item, for an image: nothing was cut, no segments,
    # no prompt, no token vectors, no sparse top-k.
    truncated: ClassVar[bool] = False
    type_ids: ClassVar[None] = None
    prompt_tokens: ClassVar[int] = 0
    tokens: ClassVar[bool] = False
    top_k: ClassVar[None] = None

    @property
    def n_tokens(self) -> int:
        return self.patches

    def array(self) -> np.ndarray[Any, Any]:
        return np.frombuffer(self.data, dtype="<f4").reshape(self.shape)

    def identity(self) -> Hashable:
        return ("image", self.digest, self.dimensions, self.normalize, self.raw_scores)


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """What an `ImageEncoder` is made of, besides the image processor. Plain data."""

    name: str
    task: Task
    kind: VisionKind
    image_shape: tuple[int, int, int]
    """The processor's output for one image, the same for every image (checked at load)."""
    patches: int
    labels: tuple[str, ...] = ()
    normalize: bool = False
    """embed: whether embeddings are L2-normalised unless a request says otherwise."""
    dimension: int | None = None
    text: EncoderSpec | None = None
    """clip/siglip: the text tower's encoder."""
    limits: ImageLimits = field(default_factory=ImageLimits)


class ImageEncoder:
    """An image model's `Encoder` (`batcher.models.encoder.Encoder`), with
    `encode_images` for its images."""

    calibration: Calibration | None = None
    static: StaticSparse | None = None

    def __init__(self, spec: ImageSpec, processor: Any) -> None:
        self.spec = spec
        self.processor = processor
        self.name = spec.name
        self.task: Task = spec.task
        self.kind = spec.kind
        self.labels = spec.labels
        self.dimension = spec.dimension
        self.limits = spec.limits
        self.text = None if spec.text is None else TextEncoder(spec.text)
        self.max_tokens = 0 if self.text is None else self.text.max_tokens
        self.prompts: Mapping[str, str] = {}
        self.modalities: tuple[str, ...] = ("image",) if self.text is None else ("image", "text")
        size = getattr(processor, "size", None)  # a dict, or transformers 5's SizeDict
        edge = (
            size.get("shortest_edge")
            if isinstance(size, dict)
            else getattr(size, "shortest_edge", None)
        )
        self._shortest_edge = edge if isinstance(edge, int) else None
        """The processor resizes the shortest edge to this, keeping the aspect ratio."""

    def __reduce__(self) -> tuple[type[ImageEncoder], tuple[ImageSpec, Any]]:
        return ImageEncoder, (self.spec, self.processor)

    # -- images ------------------------------------------------------------------------

    def encode_images(
        self,
        images: Sequence[str | bytes],
        options: Options = DEFAULT_OPTIONS,
        limits: ImageLimits | None = None,
        timings: list[float] | None = None,
    ) -> list[Pixels | BadImage]:
        """Each image (base64 or a data URI, or its file's bytes) as `Pixels`, or the
        BadImage that says why it cannot be read (under `limits`, default the spec's); the
        good ones through the processor in one call. Each image's decoding seconds are
        appended to `timings`. Raises InvalidOption for options an image cannot take,
        before any image is read."""
        fields = self._fields(options)
        limits = limits or self.limits
        out: list[Pixels | BadImage] = []
        pictures = []
        for image in images:
            started = time.perf_counter()
            try:
                data = image if isinstance(image, bytes) else image_bytes(image, limits)
                picture = decode_image(data, limits)
                self._check_resized(picture.size, limits)
                pictures.append(picture)
                out.append(_PENDING)
            except BadImage as exc:
                out.append(exc)
            if timings is not None:
                timings.append(time.perf_counter() - started)
        if not pictures:
            return out
        arrays = self.pixel_values(pictures)
        good = iter(arrays)
        for i, slot in enumerate(out):
            if slot is _PENDING:
                array = np.ascontiguousarray(next(good), dtype="<f4")
                data = array.tobytes()
                out[i] = Pixels(data, self.spec.image_shape, hashlib.sha256(data).digest(),
                                self.spec.patches, **fields)  # fmt: skip
        return out

    def _check_resized(self, size: tuple[int, int], limits: ImageLimits) -> None:
        """A processor that resizes to a shortest edge (CLIP's) keeps the aspect ratio: a
        1 x 40,000 picture would become 224 x 8,960,000 before its crop. Refused when the
        resized picture would be over `max_pixels`."""
        wanted = self._shortest_edge
        width, height = size
        if wanted is None or min(width, height) >= wanted:
            return
        scale = wanted / max(1, min(width, height))
        if width * height * scale * scale > limits.max_pixels:
            raise BadImage("too_many_pixels", f"the image is {width} x {height}: resized to the "
                           f"model's shortest edge of {wanted} it would be over "
                           f"{limits.max_pixels} pixels")  # fmt: skip

    def pixel_values(self, pictures: Sequence[Any]) -> np.ndarray[Any, Any]:
        """The processor's `pixel_values` for RGB pictures: float32 `[n, 3, H, W]`."""
        values = self.processor(images=list(pictures), return_tensors="np")["pixel_values"]
        array = np.asarray(values, dtype=np.float32)
        if array.shape[1:] != self.spec.image_shape:
            raise RuntimeError(
                f"the image processor made {array.shape[1:]}, not {self.spec.image_shape}; "
                "this is a bug (checked at load)"
            )
        return array

    def _fields(self, options: Options) -> dict[str, Any]:
        for name in ("prompt", "prompt_name", "top_k"):
            if getattr(options, name) is not None:
                raise InvalidOption(name, f"{name} does not apply to images")
        if options.token_embeddings:
            raise InvalidOption("token_embeddings", "token vectors are for texts, not images")
        if self.task == "classify":
            for name in ("normalize", "dimensions"):
                if getattr(options, name) is not None:
                    raise InvalidOption(
                        name, f"{name} applies to embedding models; this is a classify model"
                    )
            return {"raw_scores": options.raw_scores}
        if options.raw_scores:
            raise InvalidOption("raw_scores", "raw_scores applies to classifiers; this one embeds")
        dims = options.dimensions
        if dims is not None and not (self.dimension is not None and 1 <= dims <= self.dimension):
            raise InvalidOption(
                "dimensions", f"dimensions must be between 1 and {self.dimension}, got {dims}"
            )
        normalize = self.spec.normalize if options.normalize is None else options.normalize
        return {"dimensions": dims, "normalize": normalize}

    # -- texts (CLIP-like models) ------------------------------------------------------

    def _text(self, options: Options = DEFAULT_OPTIONS) -> TextEncoder:
        if options.token_embeddings:
            raise InvalidOption("token_embeddings", f"{self.name} answers pooled embeddings "
                                "only; its towers' token vectors are not served")  # fmt: skip
        if self.text is None:
            raise InvalidOption(
                "input", f"{self.name} classifies images; send an image, not text "
                '({"image": "<base64 or data URI>"})',
            )  # fmt: skip
        return self.text

    def encode_many(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        options: Options = DEFAULT_OPTIONS,
        truncation_direction: TruncationDirection = "right",
    ) -> list[Encoded]:
        return self._text(options).encode_many(texts, pairs, options, truncation_direction)

    def encode_ids(
        self, sequences: Sequence[Sequence[int]], options: Options = DEFAULT_OPTIONS
    ) -> list[Encoded]:
        return self._text(options).encode_ids(sequences, options)

    def decode(self, ids: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return self._text().decode(ids, skip_special_tokens)

    def chunk(self, text: str, options: Options = DEFAULT_OPTIONS) -> Chunks:
        return self._text(options).chunk(text, options)

    def static_queries(
        self, texts: Sequence[str], options: Options = DEFAULT_OPTIONS
    ) -> list[Encoded]:
        raise InvalidOption("input_type", "only inference-free sparse models have static queries")

    def tokenize(
        self, texts: Sequence[str], add_special_tokens: bool = True, prompt_name: str | None = None
    ) -> list[list[Token]]:
        return self._text().tokenize(texts, add_special_tokens, prompt_name)


_PENDING: Any = object()
