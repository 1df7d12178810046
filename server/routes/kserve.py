"""The Open Inference Protocol (KServe v2, as Triton, KServe, Seldon MLServer and
TorchServe speak it) over HTTP: server and model metadata, liveness and readiness, and
inference with texts as BYTES tensors, in JSON or with Triton's binary tensor extension.
The gRPC service (`server.kserve.grpc_service`) answers through these same routes.

Every text of a request joins the micro-batch on its own, as on `/predict/batch`. A
model's name is its served name; `NAME/versions/V` pins version V, and a name without a
version follows the model's route (its traffic split). Where one model is served, it
answers to any name, as on the other routes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse

from server.errors import NotFound
from server.kserve.signatures import (
    images_of,
    inputs_of,
    outputs_for,
    outputs_of,
    parameters,
    texts_of,
    wanted,
)
from server.kserve.tensors import (
    HEADER_LENGTH,
    header_length,
    invalid,
    read_request,
    write_response,
)
from server.routes.encoding import check_tokens, encode, encode_images
from server.routes.headers import deadline_of
from server.routes.parsing import (
    PREDICT_ERRORS,
    RuntimeDep,
    body_of,
    reply,
    runtime_of,
    serving,
    submit_all,
)
from server.routes.probes import not_ready
from server.runtime import Runtime
from server.served import Served

router = APIRouter(tags=["Open Inference Protocol (KServe v2)"])

EXTENSIONS = ["binary_tensor_data"]
PLATFORM = "microbatch"


@router.get("/v2", summary="Server metadata: name, version, protocol extensions")
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": "microbatch", "version": request.app.version, "extensions": EXTENSIONS}


@router.get("/v2/health/live", summary="Liveness, as GET /health (200 or 503)")
async def server_live(runtime: RuntimeDep) -> Response:
    live = runtime.liveness_problem() is None
    return JSONResponse({"live": live}, status_code=200 if live else 503)


@router.get("/v2/health/ready", summary="Readiness, as GET /ready (200 or 503)")
async def server_ready(runtime: RuntimeDep) -> Response:
    ready = not_ready(runtime) is None
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


def version_of(runtime: Runtime, name: str, version: str | None = None) -> Served:
    """The version `name` (and `version`) means: the one pinned, or the one the model's
    route prefers. Raises UnknownModel (404)."""
    return runtime.model(name if version is None else f"{name}@{version}")


def metadata(runtime: Runtime, served: Served) -> dict[str, Any]:
    model = served.encoder
    versions = [s.version for s in runtime.models.values() if s.name == served.name]
    return {
        "name": served.name or model.name,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": [spec.describe() for spec in inputs_of(model)],
        "outputs": [s.describe() for s in outputs_of(model, served.describe().get("dimension"))],
    }


async def model_metadata(name: str, runtime: RuntimeDep) -> dict[str, Any]:
    if name.endswith("/infer"):  # `{name:path}` would take it for a model's name
        raise HTTPException(405, "POST to .../infer; GET the model's metadata without it")
    return metadata(runtime, version_of(runtime, name))


async def version_metadata(name: str, version: str, runtime: RuntimeDep) -> dict[str, Any]:
    return metadata(runtime, version_of(runtime, name, version))


def _ready(runtime: Runtime, name: str, version: str | None) -> Response:
    served = version_of(runtime, name, version)
    ready = served.serving and runtime.status == "ready"
    body = {"name": served.name or served.encoder.name, "ready": ready}
    return JSONResponse(body, status_code=200 if ready else 503)


async def model_ready(name: str, runtime: RuntimeDep) -> Response:
    return _ready(runtime, name, None)


async def version_ready(name: str, version: str, runtime: RuntimeDep) -> Response:
    return _ready(runtime, name, version)


INFER: dict[str, Any] = {
    "summary": "Inference: texts as a BYTES tensor, each batched on its own",
    "responses": PREDICT_ERRORS,
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"type": "object"}, "example": {
                    "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2],
                                "data": ["first text", "second text"]}],
                    "parameters": {"normalize": True},
                }},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
    },
}  # fmt: skip


def infer_openapi(*more: str) -> dict[str, Any]:
    """The OpenAPI of an infer route, which reads its path's parameters itself."""
    path = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in ("name", *more)]  # fmt: skip
    return {**INFER, "openapi_extra": {**INFER["openapi_extra"], "parameters": path}}


async def infer(request: Request) -> Response:
    return await _infer(request, request.path_params["name"], None)


async def infer_version(request: Request) -> Response:
    params = request.path_params
    return await _infer(request, params["name"], params["version"])


async def _infer(request: Request, name: str, version: str | None) -> Response:
    runtime = runtime_of(request)
    raw = await body_of(request)
    settings = runtime.settings
    json_size = header_length(request.headers.get(HEADER_LENGTH), len(raw))
    parsed = read_request(raw, json_size, settings.max_client_batch)
    served, engine = serving(runtime, request, name if version is None else f"{name}@{version}")
    model = served.encoder
    if model.task == "sparse":
        raise NotFound("sparse models are served on /embed_sparse and /predict, not as tensors")
    asked = parameters(parsed)
    if asked.top_n is not None and model.task != "rerank":
        raise invalid(("parameters", "top_n"), "top_n applies to rerank models")
    binary = wanted(model, parsed)
    images = images_of(model, parsed, settings.max_client_batch)
    texts = None
    if images is None:
        texts = texts_of(model, parsed, settings.max_client_batch, settings.max_text_chars)
    deadline = deadline_of(engine, runtime, request)
    if asked.timeout is not None:  # Triton's own deadline, in microseconds
        deadline = min(deadline, engine.clock() + asked.timeout / 1e6)
    if texts is not None:
        direction = asked.truncation_direction
        items = await encode(request, texts.texts, texts.pairs, asked, direction)
        check_tokens(items, model, runtime, "text", asked.truncate, listed=True)
    else:
        assert images is not None
        items = await encode_images(request, images, asked, "image", listed=True)
    by_size = texts is None or texts.by_size
    results = await submit_all(request, runtime, engine, items, deadline, by_size=by_size)
    outputs = outputs_for(model, results, asked)
    head = {"model_name": served.name or model.name, "model_version": served.version}
    if parsed.id is not None:
        head["id"] = parsed.id
    body, json_size = write_response(head, [o for o in outputs if o.name in binary], binary)
    if json_size is None:
        return reply(request, body, results)
    extra = {HEADER_LENGTH: str(json_size)}
    return reply(request, body, results, "application/octet-stream", extra)


# A model's name may hold slashes (a hub id), so each path below ends in its own words
# and the more specific go first: Starlette takes the first that matches.
MODEL = "/v2/models/{name:path}"
VERSION = MODEL + "/versions/{version}"
router.add_api_route(
    VERSION + "/infer", infer_version, methods=["POST"], **infer_openapi("version")
)
router.add_api_route(MODEL + "/infer", infer, methods=["POST"], **infer_openapi())
router.add_api_route(VERSION + "/ready", version_ready, summary="Whether a version is ready")
router.add_api_route(
    MODEL + "/ready", model_ready, summary="Whether the model takes requests (200 or 503)"
)
router.add_api_route(VERSION, version_metadata, summary="A version's metadata")
router.add_api_route(MODEL, model_metadata, summary="A model's metadata: versions and tensors")
