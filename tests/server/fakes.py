"""The fake text model of in-process server tests: the null model of the lab
(`benchmarks/lab/null_model.py`: no torch, outputs derived from the input), with the
defaults these tests were written against."""

from __future__ import annotations

from dataclasses import dataclass

from batcher.models import DEFAULT_OPTIONS, Encoded, Options
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


__all__ = ["EncodingFails", "FakeTextModel", "fake_embedding"]
