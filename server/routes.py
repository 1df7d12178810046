"""The HTTP routes: validate, admit, await, shape the reply. No batching logic here."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Coroutine, Sequence
from typing import Annotated, Any, TypeVar, cast

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, TypeAdapter, ValidationError

from batcher import Engine, Result
from batcher.models import Classification, Encoded, InvalidOption, Output
from server.errors import ClientDisconnected, NotReady, WrongTask
from server.runtime import Runtime, ServedModel
from server.schemas import (
    Batching,
    BatchingPatch,
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
    Status,
)

router = APIRouter()


async def get_runtime(request: Request) -> Runtime:
    # async on purpose: FastAPI runs a plain `def` dependency in its threadpool, a thread
    # hand-off on every request (seen in the profile of benchmarks/overhead.py).
    runtime: Runtime = request.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def _runtime(request: Request) -> Runtime:
    """The predict routes' way to the runtime: a plain call. Their only parameter is the
    request, since solving even one dependency costs FastAPI more than the rest of the
    route (benchmarks/results/overhead-cpu-2core-2026-11-22.md)."""
    runtime: Runtime = request.state.runtime
    return runtime


def _serving(runtime: Runtime) -> tuple[ServedModel, Engine[Encoded, Output]]:
    if runtime.status != "ready" or runtime.model is None or runtime.engine is None:
        raise NotReady(f"the server is {runtime.status}; retry when GET /ready says ready")
    return runtime.model, runtime.engine


def _loc(field: str, index: int) -> tuple[str | int, ...]:
    """Where an error is: a list field (`texts`, `text_pairs`) names the position too."""
    return ("body", field, index) if field.endswith("s") else ("body", field)


def _check_lengths(texts: Sequence[str], limit: int, field: str) -> None:
    errors = [
        {
            "loc": _loc(field, i),
            "msg": f"text has {len(t)} characters; the limit is {limit} (--max-text-chars)",
            "type": "string_too_long",
        }
        for i, t in enumerate(texts)
        if len(t) > limit
    ]
    if errors:
        raise RequestValidationError(errors)


def _check_tokens(
    items: Sequence[Encoded],
    model: ServedModel,
    runtime: Runtime,
    field: str,
    truncate: bool | None,
) -> None:
    allowed = runtime.settings.truncate if truncate is None else truncate
    if allowed:
        return
    why = "(the server runs with --no-truncate)" if truncate is None else "(truncate: false)"
    errors = [
        {
            "loc": _loc(field, i),
            "msg": f"input is over the model's limit of {model.max_tokens} tokens {why}",
            "type": "too_many_tokens",
        }
        for i, item in enumerate(items)
        if item.truncated
    ]
    if errors:
        raise RequestValidationError(errors)


def _invalid(field: str, msg: str, kind: str = "value_error") -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", field), "msg": msg, "type": kind}])


def _encode(
    model: ServedModel,
    texts: Sequence[str],
    pairs: Sequence[str] | None,
    body: OutputOptions,
) -> list[Encoded]:
    """Tokenize under the request's options; an option the model cannot honour is 422."""
    if body.all_scores and model.task == "embed":
        raise _invalid("all_scores", "all_scores applies to classify and rerank models")
    try:
        if len(texts) == 1 and pairs is None:
            return [model.encode(texts[0], None, body.options())]
        return model.encode_many(texts, pairs, body.options())
    except InvalidOption as exc:
        raise _invalid(exc.field, str(exc)) from None


def _check_count(count: int, limit: int, field: str) -> None:
    if count > limit:
        raise _invalid(
            field, f"{count} texts; the limit is {limit} (--max-client-batch)", "too_long"
        )


TIMEOUT_HEADER = "x-request-timeout-ms"

Body = TypeVar("Body", bound=BaseModel)
T = TypeVar("T")


