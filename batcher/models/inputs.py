"""What a request asks of a text model: its options (`Options`) and each input as token
ids with its output options (`Encoded`), made by the model's encoder on the HTTP side and
sent to the engine. Plain data."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Options:
    """One request's choices about its outputs; None means "as the model declares"."""

    normalize: bool | None = None
    """embed: L2-normalise (default: whether the model ends with a Normalize module)."""
    prompt_name: str | None = None
    """embed: one of the model's prompts (default: its `default_prompt_name`, if any)."""
    prompt: str | None = None
    """embed: a prompt of the caller's own, put before the text."""
    dimensions: int | None = None
    """embed: keep the first N values (Matryoshka), then normalise if normalising."""
    raw_scores: bool = False
    """classify/rerank: the logits, without the head's activation."""
    token_embeddings: bool = False
    """embed: one vector per token (the model's last hidden states), not the pooled one."""
    top_k: int | None = None
    """sparse: keep the k largest weights."""


DEFAULT_OPTIONS = Options()


class InvalidOption(ValueError):
    """An option the model cannot honour; `field` names it, the message says what is
    allowed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class Encoded:
    """One tokenized input: token ids with special tokens, truncated to the model's limit,
    and what its output must look like."""

    ids: list[int]
    truncated: bool
    type_ids: list[int] | None = None
    """Segment ids (0 for the text, 1 for its pair), for models that take them."""
    prompt_tokens: int = 0
    """Leading tokens (the prompt) that the model leaves out of its pooling."""
    dimensions: int | None = None
    normalize: bool = False
    raw_scores: bool = False
    tokens: bool = False
    """embed: answer `TokenVectors` (the hidden state of each token), not the pooled vector."""
    top_k: int | None = None
    """sparse: keep the k largest weights."""

    @property
    def n_tokens(self) -> int:
        """Its length in tokens (what usage and token quotas count)."""
        return len(self.ids)

    def identity(self) -> Hashable:
        """What makes two inputs compute the same output: the tokens and every output
        option (not whether the text was cut, which the output does not depend on)."""
        segments = None if self.type_ids is None else tuple(self.type_ids)
        return (tuple(self.ids), segments, self.prompt_tokens, self.dimensions,
                self.normalize, self.raw_scores, self.tokens, self.top_k)  # fmt: skip

    def __reduce__(self) -> tuple[type[Encoded], tuple[object, ...]]:
        # Fast pickling to an engine process (batcher.remote): the constructor's arguments.
        return Encoded, (self.ids, self.truncated, self.type_ids, self.prompt_tokens,
                         self.dimensions, self.normalize, self.raw_scores,
                         self.tokens, self.top_k)  # fmt: skip
