"""Cohere's (and Jina's) rerank API: `POST /v1/rerank` with `documents`, answered
`{"results": [{"index", "relevance_score", "document"?}], ...}`, best first. Errors, on
`/v1/*`, in OpenAI's shape like the rest of `/v1`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from server.routes.parsing import (
    openapi_body,
    parse,
    rank,
    reply,
    runtime_of,
)
from server.schemas import OpenAIErrorReply, OutputOptions, Text, Texts, error_responses

router = APIRouter(prefix="/v1", tags=["Cohere"])


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
    model: StrictStr | None = Field(None, description="Accepted; the served model answers.")
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
    "/rerank",
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
        options=OutputOptions(), truncate=None, top_n=body.top_n,
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
        model=runtime.encoder.name,
        usage=RerankUsage(prompt_tokens=ranking.tokens, total_tokens=ranking.tokens),
    )
    return reply(response.model_dump_json(exclude_none=True).encode(), ranking.results)
