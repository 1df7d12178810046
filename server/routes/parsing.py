"""What every inference route shares: reaching the runtime, parsing and checking the
body, the deadline, watching for a disconnect, and the reply with its timing headers."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Coroutine, Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
import orjson
from fastapi import Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from batcher import Lane, Result
from batcher.models import (
    Encoded,
    Encoder,
    Output,
)
from server.access import Tenancy
from server.calls import Call
from server.client import EngineHandle
from server.errors import ClientDisconnected, NotReady, Refused, WrongTask
from server.quotas import TenantEngine
from server.routes.chunking import combined, expand
from server.routes.headers import (
    PRIORITY_HEADER,
    ROUTE_KEY_HEADER,
    TIMEOUT_HEADER,
    lane_of,
    route_key,
)
from server.runtime import Runtime
from server.schemas import ErrorReply, request_limits
from server.served import Served
from server.tenants import PREDICT, Principal


async def get_runtime(request: Request) -> Runtime:
    # async on purpose: FastAPI runs a plain `def` dependency in its threadpool, a thread
    # hand-off on every request (seen in the profile of benchmarks/lab/overhead.py).
    runtime: Runtime = request.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]

ModelQuery = Annotated[
    str | None,
    Query(description="With several models: which one (its served name); default: the default."),
]


def runtime_of(request: Request) -> Runtime:
    """The predict routes' way to the runtime: a plain call. Their only parameter is the
    request, since solving even one dependency costs FastAPI more than the rest of the
    route (benchmarks/results/overhead-cpu-2core-2026-11-22.md)."""
    runtime: Runtime = request.state.runtime
    return runtime


def serving(
    runtime: Runtime, request: Request, model: str | None = None
) -> tuple[Served, EngineHandle]:
    """The version of the model a request names (`model`; None: the default) that
    answers it, by the model's route and the request's route key, and the engine its
    prediction goes to (behind the result cache, unless the request says
    `Cache-Control: no-cache`). The choice is kept in `request.state.call` for the reply
    (`reply`); a tenant's request sees the engine through its limits
    (`server.quotas.TenantEngine`). Raises UnknownModel (404), NotReady (503), and
    Refused (403) for a credential without the model's scope."""
    if runtime.status != "ready":
        raise NotReady(f"the server is {runtime.status}; retry when GET /ready says ready")
    served, shadows = runtime.route(model, lambda: route_key(request))
    who: Principal | None = getattr(request.state, "principal", None)
    if who is not None and not who.may_predict(served.name):
        tenancy: Tenancy = request.state.tenancy
        raise Refused(tenancy.forbidden(who, f"{PREDICT}:{served.name}"))
    call = Call(served, request.state.request_id, request.scope["path"], shadows)
    call.tenant = None if who is None else who.tenant
    request.state.call = call
    fresh = "no-cache" in request.headers.get("cache-control", "").lower()
    engine = served.engine_for(cached=not fresh)
    if who is None:
        return served, engine
    tenancy = request.state.tenancy
    return served, TenantEngine(engine, who, tenancy.ledger, tenancy.metrics)


def needs_task(model: Encoder, task: str, route: str, what: str) -> None:
    """400 wrong_task unless the served model does `task`."""
    if model.task != task:
        raise WrongTask(
            f"this server runs a {model.task} model ({model.name}); {route} needs {what}"
        )