PREDICT_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorReply, "description": "The body is not JSON (invalid_json)."},
    422: {"model": ErrorReply, "description": "JSON of the wrong shape, or over a limit."},
    429: {"model": ErrorReply, "description": "Queue full, deadline unreachable, or rate "
          "limited; see Retry-After."},
    503: {"model": ErrorReply, "description": "Warming up or draining; see Retry-After."},
    504: {"model": ErrorReply, "description": "The deadline passed before it was computed."},
}  # fmt: skip


def _openapi(body: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI of a predict route, which reads its body and header itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": body.model_json_schema()}},
        },
        "parameters": [
            {
                "name": TIMEOUT_HEADER,
                "in": "header",
                "required": False,
                "schema": {"type": "number", "exclusiveMinimum": 0},
                "description": "This request's deadline in milliseconds, instead of the "
                "server's --request-timeout-s (at most --max-request-timeout-s). 504 when "
                "it passes.",
            }
        ],
    }


async def _parse(request: Request, schema: type[Body]) -> Body:
    """The body, parsed and validated in one pass by pydantic's own JSON parser.

    The predict routes do this instead of declaring a body parameter: FastAPI would parse
    the JSON with the standard library and then validate the Python objects, which cost
    more than the rest of the route (see benchmarks/results/)."""
    raw = await request.body()
    try:
        return schema.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in errors]
        ) from None


def _invalid_timeout(msg: str, kind: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("header", TIMEOUT_HEADER), "msg": msg, "type": kind}])


def _deadline(engine: Engine[Encoded, Output], runtime: Runtime, request: Request) -> float:
    settings = runtime.settings
    timeout_s = settings.request_timeout_s
    header = request.headers.get(TIMEOUT_HEADER)
    if header is not None:
        try:
            timeout_ms = float(header)
        except ValueError:
            raise _invalid_timeout("must be a number of milliseconds", "float_parsing") from None
        if not timeout_ms > 0:
            raise _invalid_timeout("must be greater than 0", "greater_than")
        if not math.isfinite(timeout_ms) or timeout_ms / 1000 > settings.max_request_timeout_s:
            limit = settings.max_request_timeout_s * 1000
            raise _invalid_timeout(
                f"must be at most {limit:g} (--max-request-timeout-s)", "less_than_equal"
            )
        timeout_s = timeout_ms / 1000
    return engine.clock() + timeout_s


async def _unless_disconnected(
    request: Request, runtime: Runtime, waiting: Coroutine[Any, Any, T]
) -> T:
    """Await `waiting`, cancelling it when the client goes away: its items leave the
    queue without being computed (ClientDisconnected). One watcher task per request; the
    body was read already, so the next ASGI message can only be the disconnect."""
    task = asyncio.current_task()
    assert task is not None
    disconnected = finished = False

    async def watch() -> None:
        nonlocal disconnected
        while (await request.receive())["type"] != "http.disconnect":
            pass
        if not finished:
            disconnected = True
            task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await waiting
    except asyncio.CancelledError:
        if disconnected and task.uncancel() == 0:
            runtime.disconnects.inc()
            raise ClientDisconnected from None
        raise
    finally:
        finished = True
        watcher.cancel()


def _meta(request: Request, model: ServedModel) -> dict[str, Any]:
    started: float = request.state.started
    return {
        "model": model.name,
        "request_id": request.state.request_id,
        "processing_time_ms": round((time.perf_counter() - started) * 1000, 3),
    }


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


def _reply(body: BaseModel | bytes, results: Sequence[Result[Output]]) -> Response:
    """The JSON reply, serialized once by pydantic's Rust serializer, with the timing
    headers. Returning a Response skips FastAPI's validation of the returned model
    against `response_model`, which the route declares for the OpenAPI schema only."""
    headers = {
        "x-queue-time-ms": f"{max(r.queue_time_s for r in results) * 1000:.3f}",
        "x-inference-time-ms": f"{max(r.inference_time_s for r in results) * 1000:.3f}",
        "x-batch-size": str(max(r.batch_size for r in results)),
    }
    content = body if isinstance(body, bytes) else body.model_dump_json()
    return Response(content, media_type="application/json", headers=headers)


