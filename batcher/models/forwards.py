"""What one forward pass computes, by task: pooled vectors (and the hidden states token
vectors are cut from), a classifier's logits, or a sparse model's SPLADE weights; and
what the HTTP side needs to encode inputs for a loaded model."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from batcher.models.description import Splade
from batcher.models.encoder import EncoderSpec
from batcher.models.heads import EmbeddingHead, splade
from batcher.models.loading import Loaded

Inputs = dict[str, torch.Tensor]
Forward = Callable[[Inputs, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
"""(inputs, pool mask) -> (pooled vectors or logits, an embedding model's last hidden
states: what token vectors are cut from, already computed, so returned at no cost)."""


def _embed_forward(model: Any, head: EmbeddingHead) -> Forward:
    def forward(inputs: Inputs, pool_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = model(**inputs).last_hidden_state
        out: torch.Tensor = head(hidden, inputs["attention_mask"], pool_mask)
        return out, hidden

    return forward


def _classify_forward(model: Any) -> Forward:
    def forward(inputs: Inputs, pool_mask: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits: torch.Tensor = model(**inputs).logits
        return logits.float(), None

    return forward


def _sparse_forward(model: Any, spec: Splade) -> Forward:
    def forward(inputs: Inputs, pool_mask: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits = model(**inputs).logits
        return splade(logits, inputs["attention_mask"], spec), None

    return forward


def forward_of(loaded: Loaded) -> Forward:
    if loaded.task == "sparse":
        assert loaded.description.splade is not None, "a sparse model needs its pooling; a bug"
        return _sparse_forward(loaded.model, loaded.description.splade)
    if loaded.task == "embed":
        assert loaded.head is not None, "an embedding model needs its head; this is a bug"
        return _embed_forward(loaded.model, loaded.head)
    return _classify_forward(loaded.model)


def _takes_type_ids(loaded: Loaded) -> bool:
    accepts = inspect.signature(loaded.model.forward).parameters
    names = getattr(loaded.tokenizer, "model_input_names", ())
    return "token_type_ids" in accepts and "token_type_ids" in names


def encoder_spec(loaded: Loaded) -> EncoderSpec:
    """What the HTTP side needs to encode inputs for `loaded`, as plain data."""
    description = loaded.description
    pooling = description.pooling
    return EncoderSpec(
        name=loaded.name,
        task=loaded.task,
        tokenizer_json=loaded.tokenizer.backend_tokenizer.to_str(),
        max_tokens=loaded.max_tokens,
        labels=loaded.labels,
        type_ids=_takes_type_ids(loaded),
        special_ids=frozenset(getattr(loaded.tokenizer, "all_special_ids", ())),
        normalize=description.normalize,
        prompts=dict(description.prompts),
        default_prompt=description.default_prompt,
        prompt_pooled=pooling is None or pooling.include_prompt,
        dimension=description.embedding_dimension if loaded.task == "embed" else None,
        static_query=loaded.static_query,
    )
