"""The queries of an inference-free SparseEncoder, computed without the model: its
`SparseStaticEmbedding` gives each distinct token of a query (tokenized by its own
tokenizer, without special tokens, cut at that tokenizer's limit) its entry of a fixed
table of weights. No torch here: the HTTP side computes these at once, with no batch to
wait for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from batcher.models.inputs import Encoded
from batcher.models.outputs import SparseVector, sparse_vector


@dataclass(frozen=True, slots=True)
class StaticQuery:
    """A `SparseStaticEmbedding`: a weight per vocabulary entry (float32 bytes), its own
    tokenizer (JSON) and that tokenizer's limit."""

    weights: bytes
    tokenizer_json: str
    max_tokens: int


class StaticSparse:
    def __init__(self, static: StaticQuery) -> None:
        self.weights: np.ndarray[Any, Any] = np.frombuffer(static.weights, dtype="<f4")
        self._tokenizer = Tokenizer.from_str(static.tokenizer_json)
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=static.max_tokens)

    def encode(self, texts: Sequence[str], prompt: str, top_k: int | None) -> list[Encoded]:
        """The queries' tokens as `SparseStaticEmbedding.preprocess` makes them."""
        encodings = self._tokenizer.encode_batch(
            [prompt + t for t in texts], add_special_tokens=False
        )
        return [Encoded(e.ids, bool(e.overflowing), top_k=top_k) for e in encodings]

    def vectors(self, items: Sequence[Encoded]) -> list[SparseVector]:
        """Each query's weights: its distinct tokens' entries of the table, the nonzero
        ones by index, the `top_k` largest where asked."""
        out = []
        for item in items:
            indices = np.unique(np.asarray(item.ids, dtype=np.int64))
            out.append(sparse_vector(indices, self.weights[indices], item.top_k))
        return out
