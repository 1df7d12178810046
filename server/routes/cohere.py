"""Cohere's (and Jina's) rerank API: `POST /v1/rerank` with `documents`, answered
`{"results": [{"index", "relevance_score", "document"?}], ...}`, best first, errors in
OpenAI's shape like the rest of `/v1`; and Cohere's v2, `POST /v2/rerank` and
`POST /v2/embed`, as `cohere.ClientV2` calls them, errors with Cohere's `message`."""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from batcher.models import EmbeddingType, TruncationDirection
from server.routes.embedding_types import as_base64, as_type, check_embedding_type
from server.routes.encoding import check_tokens, encode_images, encode_inputs, first_prompt
from server.routes.headers import deadline_of
from server.routes.parsing import (
    invalid,
    needs_task,
    openapi_body,
    parse,
    reply,
    runtime_of,
    serving,
    submit_all,
    to_json,
)
from server.routes.ranking import rank
from server.schemas import (
    MODEL_ANSWERS,
    ErrorReply,
    OpenAIErrorReply,
    OutputOptions,
    Text,
    Texts,
    error_responses,
    within_count,
)

router = APIRouter(tags=["Cohere"])


def _document_texts(value: Any) -> Any:
    """Cohere's v1 API also takes documents as objects with a `text`."""
    if isinstance(value, list):
        return [d["text"] if isinstance(d, dict) and set(d) == {"text"} else d for d in value]
    return value


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: Text
    documents: Annotated[Texts, BeforeValidator(_document_texts)] = Field(
        min_length=1, description='Texts (or {"text": ...}) to score against the query.'
    )
    top_n: StrictInt | None = Field(None, ge=1, description="Return only the best N.")
    return_documents: StrictBool = Field(False, description="Include each document.")
    model: StrictStr | None = Field(None, description=MODEL_ANSWERS)
    max_chunks_per_doc: StrictInt | None = Field(
        None, description="Accepted and ignored: a document over the token limit is cut."
    )


