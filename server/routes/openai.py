"""OpenAI's embeddings API: `POST /v1/embeddings`, `GET /v1/models`, `GET
/v1/models/{id}`, as the `openai` SDK calls them, so that a client built on it (LangChain,
LlamaIndex, genai-perf) needs only a `base_url`. Errors on `/v1/*` come in OpenAI's shape
(`server.errors`)."""

from __future__ import annotations

import time
from typing import Literal, cast

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from server.errors import NotFound
from server.routes.admin import summaries
from server.routes.encoding import check_tokens, encode_inputs
from server.routes.headers import deadline_of
from server.routes.parsing import (
    RuntimeDep,
    needs_task,
    openapi_body,
    parse,
    reply,
    runtime_of,
    serving,
    submit_all,
    vector,
)
from server.runtime import Runtime
from server.schemas import MODEL_ANSWERS, Inputs, OpenAIErrorReply, OutputOptions, error_responses

router = APIRouter(prefix="/v1", tags=["OpenAI"])

STARTED = int(time.time())
"""`created` of the served model: when this process started."""


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request. `model` picks one of the served models; where only
    one is served, any name is accepted (clients hard-code OpenAI's names), and the
    reply says which model answered."""

    model_config = ConfigDict(extra="forbid")

    input: Inputs
    model: StrictStr | None = Field(None, description=MODEL_ANSWERS)
    encoding_format: Literal["float", "base64"] = Field(
        "float",
        description="base64: little-endian float32 bytes, as OpenAI sends them (the SDK's "
        "default).",
    )
    dimensions: StrictInt | None = Field(
        None, ge=1, description="Keep the first N values (Matryoshka), then normalise."
    )
    user: StrictStr | None = Field(None, description="Accepted and ignored.")


class EmbeddingObject(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens the model read, special tokens included.")
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: Usage


class ModelObject(BaseModel):
    """OpenAI's model object, with what this server knows of it besides."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "microbatch"
    task: str | None = Field(None, description="embed, classify or rerank.")
    pooling: list[str] | None = Field(None, description="embed: the pooling modes.")
    version: str = Field("1", description="Its version; NAME@VERSION pins it.")
    status: str = Field("ready", description="loading, warming, ready, draining or failed.")
    default: bool = Field(True, description="Whether it answers requests naming no model.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


@router.post(
    "/embeddings",
    response_model=EmbeddingsResponse,
    summary="Embed texts or token ids (OpenAI's shape)",
    responses=error_responses(OpenAIErrorReply, invalid_status=400),
    openapi_extra=openapi_body(
        EmbeddingsRequest, {"input": ["What is Deep Learning?"], "model": "any"}
    ),
)
async def embeddings(request: Request) -> Response:
    """Each input is one item in the queue, batched with everything in flight."""
    runtime = runtime_of(request)
    body = await parse(request, EmbeddingsRequest, runtime)
    served, engine = serving(runtime, request, body.model)
    model = served.encoder
    needs_task(model, "embed", "/v1/embeddings", "an embedding model")
    deadline = deadline_of(engine, runtime, request)
    options = OutputOptions(dimensions=body.dimensions)
    items = await encode_inputs(request, body.input, options, "input")
    check_tokens(items, model, runtime, "input", None, listed=True)
    results = await submit_all(request, runtime, engine, items, deadline)
    tokens = sum(item.n_tokens for item in items)
    data = [
        EmbeddingObject.model_construct(
            index=i, embedding=vector(cast("list[float]", r.value), body.encoding_format)
        )
        for i, r in enumerate(results)
    ]
    response = EmbeddingsResponse.model_construct(
        data=data,
        model=model.name,
        usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
    )
    return reply(request, response, results)


def _models(runtime: Runtime) -> list[ModelObject]:
    return [
        ModelObject(
            id=summary.name,
            created=STARTED,
            version=summary.version,
            task=summary.task,
            pooling=summary.pooling,
            status=summary.status,
            default=summary.default,
        )
        for summary in summaries(runtime)
    ]


@router.get("/models", response_model=ModelList, summary="The served models (OpenAI's shape)")
async def list_models(runtime: RuntimeDep) -> ModelList:
    return ModelList(data=_models(runtime))


@router.get(
    "/models/{model_id:path}",
    response_model=ModelObject,
    summary="One model (OpenAI's shape); 404 unless it is served here",
)
async def retrieve_model(model_id: str, runtime: RuntimeDep) -> ModelObject:
    models = _models(runtime)
    for model in models:
        if model.id == model_id:
            return model
    served = ", ".join(repr(m.id) for m in models)
    raise NotFound(f"the model {model_id!r} does not exist; this server runs {served}")