def best_first(scores: Sequence[float], top_n: int | None) -> list[int]:
    """Indices by score, highest first (ties keep the request's order), the first
    `top_n`."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])[:top_n]


def loc(field: str, index: int, listed: bool | None = None) -> tuple[str | int, ...]:
    """Where an error is: a list field (`texts`, `text_pairs`, or `listed`) names the
    position too."""
    listed = field.endswith("s") if listed is None else listed
    return ("body", field, index) if listed else ("body", field)


def invalid(field: str, msg: str, kind: str = "value_error") -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", field), "msg": msg, "type": kind}])


async def submit_all(
    request: Request,
    runtime: Runtime,
    engine: EngineHandle,
    items: Sequence[Encoded],
    deadline: float,
    *,
    by_size: bool = True,
) -> list[Result[Output]]:
    """Every item through the queue, each batched on its own, results in order, in the
    request's lane (`lane_of`); the request is cancelled if its client goes away. A
    client batch larger than half the queue goes in waves of that size, so that it is
    split, not refused, however large the cap on client batches (--max-client-batch)."""
    call: Call = request.state.call
    if call.computed is not None:  # answered without the engine (static sparse queries)
        return [Result(value, 0.0, 0.0, 0) for value in call.computed]
    if call.chunks:  # texts over the window, as windows: computed, then combined
        flat, starts = expand(call, items)
        lane = lane_of(request, runtime, len(items), by_size=by_size)  # by inputs, not windows
        results = await _submit(request, runtime, engine, flat, deadline, lane)
        return combined(call, items, starts, results)
    lane = lane_of(request, runtime, len(items), by_size=by_size)
    return await _submit(request, runtime, engine, items, deadline, lane)


async def _submit(
    request: Request,
    runtime: Runtime,
    engine: EngineHandle,
    items: Sequence[Encoded],
    deadline: float,
    lane: Lane,
) -> list[Result[Output]]:
    wave = max(1, engine.config.max_queue_size // 2)
    if len(items) <= wave:
        return await unless_disconnected(
            request, runtime, engine.submit_many(items, deadline=deadline, lane=lane)
        )

    async def in_waves() -> list[Result[Output]]:
        results: list[Result[Output]] = []
        for start in range(0, len(items), wave):
            wave_items = items[start : start + wave]
            results += await engine.submit_many(wave_items, deadline=deadline, lane=lane)
        return results

    return await unless_disconnected(request, runtime, in_waves())


EncodingFormat = Literal["float", "base64"]


def vector(values: list[float], encoding_format: EncodingFormat) -> list[float] | str:
    """An embedding as JSON numbers, or as OpenAI sends base64: the little-endian float32
    bytes, base64-encoded (a quarter of the JSON's size, and no float formatting)."""
    if encoding_format == "float":
        return values
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")


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


def openapi_body(body: type[BaseModel], example: dict[str, Any] | None = None) -> dict[str, Any]:
    """The OpenAPI of a predict route, which reads its body and header itself."""
    content: dict[str, Any] = {"schema": body.model_json_schema()}
    if example is not None:
        content["example"] = example
    return {
        "requestBody": {"required": True, "content": {"application/json": content}},
        "parameters": [
            {
                "name": TIMEOUT_HEADER,
                "in": "header",
                "required": False,
                "schema": {"type": "number", "exclusiveMinimum": 0},
                "description": "This request's deadline in milliseconds, instead of the "
                "server's --request-timeout-s (at most --max-request-timeout-s). 504 when "
                "it passes.",
            },
            {
                "name": ROUTE_KEY_HEADER,
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "Keeps this caller on one version of the model while a route "
                "splits its traffic (a user or session id); default: the API key, else a "
                "random draw per request.",
            },
            {
                "name": PRIORITY_HEADER,
                "in": "header",
                "required": False,
                "schema": {"type": "string", "enum": ["interactive", "bulk"]},
                "description": "Its lane: bulk goes after interactive work, keeping a "
                "share of the device. Default: bulk for a call of at least --bulk-inputs "
                "inputs to embed or classify, else interactive.",
            },
        ],
    }


async def body_of(request: Request) -> bytes:
    """The request's body (read once, then cached); ClientDisconnected (499) if the client
    hung up before it arrived."""
    try:
        return await request.body()
    except ClientDisconnect:
        raise ClientDisconnected from None


async def parse(request: Request, schema: type[Body], runtime: Runtime) -> Body:
    """The body, parsed and validated in one pass by pydantic's own JSON parser.

    The server's request limits (text length, texts per call) are checked here too,
    by the schema's validators. The predict routes do this instead of declaring a body
    parameter: FastAPI would parse
    the JSON with the standard library and then validate the Python objects, which cost
    more than the rest of the route (see benchmarks/results/)."""
    raw = await body_of(request)
    settings = runtime.settings
    limits = request_limits(settings.max_text_chars, settings.max_client_batch)
    try:
        return schema.model_validate_json(raw, context=limits)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in errors]
        ) from None