@router.post(
    "/predict",
    response_model=EmbeddingResponse | LabelResponse,
    summary="Predict for one text; batched with concurrent requests",
    responses=PREDICT_ERRORS,
    openapi_extra=_openapi(PredictRequest),
)
async def predict(request: Request) -> Response:
    runtime = _runtime(request)
    body = await _parse(request, PredictRequest)
    model, engine = _serving(runtime)
    limit = runtime.settings.max_text_chars
    _check_lengths([body.text], limit, "text")
    pair = None if body.text_pair is None else [body.text_pair]
    if pair is not None:
        _check_lengths(pair, limit, "text_pair")
    deadline = _deadline(engine, runtime, request)
    [item] = _encode(model, [body.text], pair, body)
    _check_tokens([item], model, runtime, "text", body.truncate)
    result = await _unless_disconnected(request, runtime, engine.submit(item, deadline=deadline))
    shaped = _shape(result.value, item, model.labels, body.all_scores)
    kind = LabelResponse if isinstance(shaped, Label) else EmbeddingResponse
    return _reply(kind.model_construct(**shaped.__dict__, **_meta(request, model)), [result])


@router.post(
    "/predict/batch",
    response_model=BatchResponse,
    summary="Predict for several texts; each is batched on its own, results in order",
    responses=PREDICT_ERRORS,
    openapi_extra=_openapi(BatchPredictRequest),
)
async def predict_batch(request: Request) -> Response:
    runtime = _runtime(request)
    body = await _parse(request, BatchPredictRequest)
    model, engine = _serving(runtime)
    _check_count(len(body.texts), runtime.settings.max_client_batch, "texts")
    limit = runtime.settings.max_text_chars
    _check_lengths(body.texts, limit, "texts")
    if body.text_pairs is not None:
        if len(body.text_pairs) != len(body.texts):
            raise _invalid(
                "text_pairs",
                f"{len(body.text_pairs)} text_pairs for {len(body.texts)} texts; send one "
                "second text per text",
            )
        _check_lengths(body.text_pairs, limit, "text_pairs")
    deadline = _deadline(engine, runtime, request)
    items = _encode(model, body.texts, body.text_pairs, body)
    _check_tokens(items, model, runtime, "texts", body.truncate)
    results = await _unless_disconnected(
        request, runtime, engine.submit_many(items, deadline=deadline)
    )
    shaped = [
        _shape(r.value, item, model.labels, body.all_scores)
        for r, item in zip(results, items, strict=True)
    ]
    # One model, one task: the results are all embeddings or all labels.
    typed = cast("list[Embedding] | list[Label]", shaped)
    return _reply(BatchResponse.model_construct(results=typed, **_meta(request, model)), results)


