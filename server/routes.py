"""The HTTP routes: validate, admit, await, shape the reply. No batching logic here."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from batcher import Engine, Result
from batcher.models import Classification, Encoded, Output
from server.errors import ClientDisconnected, NotReady
from server.runtime import Runtime, ServedModel
from server.schemas import (
    Batching,
    BatchingPatch,
    BatchPredictRequest,
    BatchResponse,
    Embedding,
    EmbeddingResponse,
    Label,
    LabelResponse,
    PredictRequest,
    Status,
)

router = APIRouter()


async def get_runtime(request: Request) -> Runtime:
    # async on purpose: FastAPI runs a plain `def` dependency in its threadpool, a thread
    # hand-off on every request (seen in the profile of benchmarks/overhead.py).
    runtime: Runtime = request.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def _serving(runtime: Runtime) -> tuple[ServedModel, Engine[Encoded, Output]]:
    if runtime.status != "ready" or runtime.model is None or runtime.engine is None:
        raise NotReady(f"the server is {runtime.status}; retry when GET /ready says ready")
    return runtime.model, runtime.engine


def _check_lengths(texts: Sequence[str], limit: int, field: str) -> None:
    errors = [
        {
            "loc": ("body", field, i) if field == "texts" else ("body", field),
            "msg": f"text has {len(t)} characters; the limit is {limit} (--max-text-chars)",
            "type": "string_too_long",
        }
        for i, t in enumerate(texts)
        if len(t) > limit
    ]
    if errors:
        raise RequestValidationError(errors)


def _check_tokens(
    items: Sequence[Encoded], model: ServedModel, runtime: Runtime, field: str
) -> None:
    if runtime.settings.truncate:
        return
    errors = [
        {
            "loc": ("body", field, i) if field == "texts" else ("body", field),
            "msg": f"text is over the model's limit of {model.max_tokens} tokens "
            "(the server runs with --no-truncate)",
            "type": "too_many_tokens",
        }
        for i, item in enumerate(items)
        if item.truncated
    ]
    if errors:
        raise RequestValidationError(errors)


TimeoutHeader = Annotated[
    float | None,
    Header(
        alias="x-request-timeout-ms",
        gt=0,
        description="This request's deadline in milliseconds, instead of the server's "
        "--request-timeout-s (at most --max-request-timeout-s). 504 when it passes.",
    ),
]


def _deadline(engine: Engine[Encoded, Output], runtime: Runtime, timeout_ms: float | None) -> float:
    settings = runtime.settings
    timeout_s = settings.request_timeout_s
    if timeout_ms is not None:
        if not math.isfinite(timeout_ms) or timeout_ms / 1000 > settings.max_request_timeout_s:
            limit = settings.max_request_timeout_s * 1000
            raise RequestValidationError(
                [
                    {
                        "loc": ("header", "x-request-timeout-ms"),
                        "msg": f"must be at most {limit:g} (--max-request-timeout-s)",
                        "type": "less_than_equal",
                    }
                ]
            )
        timeout_s = timeout_ms / 1000
    return engine.clock() + timeout_s


@asynccontextmanager
async def _cancelled_on_disconnect(request: Request, runtime: Runtime) -> AsyncIterator[None]:
    """Cancel the body of the `async with` when the client goes away: its items leave
    the queue without being computed. One watcher task per request; the body was read
    already, so the next ASGI message can only be the disconnect."""
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
        yield
    except asyncio.CancelledError:
        if disconnected and task.uncancel() == 0:
            runtime.disconnects.inc()
            raise ClientDisconnected from None
        raise
    finally:
        finished = True
        watcher.cancel()


def _elapsed_ms(request: Request) -> float:
    started: float = request.state.started
    return round((time.perf_counter() - started) * 1000, 3)


def _shape(
    value: Output, item: Encoded, labels: Sequence[str], all_scores: bool
) -> Embedding | Label:
    if isinstance(value, Classification):
        scores = dict(zip(labels, value.probs, strict=True)) if all_scores else None
        return Label(label=value.label, score=value.score, scores=scores, truncated=item.truncated)
    return Embedding(embedding=value, truncated=item.truncated)


def _timing_headers(response: Response, results: Sequence[Result[Output]]) -> None:
    response.headers["x-queue-time-ms"] = f"{max(r.queue_time_s for r in results) * 1000:.3f}"
    inference_s = max(r.inference_time_s for r in results)
    response.headers["x-inference-time-ms"] = f"{inference_s * 1000:.3f}"
    response.headers["x-batch-size"] = str(max(r.batch_size for r in results))


@router.post(
    "/predict",
    response_model=EmbeddingResponse | LabelResponse,
    summary="Predict for one text; batched with concurrent requests",
)
async def predict(
    body: PredictRequest,
    request: Request,
    response: Response,
    runtime: RuntimeDep,
    timeout_ms: TimeoutHeader = None,
) -> Any:
    model, engine = _serving(runtime)
    _check_lengths([body.text], runtime.settings.max_text_chars, "text")
    deadline = _deadline(engine, runtime, timeout_ms)
    item = model.encode(body.text)
    _check_tokens([item], model, runtime, "text")
    async with _cancelled_on_disconnect(request, runtime):
        result = await engine.submit(item, deadline=deadline)
    _timing_headers(response, [result])
    shaped = _shape(result.value, item, model.labels, body.all_scores)
    meta = {
        "model": model.name,
        "request_id": request.state.request_id,
        "processing_time_ms": _elapsed_ms(request),
    }
    if isinstance(shaped, Label):
        return LabelResponse(**shaped.__dict__, **meta)
    return EmbeddingResponse(**shaped.__dict__, **meta)


@router.post(
    "/predict/batch",
    response_model=BatchResponse,
    summary="Predict for several texts; each is batched on its own, results in order",
)
async def predict_batch(
    body: BatchPredictRequest,
    request: Request,
    response: Response,
    runtime: RuntimeDep,
    timeout_ms: TimeoutHeader = None,
) -> Any:
    model, engine = _serving(runtime)
    limit = runtime.settings.max_client_batch
    if len(body.texts) > limit:
        raise RequestValidationError(
            [
                {
                    "loc": ("body", "texts"),
                    "msg": f"{len(body.texts)} texts; the limit is {limit} (--max-client-batch)",
                    "type": "too_long",
                }
            ]
        )
    _check_lengths(body.texts, runtime.settings.max_text_chars, "texts")
    deadline = _deadline(engine, runtime, timeout_ms)
    items = model.encode_many(body.texts)
    _check_tokens(items, model, runtime, "texts")
    async with _cancelled_on_disconnect(request, runtime):
        results = await engine.submit_many(items, deadline=deadline)
    _timing_headers(response, results)
    shaped = [
        _shape(r.value, item, model.labels, body.all_scores)
        for r, item in zip(results, items, strict=True)
    ]
    return BatchResponse(
        results=shaped,
        model=model.name,
        request_id=request.state.request_id,
        processing_time_ms=_elapsed_ms(request),
    )


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
