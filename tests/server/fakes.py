"""The fake text model of in-process server tests: the null model of the lab
(`benchmarks/lab/null_model.py`: no torch, outputs derived from the input), with the
defaults these tests were written against."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from batcher.models import DEFAULT_OPTIONS, Encoded, Options, TruncationDirection
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


__all__ = ["EncodingBlocks", "EncodingFails", "FakeTextModel", "fake_embedding"]