@router.post(
    "/rerank",
    response_model=list[RerankResult],
    summary="Score texts against a query with a cross-encoder, best first (TEI's shape)",
    responses={**PREDICT_ERRORS, 400: {"model": ErrorReply, "description": "Not JSON, or "
               "the model is not a reranker (wrong_task)."}},
    openapi_extra=_openapi(RerankRequest),
)  # fmt: skip
async def rerank(request: Request) -> Response:
    """Each (query, text) pair is one item in the queue: batched, length-grouped and
    failure-isolated like any other, so a long list does not wait behind itself."""
    runtime = _runtime(request)
    body = await _parse(request, RerankRequest)
    model, engine = _serving(runtime)
    if model.task != "rerank":
        raise WrongTask(
            f"this server runs a {model.task} model ({model.name}); /rerank needs a "
            "cross-encoder with one output score"
        )
    _check_count(len(body.texts), runtime.settings.max_client_batch, "texts")
    limit = runtime.settings.max_text_chars
    _check_lengths([body.query], limit, "query")
    _check_lengths(body.texts, limit, "texts")
    deadline = _deadline(engine, runtime, request)
    options = OutputOptions(raw_scores=body.raw_scores)
    items = _encode(model, [body.query] * len(body.texts), body.texts, options)
    _check_tokens(items, model, runtime, "texts", body.truncate)
    results = await _unless_disconnected(
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
    return _reply(_RANKED.dump_json(ranked, exclude_none=True), results)


_RANKED = TypeAdapter(list[RerankResult])


@router.get(
    "/health",
    response_model=Status,
    summary="Liveness: 503 when the engine died or a forward pass is stuck (restart me)",
)
async def health(runtime: RuntimeDep) -> Any:
    problem = runtime.liveness_problem()
    if problem is None:
        return Status(status="ok")
    return JSONResponse({"status": "failed", "detail": problem}, status_code=503)


@router.get(
    "/ready",
    response_model=Status,
    summary="Readiness: loaded, warmed, not draining and not saturated",
)
async def ready(runtime: RuntimeDep) -> Any:
    detail: str | None
    if (problem := runtime.liveness_problem()) is not None:
        status, detail = "failed", problem
    elif runtime.status != "ready":
        status, detail = runtime.status, runtime.error
    elif runtime.saturated:
        status, detail = "saturated", "the queue is nearly full; send traffic elsewhere"
    else:
        return Status(status="ready")
    return JSONResponse(
        {"status": status, "detail": detail}, status_code=503, headers={"Retry-After": "1"}
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(runtime: RuntimeDep) -> Response:
    return Response(generate_latest(runtime.registry), media_type=CONTENT_TYPE_LATEST)


def _batching(runtime: Runtime) -> Batching:
    config = runtime.engine.config if runtime.engine else runtime.settings.engine_config()
    return Batching.model_validate(config, from_attributes=True)


def _learned_cost(runtime: Runtime) -> dict[str, float] | None:
    cost = runtime.engine.cost_model.estimate() if runtime.engine else None
    if cost is None:
        return None
    return {"overhead_ms": cost.overhead_s * 1e3, "per_token_us": cost.per_token_s * 1e6}


@router.get("/model", summary="Model, device, compile state and batching settings")
async def model_info(runtime: RuntimeDep) -> dict[str, Any]:
    described = runtime.model.describe() if runtime.model else {}
    return {
        **described,
        "status": runtime.status,
        "batching": _batching(runtime).model_dump(),
        "learned_cost": _learned_cost(runtime),
        "memory_cap_tokens": runtime.engine.memory_cap if runtime.engine else None,
        "replicas": [
            {"index": r.index, "device": str(m.describe().get("device")), "alive": r.alive}
            for r, m in zip(
                runtime.engine.replicas if runtime.engine else [], runtime.models, strict=False
            )
        ],
        "limits": {
            name: getattr(runtime.settings, name)
            for name in (
                "max_text_chars",
                "truncate",
                "max_client_batch",
                "max_body_bytes",
                "request_timeout_s",
                "max_request_timeout_s",
                "watchdog_s",
                "rate_limit_rps",
                "rate_limit_burst",
            )
        },
    }


@router.get("/admin/batching", response_model=Batching, summary="Live batching settings")
async def get_batching(runtime: RuntimeDep) -> Batching:
    return _batching(runtime)


@router.patch("/admin/batching", response_model=Batching, summary="Change batching at run time")
async def patch_batching(patch: BatchingPatch, runtime: RuntimeDep) -> Batching:
    if runtime.engine is None:
        raise NotReady(f"the server is {runtime.status}")
    try:
        runtime.engine.reconfigure(**patch.model_dump(exclude_unset=True))
    except ValueError as exc:
        raise RequestValidationError(
            [{"loc": ("body",), "msg": str(exc), "type": "value_error"}]
        ) from None
    return _batching(runtime)
