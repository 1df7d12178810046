"""Text Embeddings Inference's HTTP API: `/embed`, `/rerank`, `/tokenize` and `/info`,
in TEI's request and reply shapes, so that a TEI client needs only a new URL. Errors
carry TEI's `error` and `error_type` beside our own fields (`server.errors`)."""

from __future__ import annotations

from typing import Literal, cast

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, TypeAdapter

from batcher.models import TruncationDirection
from server.routes.parsing import (
    RuntimeDep,
    check_tokens,
    deadline_of,
    encode_inputs,
    invalid,
    needs_task,
    openapi_body,
    parse,
    rank,
    reply,
    runtime_of,
    serving,
    submit_all,
    to_json,
)
from server.schemas import Inputs, OutputOptions, TEIErrorReply, Text, Texts, error_responses

router = APIRouter(tags=["TEI"])

TEI_ERRORS = error_responses(TEIErrorReply)

Direction = Literal["right", "left", "Right", "Left"]
"""TEI's `truncation_direction` (its enum is spelled Right/Left on the wire)."""


def _direction(value: Direction) -> TruncationDirection:
    return "left" if value.lower() == "left" else "right"


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: Inputs
    normalize: StrictBool = Field(True, description="L2-normalise (TEI's default: true).")
    truncate: StrictBool | None = Field(
        None, description="Cut inputs over the token limit (false: 422). Default: --truncate."
    )
    truncation_direction: Direction = Field("right", description="Which end to cut.")
    prompt_name: StrictStr | None = Field(None, description="One of the model's prompts.")
    dimensions: StrictInt | None = Field(None, ge=1, description="Keep the first N values.")


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: StrictStr | Texts = Field(description="A text or texts.")
    add_special_tokens: StrictBool = Field(True, description="Include [CLS], [SEP], ...")
    prompt_name: StrictStr | None = Field(None, description="Put this prompt first.")