WATCH_AFTER_S = 0.05
"""How long a request waits for its results before a task starts watching for its
client's disconnect. Most requests are answered sooner, and then no watcher is created,
started and cancelled: 5 % of a front-end's CPU per request with a model that costs
nothing. A disconnect in the meantime is not missed: the server remembers it, and the
watcher sees it at once. It only cancels the items up to 50 ms later, when they have
waited about one batch window; under load, when queues are long, items wait far longer."""


async def unless_disconnected(
    request: Request, runtime: Runtime, waiting: Coroutine[Any, Any, T]
) -> T:
    """Await `waiting`, cancelling it when the client goes away: its items leave the
    queue without being computed (ClientDisconnected). One watcher task per request that
    waits longer than `WATCH_AFTER_S`; the body was read already, so the next ASGI message
    can only be the disconnect."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    disconnected = finished = False
    watcher: asyncio.Task[None] | None = None

    async def watch() -> None:
        nonlocal disconnected
        while (await request.receive())["type"] != "http.disconnect":
            pass
        if not finished:
            disconnected = True
            task.cancel()

    def start_watching() -> None:
        nonlocal watcher
        watcher = loop.create_task(watch())

    timer = loop.call_later(WATCH_AFTER_S, start_watching)
    try:
        return await waiting
    except asyncio.CancelledError:
        if disconnected and task.uncancel() == 0:
            runtime.disconnects.inc()
            raise ClientDisconnected from None
        raise
    finally:
        finished = True
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


def meta(request: Request, model: Encoder) -> dict[str, Any]:
    started: float = request.state.started
    call: Call = request.state.call
    return {
        "model": model.name,
        "version": call.served.version,
        "request_id": request.state.request_id,
        "processing_time_ms": round((time.perf_counter() - started) * 1000, 3),
    }


def reply(
    request: Request,
    body: BaseModel | bytes,
    results: Sequence[Result[Output]],
    media_type: str = "application/json",
    extra: Mapping[str, str] | None = None,
) -> Response:
    """The JSON reply, serialized once by orjson (`to_json`), with the timing headers
    and the version that answered (`X-Model-Version`), and `extra` headers. Returning a
    Response skips FastAPI's validation of the returned model against `response_model`,
    which the route declares for the OpenAPI schema only."""
    call: Call = request.state.call
    runtime = runtime_of(request)
    if runtime.log is not None:
        started: float = request.state.started
        runtime.log.record(call, results, (time.perf_counter() - started) * 1e3)
    runtime.drift.observe(call.served, results)
    if call.shadows and not call.chunks:  # a shadow would cut what was chunked here
        runtime.shadows.mirror(call, results)
    headers = {
        "x-model-version": call.served.version,
        "x-queue-time-ms": f"{max(r.queue_time_s for r in results) * 1000:.3f}",
        "x-inference-time-ms": f"{max(r.inference_time_s for r in results) * 1000:.3f}",
        "x-batch-size": str(max(r.batch_size for r in results)),
        "x-cache": _cache_header(results),
    }
    if extra:
        headers.update(extra)
    content = body if isinstance(body, bytes) else to_json(body)
    return Response(content, media_type=media_type, headers=headers)


def _cache_header(results: Sequence[Result[Output]]) -> str:
    """`hit`: every input answered from the result cache; `partial`: some; `miss`: none."""
    hits = sum(r.cached for r in results)
    return "hit" if hits == len(results) else "partial" if hits else "miss"


def to_json(value: object) -> bytes:
    """`value` (reply models built with `model_construct`, lists, dicts, floats) as
    JSON: what pydantic's `model_dump_json` gives for these models, which have no
    aliases or custom serializers, in a third of its time for an embedding (pydantic
    checks each float against the field's union of a list and a base64 string)."""
    return orjson.dumps(value, default=_fields)


def _fields(value: object) -> dict[str, Any]:
    if isinstance(value, BaseModel):
        return value.__dict__
    raise TypeError  # orjson's way to say: not serializable
