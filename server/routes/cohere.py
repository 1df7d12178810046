"""Cohere's (and Jina's) rerank API: `POST /v1/rerank` with `documents`, answered
`{"results": [{"index", "relevance_score", "document"?}], ...}`, best first, errors in
OpenAI's shape like the rest of `/v1`; and Cohere's v2, `POST /v2/rerank`, as
`cohere.ClientV2.rerank` calls it, answered `{"id", "results": [{"index",
"relevance_score"}], "meta"}`, errors with Cohere's `message`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from server.routes.parsing import (
    invalid,
    openapi_body,
    parse,
    reply,
    runtime_of,
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
