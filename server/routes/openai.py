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
from server.routes.parsing import (
    RuntimeDep,
    check_tokens,
    deadline_of,
    encode_inputs,
    needs_task,
    openapi_body,
    parse,
    reply,
    runtime_of,
    serving,
    submit_all,
    vector,
)
from server.schemas import Inputs, OpenAIErrorReply, OutputOptions, error_responses

router = APIRouter(prefix="/v1", tags=["OpenAI"])

STARTED = int(time.time())
"""`created` of the served model: when this process started."""


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request. `model` may name any model: the server embeds with the
    one it serves, and says which in the reply (clients hard-code OpenAI's names)."""

    model_config = ConfigDict(extra="forbid")

    input: Inputs
    model: StrictStr | None = Field(None, description="Accepted; the served model answers.")
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
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "microbatch"


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
    model, engine = serving(runtime, request)
    needs_task(model, "embed", "/v1/embeddings", "an embedding model")
    deadline = deadline_of(engine, runtime, request)
    options = OutputOptions(dimensions=body.dimensions)
    items = await encode_inputs(runtime, body.input, options, "input")
    check_tokens(items, model, runtime, "input", None, listed=True)
    results = await submit_all(request, runtime, engine, items, deadline)
    tokens = sum(len(item.ids) for item in items)
    data = [
        EmbeddingObject.model_construct(
            index=i, embedding=vector(cast("list[float]", r.value), body.encoding_format)
        )
        for i, r in enumerate(results)
    ]
    response = EmbeddingsResponse.model_construct(
        data=data, model=model.name, usage=Usage(prompt_tokens=tokens, total_tokens=tokens)
    )
    return reply(response, results)


def _model(runtime: RuntimeDep) -> ModelObject:
    return ModelObject(id=runtime.encoder.name, created=STARTED)


@router.get("/models", response_model=ModelList, summary="The served model (OpenAI's shape)")
async def list_models(runtime: RuntimeDep) -> ModelList:
    return ModelList(data=[_model(runtime)])


@router.get(
    "/models/{model_id:path}",
    response_model=ModelObject,
    summary="One model (OpenAI's shape); 404 unless it is the served one",
)
async def retrieve_model(model_id: str, runtime: RuntimeDep) -> ModelObject:
    served = _model(runtime)
    if model_id != served.id:
        raise NotFound(f"the model {model_id!r} does not exist; this server runs {served.id!r}")
    return served