class SimpleToken(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None = Field(description="Character offset in the input; null if special.")
    stop: int | None


class RerankRequest(BaseModel):
    """TEI's rerank request."""

    model_config = ConfigDict(extra="forbid")

    query: Text
    texts: Texts = Field(
        min_length=1, description="Texts to score against the query; each pair is batched."
    )
    top_n: StrictInt | None = Field(None, ge=1, description="Return only the best N.")
    return_text: StrictBool = Field(False, description="Include each text in its result.")
    raw_scores: StrictBool = Field(False, description="The logits, without the activation.")
    truncate: StrictBool | None = Field(
        None, description="Cut pairs over the token limit (false: 422). Default: --truncate."
    )
    truncation_direction: Direction = Field("right", description="Which end to cut.")


class RerankResult(BaseModel):
    index: int = Field(description="Position of the text in the request.")
    score: float = Field(description="Relevance (the cross-encoder's activated score).")
    text: str | None = Field(None, description="The text, with return_text.")


class Info(BaseModel):
    """TEI's `/info`, with the fields that apply to this server."""

    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_type: dict[str, dict[str, object]] = Field(
        description='{"embedding": {"pooling": ...}}, or {"classifier"|"reranker": '
        "{id2label, label2id}}."
    )
    max_concurrent_requests: int = Field(description="Items the queue holds (429 beyond).")
    max_input_length: int = Field(description="The model's token limit.")
    max_batch_tokens: int | None
    max_batch_requests: int = Field(description="Items per forward pass.")
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int = Field(
        description="Processes that tokenize: one per front-end (--workers), each with its "
        "tokenizer thread."
    )
    version: str
    sha: str | None = None
    docker_label: str | None = None


_TOKENS = TypeAdapter(list[list[SimpleToken]])
_RANKED = TypeAdapter(list[RerankResult])


@router.post(
    "/embed",
    response_model=list[list[float]],
    summary="Embed texts or token ids (TEI's shape): one vector per input, in order",
    responses=TEI_ERRORS,
    openapi_extra=openapi_body(EmbedRequest, {"inputs": ["What is Deep Learning?"]}),
)
async def embed(request: Request) -> Response:
    runtime = runtime_of(request)
    body = await parse(request, EmbedRequest, runtime)
    model, engine = serving(runtime, request)
    needs_task(model, "embed", "/embed", "an embedding model")
    deadline = deadline_of(engine, runtime, request)
    options = OutputOptions(
        normalize=body.normalize, prompt_name=body.prompt_name, dimensions=body.dimensions
    )
    direction = _direction(body.truncation_direction)
    items = await encode_inputs(runtime, body.inputs, options, "inputs", direction)
    check_tokens(items, model, runtime, "inputs", body.truncate, listed=True)
    results = await submit_all(request, runtime, engine, items, deadline)
    vectors = [cast("list[float]", r.value) for r in results]
    return reply(to_json(vectors), results)


@router.post(
    "/rerank",
    response_model=list[RerankResult],
    summary="Score texts against a query with a cross-encoder, best first (TEI's shape)",
    responses=TEI_ERRORS,
    openapi_extra=openapi_body(RerankRequest, {"query": "What is Deep Learning?",
                               "texts": ["Deep Learning is ...", "Paris is in France."]}),
)  # fmt: skip
async def rerank(request: Request) -> Response:
    runtime = runtime_of(request)
    body = await parse(request, RerankRequest, runtime)
    ranking = await rank(
        request, runtime, "/rerank", body.query, body.texts, field="texts",
        options=OutputOptions(raw_scores=body.raw_scores), truncate=body.truncate,
        top_n=body.top_n, truncation_direction=_direction(body.truncation_direction),
    )  # fmt: skip
    ranked = [
        RerankResult.model_construct(
            index=i, score=ranking.scores[i], text=body.texts[i] if body.return_text else None
        )
        for i in ranking.order
    ]
    return reply(_RANKED.dump_json(ranked, exclude_none=True), ranking.results)


@router.post(
    "/tokenize",
    response_model=list[list[SimpleToken]],
    summary="The tokens the model sees for each text (TEI's shape)",
    responses=TEI_ERRORS,
    openapi_extra=openapi_body(TokenizeRequest, {"inputs": "What is Deep Learning?"}),
)
async def tokenize(request: Request) -> Response:
    runtime = runtime_of(request)
    body = await parse(request, TokenizeRequest, runtime)
    serving(runtime, request)  # 503 unless ready
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    try:
        tokens = await runtime.tokenizer.tokenize(texts, body.add_special_tokens, body.prompt_name)
    except ValueError as exc:  # InvalidOption: an unknown prompt
        raise invalid("prompt_name", str(exc)) from None
    shaped = [
        [
            SimpleToken.model_construct(
                id=t.id, text=t.text, special=t.special, start=t.start, stop=t.stop
            )
            for t in ts
        ]
        for ts in tokens
    ]
    return Response(_TOKENS.dump_json(shaped), media_type="application/json")


@router.get("/info", response_model=Info, summary="Model and limits (TEI's shape)")
async def info(request: Request, runtime: RuntimeDep) -> Info:
    model, settings = runtime.encoder, runtime.settings
    described = runtime.describe()
    config = runtime.engine.stats().config
    if model.task == "embed":
        pooling = described.get("pooling") or ["mean"]
        model_type: dict[str, dict[str, object]] = {
            "embedding": {"pooling": "+".join(map(str, cast("list[object]", pooling)))}
        }
    else:
        id2label = {str(i): label for i, label in enumerate(model.labels)}
        labels = {"id2label": id2label, "label2id": {v: int(k) for k, v in id2label.items()}}
        model_type = {"reranker" if model.task == "rerank" else "classifier": labels}
    return Info(
        model_id=model.name,
        model_dtype=str(described.get("dtype", "float32")),
        model_type=model_type,
        max_concurrent_requests=config.max_queue_size,
        max_input_length=model.max_tokens,
        max_batch_tokens=config.max_batch_tokens,
        max_batch_requests=config.max_batch_size,
        max_client_batch_size=settings.max_client_batch,
        auto_truncate=settings.truncate,
        tokenization_workers=runtime.settings.workers,
        version=request.app.version,
    )
