"""The fake text model of in-process server tests: the null model of the lab
(`benchmarks/lab/null_model.py`: no torch, outputs derived from the input), with the
defaults these tests were written against."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.lab.null_model import NullModel, checksum_embedding

fake_embedding = checksum_embedding
"""What `FakeTextModel` embeds a text as: [length, checksum]."""


@dataclass
class FakeTextModel(NullModel):
    """`NullModel` named `fake`, reading texts back from at most 64 tokens. See
    `NullModel` for its gates (`warm_gate`, `predict_gate`), `poison` and records
    (`batches`, `seen`, `warmed`)."""

    name: str = "fake"
    max_tokens: int = 64


__all__ = ["FakeTextModel", "fake_embedding"]
