"""The fake text model of in-process server tests: the null model of the lab
(`benchmarks/lab/null_model.py`: no torch, outputs derived from the input), with the
defaults these tests were written against."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batcher.models import (
    DEFAULT_OPTIONS,
    Classification,
    Encoded,
    ImageEncoder,
    Options,
    Output,
    Pixels,
    Task,
    TruncationDirection,
)
from batcher.models.pixels import ImageSpec
from benchmarks.lab.null_model import NullEncoder, NullModel, checksum_embedding

fake_embedding = checksum_embedding
"""What `FakeTextModel` embeds a text as: [length, checksum]."""


@dataclass
class FakeTextModel(NullModel):
    """`NullModel` named `fake`, reading texts back from at most 64 tokens. See
    `NullModel` for its gates (`warm_gate`, `predict_gate`), `poison` and records
    (`batches`, `seen`, `warmed`)."""

    name: str = "fake"
    max_tokens: int = 64


@dataclass
class FailingEncoder(NullEncoder):
    """Raises RuntimeError(`error`) for every text: a bug on the HTTP side's encoding."""

    error: str = "boom"

    def encode(
        self, text: str, pair: str | None = None, options: Options = DEFAULT_OPTIONS
    ) -> Encoded:
        raise RuntimeError(self.error)


@dataclass
class EncodingFails(FakeTextModel):
    """`FakeTextModel` whose encoder raises RuntimeError(`error`) for every text."""

    error: str = "boom"

    @property
    def encoder(self) -> FailingEncoder:
        return FailingEncoder(self.task, self.name, self.labels, self.max_tokens, error=self.error)


@dataclass
class BlockingEncoder(NullEncoder):
    """Sets `entered`, then waits for `gate`, before it encodes texts in a batch (on the
    tokenizer's thread: a text over `server.tokenizing.INLINE_CHARS` goes there)."""

    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)

    def encode_many(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        options: Options = DEFAULT_OPTIONS,
        truncation_direction: TruncationDirection = "right",
    ) -> list[Encoded]:
        self.entered.set()
        if not self.gate.wait(timeout=30):
            raise TimeoutError("the test never released the encoder's gate")
        return super().encode_many(texts, pairs, options, truncation_direction)


@dataclass
class EncodingBlocks(FakeTextModel):
    """`FakeTextModel` whose encoder holds each batch of texts until `gate` is set
    (`BlockingEncoder`); the gate starts open."""

    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.gate.set()
        self._encoder = BlockingEncoder(self.task, self.name, self.labels, self.max_tokens,
                                        gate=self.gate, entered=self.entered)  # fmt: skip

    @property
    def encoder(self) -> BlockingEncoder:
        return self._encoder


class ShrinkProcessor:
    """A stand-in image processor: each picture shrunk to 4 x 4 by Pillow, scaled to
    [0, 1], channels first (what `ImageEncoder` asks of a processor)."""

    def __call__(self, images: Sequence[Any], return_tensors: str = "np") -> dict[str, Any]:
        rows = [np.asarray(p.resize((4, 4)), dtype=np.float32).transpose(2, 0, 1) / 255
                for p in images]  # fmt: skip
        return {"pixel_values": np.stack(rows)}


@dataclass
class FakeImageModel:
    """An image classifier (`dark` or `bright`, by the mean of its pixels) or, with
    task `embed`, an image embedder ([mean, spread]), with no torch: for in-process
    tests of the image routes. `batches` records the size of every forward pass."""

    name: str = "fake-image"
    task: Task = "classify"
    labels: tuple[str, ...] = ("dark", "bright")
    packed_outputs: bool = False
    batches: list[int] = field(default_factory=list)

    @property
    def encoder(self) -> ImageEncoder:
        kind = "classifier" if self.task == "classify" else "clip"
        labels = self.labels if self.task == "classify" else ()
        spec = ImageSpec(self.name, self.task, kind, (3, 4, 4), 17, labels=labels,  # type: ignore[arg-type]
                         dimension=2, normalize=False)  # fmt: skip
        return ImageEncoder(spec, ShrinkProcessor())

    def cost(self, item: Pixels) -> int:
        return item.n_tokens

    def predict(self, items: Sequence[Pixels]) -> list[Output]:
        self.batches.append(len(items))
        means = [float(item.array().mean()) for item in items]
        if self.task == "embed":
            return [[m, float(item.array().std())] for m, item in zip(means, items, strict=True)]
        return [Classification("bright" if m > 0.5 else "dark", max(m, 1 - m), [1 - m, m])
                for m in means]  # fmt: skip

    def warm_up(
        self, max_batch_size: int, on_step: Callable[[int, int, str], None] | None = None
    ) -> None:
        if on_step is not None:
            on_step(1, 1, f"batch of {max_batch_size} images")

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "task": self.task, "device": "cpu", "labels": list(self.labels),
                "modalities": ["image"]}  # fmt: skip


__all__ = ["EncodingBlocks", "EncodingFails", "FakeImageModel", "FakeTextModel", "fake_embedding"]
