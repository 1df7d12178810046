"""What every rerank route does (ours, Cohere's, TEI's, the OpenAI-style `/v1/rerank`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from fastapi import Request

from batcher import Result
from batcher.models import Classification, Output, TruncationDirection
from server.routes.encoding import check_tokens, encode
from server.routes.headers import deadline_of
from server.routes.parsing import best_first, needs_task, serving, submit_all
from server.runtime import Runtime
from server.schemas import OutputOptions


@dataclass(frozen=True, slots=True)
class Ranking:
    """Texts scored against a query: `order` holds their indices, best first."""

    order: list[int]
    scores: list[float]
    tokens: int
    """Tokens the model read, pairs' special tokens included."""
    results: list[Result[Output]]
    model: str
    """The name of the model that scored them."""


async def rank(
    request: Request,
    runtime: Runtime,
    route: str,
    query: str,
    texts: Sequence[str],
    *,
    field: str,
    options: OutputOptions,
    truncate: bool | None,
    top_n: int | None,
    truncation_direction: TruncationDirection = "right",
    model_name: str | None = None,
) -> Ranking:
    """What every rerank route does: each (query, text) pair is one item in the queue,
    batched, length-grouped and failure-isolated like any other, so a long list does
    not wait behind itself; then the best first. `model_name`: the model the request
    names (None: the default)."""
    served, engine = serving(runtime, request, model_name)
    model = served.encoder
    needs_task(model, "rerank", route, "a cross-encoder with one output score")
    deadline = deadline_of(engine, runtime, request)
    items = await encode(request, [query] * len(texts), texts, options, truncation_direction)
    check_tokens(items, model, runtime, field, truncate)
    results = await submit_all(request, runtime, engine, items, deadline, by_size=False)
    scores = [cast("Classification", r.value).score for r in results]
    order = best_first(scores, top_n)
    return Ranking(order, scores, sum(item.n_tokens for item in items), results, model.name)
