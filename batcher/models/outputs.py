"""What a text model answers for one input: a pooled embedding (a list of floats), a
`Classification`, `TokenVectors`, or a `SparseVector`. Plain data: it crosses to front-end
processes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class Classification:
    label: str
    """The label with the highest score."""
    score: float
    scores: list[float]
    """Every label's score (probability, or logit with `raw_scores`), in the order of
    `TextEncoder.labels`."""


@dataclass(frozen=True, slots=True)
class TokenVectors:
    """One input's token vectors: the model's last hidden state at each of its tokens
    (special tokens included, padding not), in the order `tokenize` shows them, as the
    bytes of a row-major little-endian float32 array (cheap to pickle across processes)."""

    data: bytes
    dimension: int

    def array(self) -> np.ndarray[Any, Any]:
        """[tokens, dimension], float32."""
        return np.frombuffer(self.data, dtype="<f4").reshape(-1, self.dimension)


@dataclass(frozen=True, slots=True)
class SparseVector:
    """A sparse model's output: its nonzero weights, by vocabulary index (ascending), as
    the bytes of little-endian int32 indices and float32 values."""

    indices: bytes
    values: bytes

    def pairs(self) -> list[dict[str, float | int]]:
        """`[{"index": i, "value": w}, ...]`, as TEI's `/embed_sparse` answers."""
        indices = np.frombuffer(self.indices, dtype="<i4").tolist()
        values = np.frombuffer(self.values, dtype="<f4").tolist()
        return [{"index": i, "value": v} for i, v in zip(indices, values, strict=True)]


def sparse_vector(indices: Any, values: Any, top_k: int | None) -> SparseVector:
    """A `SparseVector` of `values` at ascending `indices` (numpy arrays): the nonzero
    ones, the `top_k` largest where asked (sentence-transformers' `max_active_dims`)."""
    nonzero = values != 0
    indices, values = indices[nonzero], values[nonzero]
    if top_k is not None and len(values) > top_k:
        kept = np.sort(np.argpartition(values, len(values) - top_k)[len(values) - top_k :])
        indices, values = indices[kept], values[kept]
    return SparseVector(indices.astype("<i4").tobytes(), values.astype("<f4").tobytes())


Output = list[float] | Classification | TokenVectors | SparseVector
