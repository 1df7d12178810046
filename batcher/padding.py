"""Pad lengths: round every batch's length up to a bucket so few shapes ever occur."""

from __future__ import annotations

from collections.abc import Iterable

PAD_MULTIPLE = 8


def bucket_length(length: int, multiple: int = PAD_MULTIPLE, cap: int | None = None) -> int:
    """`length` rounded up to a multiple of `multiple`, but never above `cap`."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    padded = -(-length // multiple) * multiple
    return padded if cap is None else min(padded, max(cap, length))


def padded_tokens(costs: Iterable[int], multiple: int = PAD_MULTIPLE) -> int:
    """Tokens a batch of items with these lengths occupies once padded to its bucket."""
    lengths = list(costs)
    if not lengths:
        return 0
    return len(lengths) * bucket_length(max(lengths), multiple)
