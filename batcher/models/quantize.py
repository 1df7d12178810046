"""Quantized embeddings: int8, uint8, binary and ubinary, as sentence-transformers'
`quantize_embeddings` computes them (and Cohere's API names them). Numpy only: the HTTP
side quantizes the float vectors the engine returns, so that one computed (and cached)
vector serves every output type of a request.

binary and ubinary are the signs of the values, eight to a byte (`np.packbits`), signed
(minus 128) or not: they need nothing but the vector. int8 and uint8 map each dimension's
range onto 256 steps, and the ranges come from a calibration set: the reference computes
them from the batch it is given, which would give one text different bytes in different
batches. Here they are fixed for the life of the model: computed once, at load, from a
fixed set of texts (`Calibration`), so that a text's bytes never depend on its batch
neighbours, nor on which process of the server answered.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np

EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary"]
"""What an embedding is sent as: its float32 values, or quantized."""
EMBEDDING_TYPES: tuple[EmbeddingType, ...] = get_args(EmbeddingType)

MAX_CALIBRATION_TEXTS = 1024
"""The most texts a calibration set keeps (the first ones of a file): their vectors go
to every front-end process, 3 MiB for a 768-dimension model."""

Array = np.ndarray[Any, Any]


def quantize_as(vectors: Array, kind: EmbeddingType, ranges: Array | None = None) -> Array:
    """`vectors` [n, d] (float32) as `kind`: sentence-transformers' `quantize_embeddings`
    with the given `ranges` [2, d] (each dimension's minimum and maximum; int8 and uint8
    only). Values outside the range are clipped to its ends."""
    if kind == "float":
        return vectors.astype(np.float32, copy=False)
    if kind in ("binary", "ubinary"):
        packed = np.packbits(vectors > 0, axis=-1)
        return (packed - 128).astype(np.int8) if kind == "binary" else packed
    if ranges is None:
        raise ValueError(f"{kind} needs the calibration ranges")
    ranges = ranges.astype(np.float32, copy=False)
    starts = ranges[0]
    steps = (ranges[1] - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    buckets: Array = np.clip(np.floor((vectors - starts) / steps), 0, 255)
    return buckets.astype(np.uint8) if kind == "uint8" else (buckets - 128).astype(np.int8)


def finish(raw: Array, dimensions: int | None, normalize: bool) -> Array:
    """Raw model outputs [n, d] as a request with these options gets them: cut to the
    first `dimensions` values, then L2-normalised when asked (as `torch`'s `normalize`,
    with its 1e-12 floor on the norm)."""
    vectors = raw[:, :dimensions] if dimensions is not None else raw
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return vectors.astype(np.float32, copy=False)


class Calibration:
    """A model's calibration set: the raw outputs (before the final normalisation and
    any `dimensions` cut) of a fixed set of texts, computed once at load. The int8 and
    uint8 ranges of each output option (`dimensions`, `normalize`) are the minimum and
    maximum per dimension of the set's vectors under those options, computed on first
    use and kept."""

    def __init__(self, raw: bytes, dimension: int, source: str) -> None:
        self.vectors = np.frombuffer(raw, dtype="<f4").reshape(-1, dimension)
        self.source = source
        """Where the texts came from: `built-in (N texts)` or the file's name and count."""
        self._ranges: dict[tuple[int | None, bool], Array] = {}

    @property
    def count(self) -> int:
        return int(self.vectors.shape[0])

    def ranges(self, dimensions: int | None, normalize: bool) -> Array:
        """[2, d]: each dimension's minimum and maximum over the set, under the options."""
        key = (dimensions, normalize)
        found = self._ranges.get(key)
        if found is None:
            vectors = finish(self.vectors, dimensions, normalize)
            found = np.vstack((vectors.min(axis=0), vectors.max(axis=0)))
            if len(self._ranges) < 256:  # dimensions come from requests: keep it bounded
                self._ranges[key] = found
        return found
