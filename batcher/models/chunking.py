"""Long inputs, opt in: a text over the model's window split into windows that are each
embedded on their own and combined (`"chunking": "mean"`), as vLLM's chunked processing
does, where the default is to cut the text at the window.

A window is a run of the text's tokens, with the model's special tokens around it and
the request's prompt (its tokens) before it, exactly as many as fit the model's limit;
the windows are consecutive and do not overlap, the last one shorter. The server embeds
each as its own item of the micro-batch and combines their raw vectors (before the
model's final normalisation) into their mean weighted by each window's count of the
text's tokens; then the request's `dimensions` cut and normalisation apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class Wrapping:
    """The special tokens a tokenizer puts before and after a single text."""

    before: tuple[int, ...]
    after: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer: Any) -> Wrapping:
        """Found by tokenizing a probe text with and without special tokens."""
        probe = "window probe text"
        whole = tokenizer.encode(probe).ids
        bare = tokenizer.encode(probe, add_special_tokens=False).ids
        for start in range(len(whole) - len(bare) + 1):
            if whole[start : start + len(bare)] == bare:
                return cls(tuple(whole[:start]), tuple(whole[start + len(bare) :]))
        raise ValueError("the tokenizer changes a text's tokens when it adds special ones")


@dataclass(frozen=True, slots=True)
class Chunks:
    """A long text's windows, and how many of the text's tokens each holds (the weights
    of their mean)."""

    windows: list[Any]
    """`Encoded` items."""
    weights: list[int]


def windows(content: Sequence[int], size: int) -> list[list[int]]:
    """`content` in consecutive runs of `size` tokens, the last one shorter."""
    if size < 1:
        raise ValueError("a window must hold at least one token")
    return [list(content[start : start + size]) for start in range(0, len(content), size)]


def combine(vectors: Sequence[Sequence[float]], weights: Sequence[int]) -> np.ndarray[Any, Any]:
    """The windows' raw vectors as one: their mean weighted by `weights` (each window's
    count of the text's tokens), in float64, returned as float32."""
    matrix = np.asarray(vectors, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    mean: np.ndarray[Any, Any] = (matrix * w[:, None]).sum(axis=0) / w.sum()
    return mean.astype(np.float32)