class Document(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float = Field(description="The cross-encoder's activated score.")
    document: Document | None = Field(None, description="With return_documents.")


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    id: str = Field(description="This request's id (X-Request-ID).")
    results: list[RerankResult]
    model: str
    usage: RerankUsage


@router.post(
    "/v1/rerank",
    response_model=RerankResponse,
    response_model_exclude_none=True,
    summary="Rank documents against a query with a cross-encoder (Cohere's and Jina's shape)",
    responses=error_responses(OpenAIErrorReply, invalid_status=400),
    openapi_extra=openapi_body(RerankRequest, {"query": "What is Deep Learning?",
                               "documents": ["Deep Learning is ...", "Paris is in France."],
                               "top_n": 1, "return_documents": True}),
)  # fmt: skip
async def rerank(request: Request) -> Response:
    runtime = runtime_of(request)
    body = await parse(request, RerankRequest, runtime)
    docs = body.documents
    ranking = await rank(
        request, runtime, "/v1/rerank", body.query, docs, field="documents",
        options=OutputOptions(), truncate=None, top_n=body.top_n, model_name=body.model,
    )  # fmt: skip
    ranked = [
        RerankResult.model_construct(
            index=i,
            relevance_score=ranking.scores[i],
            document=Document(text=docs[i]) if body.return_documents else None,
        )
        for i in ranking.order
    ]
    response = RerankResponse.model_construct(
        id=request.state.request_id,
        results=ranked,
        model=ranking.model,
        usage=RerankUsage(prompt_tokens=ranking.tokens, total_tokens=ranking.tokens),
    )
    return reply(request, response.model_dump_json(exclude_none=True).encode(), ranking.results)


class V2RerankRequest(BaseModel):
    """Cohere's v2 rerank request, as `cohere.ClientV2.rerank` sends it."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = Field(None, description=MODEL_ANSWERS)
    query: Text
    documents: Texts = Field(min_length=1, description="Texts to score against the query.")
    top_n: StrictInt | None = Field(None, ge=1, description="Return only the best N.")
    max_tokens_per_doc: StrictInt | None = Field(
        None,
        ge=1,
        description="Accepted at or above the model's token limit (documents are cut there); "
        "a lower value is refused.",
    )
    priority: StrictInt | None = Field(None, description="Accepted and ignored.")


class V2RerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float = Field(description="The cross-encoder's activated score.")


class ApiVersion(BaseModel):
    version: str = "2"


class MetaTokens(BaseModel):
    input_tokens: int


class V2Meta(BaseModel):
    api_version: ApiVersion
    tokens: MetaTokens


class V2RerankResponse(BaseModel):
    id: str = Field(description="This request's id (X-Request-ID).")
    results: list[V2RerankResult]
    meta: V2Meta


@router.post(
    "/v2/rerank",
    response_model=V2RerankResponse,
    summary="Rank documents against a query with a cross-encoder (Cohere's v2 shape)",
    responses=error_responses(ErrorReply, invalid_status=400),
    openapi_extra=openapi_body(V2RerankRequest, {"model": "rerank", "query": "What is Deep "
                               "Learning?", "documents": ["Deep Learning is ...",
                               "Paris is in France."], "top_n": 1}),
)  # fmt: skip
async def rerank_v2(request: Request) -> Response:
    runtime = runtime_of(request)
    body = await parse(request, V2RerankRequest, runtime)
    limit = runtime.model(body.model).encoder.max_tokens
    if body.max_tokens_per_doc is not None and body.max_tokens_per_doc < limit:
        raise invalid(
            "max_tokens_per_doc",
            f"documents are cut at the model's limit of {limit} tokens; "
            f"max_tokens_per_doc {body.max_tokens_per_doc} (below it) is not supported",
        )
    ranking = await rank(
        request, runtime, "/v2/rerank", body.query, body.documents, field="documents",
        options=OutputOptions(), truncate=None, top_n=body.top_n, model_name=body.model,
    )  # fmt: skip
    response = V2RerankResponse.model_construct(
        id=request.state.request_id,
        results=[
            V2RerankResult.model_construct(index=i, relevance_score=ranking.scores[i])
            for i in ranking.order
        ],
        meta=V2Meta(api_version=ApiVersion(), tokens=MetaTokens(input_tokens=ranking.tokens)),
    )
    return reply(request, response.model_dump_json().encode(), ranking.results)


CohereType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]
EmbedInputType = Literal["search_document", "search_query", "classification", "clustering", "image"]

COHERE_PROMPTS: dict[str, tuple[str, ...]] = {
    "search_query": ("search_query", "query"),
    "search_document": ("search_document", "document", "passage", "corpus"),
    "classification": ("classification",),
    "clustering": ("clustering",),
}
"""`input_type` -> the prompt names it takes, in order: the first the model declares is
put before the texts; a model that declares none of them gets its default prompt (as
sentence-transformers' `encode_query` and `encode_document` do)."""


class EmbedText(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class EmbedInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: list[EmbedText] = Field(min_length=1, max_length=1)


class V2EmbedRequest(BaseModel):
    """Cohere's v2 embed request, as `cohere.ClientV2.embed` sends it."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = Field(None, description=MODEL_ANSWERS)
    texts: Texts | None = Field(None, min_length=1, description="Texts to embed.")
    inputs: Annotated[list[EmbedInput], BeforeValidator(within_count)] | None = Field(
        None,
        min_length=1,
        description='Inputs of one text part each: {"content": [{"type": "text", "text": ...}]}.',
    )
    images: Annotated[list[StrictStr], BeforeValidator(within_count)] | None = Field(
        None, min_length=1, description="Images as data URIs (data:image/png;base64,...), "
        "for an image model (CLIP, SigLIP); with input_type image.",
    )  # fmt: skip
    input_type: EmbedInputType | None = Field(
        None,
        description="Picks the model's prompt: search_query -> its query prompt, "
        "search_document -> its document, passage or corpus prompt, classification and "
        "clustering -> the prompt of that name; otherwise (or when absent) its default "
        "prompt.",
    )
    embedding_types: list[CohereType] | None = Field(
        None,
        min_length=1,
        description="Any of float, int8, uint8, binary, ubinary, base64 "
        "(float32 bytes), all in one reply. Default: float.",
    )
    output_dimension: StrictInt | None = Field(
        None, ge=1, description="Keep the first N values (Matryoshka), then normalise."
    )
    max_tokens: StrictInt | None = Field(
        None, ge=1, description="Accepted at or above the model's token limit; lower is refused."
    )
    truncate: Literal["NONE", "START", "END"] = Field(
        "END",
        description="An input over the token limit: NONE refuses it (400), START cuts "
        "its start, END its end.",
    )
    priority: StrictInt | None = Field(None, description="Accepted and ignored.")


class EmbeddingsByType(BaseModel):
    float_: list[list[float]] | None = Field(None, alias="float")
    int8: list[list[int]] | None = None
    uint8: list[list[int]] | None = None
    binary: list[list[int]] | None = None
    ubinary: list[list[int]] | None = None
    base64: list[str] | None = Field(None, description="Little-endian float32 bytes.")


class BilledUnits(BaseModel):
    input_tokens: int


class V2EmbedMeta(BaseModel):
    api_version: ApiVersion
    billed_units: BilledUnits


class V2EmbedResponse(BaseModel):
    id: str = Field(description="This request's id (X-Request-ID).")
    response_type: Literal["embeddings_by_type"] = "embeddings_by_type"
    embeddings: EmbeddingsByType = Field(description="One list per embedding type asked for.")
    texts: list[str]
    meta: V2EmbedMeta


def _v2_texts(body: V2EmbedRequest) -> list[str]:
    given = [f for f in ("texts", "inputs", "images") if getattr(body, f) is not None]
    if len(given) != 1:
        raise invalid("texts", "send texts, inputs of one text each, or images (one of them)")
    if body.images is not None:
        return body.images
    if body.input_type == "image":
        raise invalid("input_type", "input_type image goes with images")
    if body.texts is not None:
        return body.texts
    assert body.inputs is not None
    return [i.content[0].text for i in body.inputs]


@router.post(
    "/v2/embed",
    response_model=V2EmbedResponse,
    response_model_exclude_none=True,
    summary="Embed texts as float, int8, uint8, binary, ubinary or base64 (Cohere's v2 shape)",
    responses=error_responses(ErrorReply, invalid_status=400),
    openapi_extra=openapi_body(V2EmbedRequest, {"model": "embed", "texts": ["What is Deep "
                               "Learning?"], "input_type": "search_query",
                               "embedding_types": ["float", "int8", "ubinary"]}),
)  # fmt: skip
async def embed_v2(request: Request) -> Response:
    runtime = runtime_of(request)
    body = await parse(request, V2EmbedRequest, runtime)
    texts = _v2_texts(body)
    served, engine = serving(runtime, request, body.model)
    model = served.encoder
    needs_task(model, "embed", "/v2/embed", "an embedding model")
    if body.max_tokens is not None and body.max_tokens < model.max_tokens:
        raise invalid(
            "max_tokens",
            f"inputs are cut at the model's limit of {model.max_tokens} tokens; "
            f"max_tokens {body.max_tokens} (below it) is not supported",
        )
    kinds = list(dict.fromkeys(body.embedding_types or ["float"]))
    typed = cast("list[EmbeddingType]", [k for k in kinds if k != "base64"])
    for kind in typed:
        check_embedding_type(model, kind, "embedding_types")
    deadline = deadline_of(engine, runtime, request)
    prompt = first_prompt(model, COHERE_PROMPTS.get(body.input_type or "", ()))
    options = OutputOptions(
        prompt_name=prompt, dimensions=body.output_dimension, truncate=body.truncate != "NONE"
    )
    direction: TruncationDirection = "left" if body.truncate == "START" else "right"
    field = next(f for f in ("texts", "inputs", "images") if getattr(body, f) is not None)
    if body.images is not None:
        options = OutputOptions(dimensions=body.output_dimension)
        items = await encode_images(request, texts, options, "images")
        texts = []
    else:
        items = await encode_inputs(request, texts, options, field, direction)
        check_tokens(items, model, runtime, field, body.truncate != "NONE", why="(truncate: NONE)")
    results = await submit_all(request, runtime, engine, items, deadline)
    rows = [cast("list[float]", r.value) for r in results]
    embeddings: dict[str, Any] = {}
    for kind in typed:
        embeddings[kind] = rows if kind == "float" else as_type(model, items, rows, kind).tolist()
    if "base64" in kinds:
        embeddings["base64"] = as_base64(np.asarray(rows, dtype=np.float32))
    tokens = sum(item.n_tokens for item in items)
    response = {
        "id": request.state.request_id,
        "response_type": "embeddings_by_type",
        "embeddings": embeddings,
        "texts": texts,
        "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": tokens}},
    }
    return reply(request, to_json(response), results)
