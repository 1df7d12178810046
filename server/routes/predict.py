"""Inference in microbatch's own API: `/predict`, `/predict/batch`, and TEI's `/rerank`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from fastapi import APIRouter, Request, Response
from pydantic import TypeAdapter

from batcher.models import Classification, Encoded, Output
from server.errors import WrongTask
from server.routes.parsing import (
    PREDICT_ERRORS,
    check_tokens,
    deadline_of,
    encode,
    meta,
    openapi_body,
    parse,
    reply,
    runtime_of,
    serving,
    unless_disconnected,
)
from server.schemas import (
    BatchPredictRequest,
    BatchResponse,
    Embedding,
    EmbeddingResponse,
    ErrorReply,
    Label,
    LabelResponse,
    OutputOptions,
    PredictRequest,
    RerankRequest,
    RerankResult,
)

router = APIRouter()


def _shape(
    value: Output, item: Encoded, labels: Sequence[str], all_scores: bool
) -> Embedding | Label:
    # model_construct: the engine typed these values already; validating them again
    # would be a second pass over every float.
    if isinstance(value, Classification):
        scores = dict(zip(labels, value.scores, strict=True)) if all_scores else None
        return Label.model_construct(
            label=value.label, score=value.score, scores=scores, truncated=item.truncated
        )
    return Embedding.model_construct(embedding=value, truncated=item.truncated)


@router.post(
    "/predict",
    response_model=EmbeddingResponse | LabelResponse,
    summary="Predict for one text; batched with concurrent requests",
    responses=PREDICT_ERRORS,
    openapi_extra=openapi_body(PredictRequest),
)
async def predict(request: Request) -> Response:
    runtime = runtime_of(request)
    body = await parse(request, PredictRequest, runtime)
    model, engine = serving(runtime)
    pair = None if body.text_pair is None else [body.text_pair]
    deadline = deadline_of(engine, runtime, request)
    [item] = encode(model, [body.text], pair, body)
    check_tokens([item], model, runtime, "text", body.truncate)
    result = await unless_disconnected(request, runtime, engine.submit(item, deadline=deadline))
    shaped = _shape(result.value, item, model.labels, body.all_scores)
    kind = LabelResponse if isinstance(shaped, Label) else EmbeddingResponse
    return reply(kind.model_construct(**shaped.__dict__, **meta(request, model)), [result])


@router.post(
    "/predict/batch",
    response_model=BatchResponse,
    summary="Predict for several texts; each is batched on its own, results in order",
    responses=PREDICT_ERRORS,
    openapi_extra=openapi_body(BatchPredictRequest),
)
async def predict_batch(request: Request) -> Response:
    runtime = runtime_of(request)
    body = await parse(request, BatchPredictRequest, runtime)
    model, engine = serving(runtime)
    deadline = deadline_of(engine, runtime, request)
    items = encode(model, body.texts, body.text_pairs, body)
    check_tokens(items, model, runtime, "texts", body.truncate)
    results = await unless_disconnected(
        request, runtime, engine.submit_many(items, deadline=deadline)
    )
    shaped = [
        _shape(r.value, item, model.labels, body.all_scores)
        for r, item in zip(results, items, strict=True)
    ]
    # One model, one task: the results are all embeddings or all labels.
    typed = cast("list[Embedding] | list[Label]", shaped)
    return reply(BatchResponse.model_construct(results=typed, **meta(request, model)), results)


@router.post(
    "/rerank",
    response_model=list[RerankResult],
    summary="Score texts against a query with a cross-encoder, best first (TEI's shape)",
    responses={**PREDICT_ERRORS, 400: {"model": ErrorReply, "description": "Not JSON, or "
               "the model is not a reranker (wrong_task)."}},
    openapi_extra=openapi_body(RerankRequest),
)  # fmt: skip
async def rerank(request: Request) -> Response:
    """Each (query, text) pair is one item in the queue: batched, length-grouped and
    failure-isolated like any other, so a long list does not wait behind itself."""
    runtime = runtime_of(request)
    body = await parse(request, RerankRequest, runtime)
    model, engine = serving(runtime)
    if model.task != "rerank":
        raise WrongTask(
            f"this server runs a {model.task} model ({model.name}); /rerank needs a "
            "cross-encoder with one output score"
        )
    deadline = deadline_of(engine, runtime, request)
    options = OutputOptions(raw_scores=body.raw_scores)
    items = encode(model, [body.query] * len(body.texts), body.texts, options)
    check_tokens(items, model, runtime, "texts", body.truncate)
    results = await unless_disconnected(
        request, runtime, engine.submit_many(items, deadline=deadline)
    )
    scores = [cast("Classification", r.value).score for r in results]
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)[: body.top_n]
    ranked = [
        RerankResult.model_construct(
            index=i, score=scores[i], text=body.texts[i] if body.return_text else None
        )
        for i in order
    ]
    return reply(_RANKED.dump_json(ranked, exclude_none=True), results)


_RANKED = TypeAdapter(list[RerankResult])
