"""Inference in microbatch's own API: `/predict` and `/predict/batch`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from fastapi import APIRouter, Request, Response

from batcher.models import Classification, Encoded, Encoder, Output, SparseVector, TokenVectors
from server.routes.embedding_types import as_base64, as_type
from server.routes.encoding import check_tokens, encode, encode_images
from server.routes.headers import deadline_of, lane_of
from server.routes.parsing import (
    PREDICT_ERRORS,
    meta,
    openapi_body,
    parse,
    reply,
    runtime_of,
    serving,
    submit_all,
    unless_disconnected,
    vector,
)
from server.routes.uploads import is_upload, parse_upload, upload_openapi
from server.schemas import (
    BatchPredictRequest,
    BatchResponse,
    Embedding,
    EmbeddingResponse,
    Label,
    LabelResponse,
    OutputOptions,
    PredictMeta,
    PredictRequest,
    Sparse,
    SparseResponse,
)

router = APIRouter(tags=["microbatch"])


def _shape(
    model: Encoder, values: Sequence[Output], items: Sequence[Encoded], body: OutputOptions
) -> list[Embedding] | list[Label] | list[Sparse]:
    # model_construct: the engine typed these values already; validating them again
    # would be a second pass over every float. One model, one task: all embeddings or
    # all labels.
    if model.task == "sparse":
        return [
            Sparse.model_construct(sparse=cast("SparseVector", v).pairs(), truncated=i.truncated)  # type: ignore[arg-type]
            for v, i in zip(values, items, strict=True)
        ]
    if model.task != "embed":
        labels = model.labels
        shaped = []
        for value, item in zip(values, items, strict=True):
            assert isinstance(value, Classification)
            scores = dict(zip(labels, value.scores, strict=True)) if body.all_scores else None
            shaped.append(Label.model_construct(
                label=value.label, score=value.score, scores=scores, truncated=item.truncated
            ))  # fmt: skip
        return shaped
    rows = cast("list[list[float]]", values)
    embeddings: Sequence[list[float] | list[int] | list[list[float]] | str]
    if body.token_embeddings:
        embeddings = [cast("TokenVectors", v).array().tolist() for v in values]
    elif body.embedding_type == "float":
        embeddings = [vector(row, body.encoding_format) for row in rows]
    else:
        array = as_type(model, items, rows, body.embedding_type)
        embeddings = as_base64(array) if body.encoding_format == "base64" else array.tolist()
    return [
        Embedding.model_construct(embedding=e, truncated=item.truncated)
        for e, item in zip(embeddings, items, strict=True)
    ]


@router.post(
    "/predict",
    response_model=EmbeddingResponse | LabelResponse | SparseResponse,
    summary="Predict for one text or image; batched with concurrent requests",
    responses=PREDICT_ERRORS,
    openapi_extra=upload_openapi(openapi_body(PredictRequest)),
)
async def predict(request: Request) -> Response:
    runtime = runtime_of(request)
    upload = None
    if is_upload(request):
        body, upload = await parse_upload(request)
    else:
        body = await parse(request, PredictRequest, runtime)
    served, engine = serving(runtime, request, body.model)
    model = served.encoder
    deadline = deadline_of(engine, runtime, request)
    if body.text is not None:
        pair = None if body.text_pair is None else [body.text_pair]
        [item] = await encode(request, [body.text], pair, body)
        check_tokens([item], model, runtime, "text", body.truncate)
    else:
        assert body.image is not None
        [item] = await encode_images(request, [upload or body.image], body, "image")
    call = request.state.call
    if call.chunks or call.computed is not None:  # as windows, or without the engine
        [result] = await submit_all(request, runtime, engine, [item], deadline)
    else:
        lane = lane_of(request, runtime, 1)
        submitted = engine.submit(item, deadline=deadline, lane=lane)
        result = await unless_disconnected(request, runtime, submitted)
    [shaped] = _shape(model, [result.value], [item], body)
    kind: type[PredictMeta] = EmbeddingResponse
    if isinstance(shaped, Label | Sparse):
        kind = LabelResponse if isinstance(shaped, Label) else SparseResponse
    return reply(request, kind.model_construct(**shaped.__dict__, **meta(request, model)), [result])


@router.post(
    "/predict/batch",
    response_model=BatchResponse,
    summary="Predict for several texts or images; each is batched on its own, results in order",
    responses=PREDICT_ERRORS,
    openapi_extra=openapi_body(BatchPredictRequest),
)
async def predict_batch(request: Request) -> Response:
    runtime = runtime_of(request)
    body = await parse(request, BatchPredictRequest, runtime)
    served, engine = serving(runtime, request, body.model)
    model = served.encoder
    deadline = deadline_of(engine, runtime, request)
    if body.texts is not None:
        items = await encode(request, body.texts, body.text_pairs, body)
        check_tokens(items, model, runtime, "texts", body.truncate)
    else:
        assert body.images is not None
        items = await encode_images(request, body.images, body, "images")
    results = await submit_all(request, runtime, engine, items, deadline)
    shaped = _shape(model, [r.value for r in results], items, body)
    return reply(
        request, BatchResponse.model_construct(results=shaped, **meta(request, model)), results
    )
