"""Typed engine errors -> HTTP statuses, in one JSON shape:
`{"detail": ..., "type": ..., "request_id": ...}`. Never a traceback: an unexpected
exception is logged and answered 500 by `server.middleware.RequestContextMiddleware`.

Each protocol family hears its errors in its own shape, decided by the path in one place
(`error_body`): on `/v1/*` OpenAI's `{"error": {"message", "type", "param", "code"}}`,
with 400 for invalid input as OpenAI answers it (the SDK raises BadRequestError); on
TEI's routes our body plus TEI's `error` and `error_type`; on Cohere's v2 routes our
body plus Cohere's `id` and `message`, with 400 for invalid input; on the Open Inference
Protocol's (KServe v2) our body plus its `error`, with 400 for invalid input."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from batcher import (
    DeadlineExceeded,
    DeadlineUnreachable,
    EngineClosed,
    InferenceFailed,
    ItemTooLarge,
    QueueFull,
)

logger = logging.getLogger("microbatch.server")


class NotReady(Exception):
    """The model is still loading or warming up, or the server is draining (HTTP 503)."""


class WrongTask(Exception):
    """The route needs a task this server's model does not do (HTTP 400)."""


class NotFound(Exception):
    """The route exists, the thing asked for does not (HTTP 404)."""


class Conflict(Exception):
    """The request cannot be done in the server's present state, e.g. unloading the last
    version of a model that takes traffic (HTTP 409)."""


class UnknownModel(LookupError):
    """A request named a model this server does not serve (404, naming those it does)."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"the model {name!r} is not served here; served: {', '.join(known)}")
        self.name = name
        self.known = known


class TenantLimited(Exception):
    """A tenant's limit is reached (429): which one, and when to retry."""

    def __init__(self, limit: str, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after_s = retry_after_s

    @property
    def retry_after(self) -> str:
        return str(max(1, math.ceil(self.retry_after_s)))


class Refused(Exception):
    """A refusal a route raises as it is (a credential that lacks a model's scope)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(str(refusal.detail))
        self.refusal = refusal


class ClientDisconnected(Exception):
    """The client went away while its items waited; nobody reads the answer (499)."""


def _parse_failure(exc: HTTPException) -> str | None:
    """A clear reason for FastAPI's generic "error parsing the body" (400)."""
    cause = exc.__cause__
    if isinstance(cause, RecursionError):
        return "body is not valid JSON: nested too deeply"
    if isinstance(cause, UnicodeDecodeError):
        return "body is not valid JSON: not UTF-8"
    if isinstance(cause, ValueError):
        return f"body is not valid JSON: {cause}"
    return None


OPENAI_PREFIX = "/v1/"
TEI_PATHS = frozenset({
    "/", "/embed", "/embed_all", "/embed_sparse", "/rerank", "/similarity", "/tokenize",
    "/decode", "/info",
})  # fmt: skip
COHERE_V2_PATHS = frozenset({"/v2/rerank", "/v2/embed"})
"""Cohere's v2 API: invalid input is 400, and the reason is in `message`."""
KSERVE_PREFIXES = ("/v2/models/", "/v2/health/")


def is_kserve(path: str) -> bool:
    """The Open Inference Protocol's paths (`server.routes.kserve`): invalid input is
    400, and the reason is in `error`, where Triton's and KServe's clients read it."""
    return path == "/v2" or path.startswith(KSERVE_PREFIXES)


_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
_TEI_TYPES = {429: "Overloaded", 503: "Unhealthy", 500: "Backend", 504: "Backend"}


def _message(detail: Any) -> tuple[str, str | None]:
    """A readable message, and the parameter it is about, from a detail (a string, or
    the list of {loc, msg, type} of a validation error)."""
    if not isinstance(detail, list) or not detail:
        return str(detail), None
    parts, param = [], None
    for error in detail:
        where = [str(p) for p in error.get("loc", ()) if p not in ("body", "header")]
        if param is None and where:
            param = ".".join(where)
        parts.append(f"{'.'.join(where) or 'body'}: {error.get('msg')}")
    return "; ".join(parts), param


def error_status(status: int, path: str) -> int:
    """The status a refusal is sent with on `path`: OpenAI and Cohere answer invalid
    input 400."""
    if status == 422 and (
        path.startswith(OPENAI_PREFIX) or path in COHERE_V2_PATHS or is_kserve(path)
    ):
        return 400
    return status


def error_body(
    kind: str, detail: Any, request_id: str | None, status: int = 400, path: str = ""
) -> dict[str, Any]:
    """Every error's JSON, whoever answers it (routes, middleware, access), in the shape
    of the protocol that `path` belongs to."""
    if path.startswith(OPENAI_PREFIX):
        message, param = _message(detail)
        status = error_status(status, path)
        fallback = "server_error" if status >= 500 else "invalid_request_error"
        kind_of = _OPENAI_TYPES.get(status, fallback)
        return {"error": {"message": message, "type": kind_of, "param": param, "code": kind}}
    body = {"detail": detail, "type": kind, "request_id": request_id}
    if path in COHERE_V2_PATHS:
        body["id"] = request_id
        body["message"] = _message(detail)[0]
    if is_kserve(path):
        body["error"] = _message(detail)[0]
    if path in TEI_PATHS:
        body["error"] = _message(detail)[0]
        body["error_type"] = _TEI_TYPES.get(status, "Validation")
    return body


@dataclass(frozen=True, slots=True)
class Refusal:
    """An error answer: its status, stable `type`, detail and headers."""

    status: int
    kind: str
    detail: Any
    headers: Mapping[str, str] = field(default_factory=dict)

    def response(self, request_id: str | None, path: str = "") -> JSONResponse:
        body = error_body(self.kind, self.detail, request_id, self.status, path)
        status = error_status(self.status, path)
        return JSONResponse(body, status_code=status, headers=dict(self.headers) or None)


def error_response(
    request: Request,
    status: int,
    kind: str,
    detail: Any,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    call = getattr(request.state, "call", None)
    if call is not None and call.items:  # it failed after its inputs were tokenized
        log = getattr(getattr(request.state, "runtime", None), "log", None)
        if log is not None:
            log.record(call, None, None, kind)
    refusal = Refusal(status, kind, detail, headers or {})
    return refusal.response(request_id, request.url.path)


MAX_ERRORS_SHOWN = 20


def _unparsable(exc: RequestValidationError) -> str | None:
    """Why the body is not JSON at all (400), rather than JSON of the wrong shape (422)."""
    errors = exc.errors()
    if len(errors) != 1 or errors[0].get("type") != "json_invalid":
        return None
    error = errors[0]
    # pydantic's parser says "Invalid JSON: <reason>"; FastAPI's puts the reason in ctx.
    reason = error.get("ctx", {}).get("error") or str(error.get("msg", ""))
    return f"body is not valid JSON: {reason.removeprefix('Invalid JSON: ')}"


def _validation_detail(exc: RequestValidationError) -> list[dict[str, Any]]:
    # FastAPI's own shape, minus `input`, and at most MAX_ERRORS_SHOWN entries: a small
    # hostile body (20,000 unknown keys) must not buy a reply of megabytes.
    detail = []
    errors = exc.errors()
    for error in errors[:MAX_ERRORS_SHOWN]:
        item = {
            "loc": list(error.get("loc", ())),
            "msg": error.get("msg"),
            "type": error.get("type"),
        }
        detail.append(item)
    if len(errors) > MAX_ERRORS_SHOWN:
        more = len(errors) - MAX_ERRORS_SHOWN
        detail.append({"loc": ["body"], "msg": f"and {more} more", "type": "too_many_errors"})
    return detail


def install(app: FastAPI) -> None:
    """Register the handlers on `app`."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        unparsable = _unparsable(exc)
        if unparsable is not None:
            return error_response(request, 400, "invalid_json", unparsable)
        return error_response(request, 422, "invalid_input", _validation_detail(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        reason = _parse_failure(exc) if exc.status_code == 400 else None
        if reason is not None:
            return error_response(request, 400, "invalid_json", reason)
        return error_response(request, exc.status_code, "http_error", exc.detail, exc.headers)

    @app.exception_handler(WrongTask)
    async def wrong_task(request: Request, exc: WrongTask) -> JSONResponse:
        return error_response(request, 400, "wrong_task", str(exc))

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> JSONResponse:
        return error_response(request, 404, "not_found", str(exc))

    @app.exception_handler(Conflict)
    async def conflict(request: Request, exc: Conflict) -> JSONResponse:
        return error_response(request, 409, "conflict", str(exc))

    @app.exception_handler(UnknownModel)
    async def unknown_model(request: Request, exc: UnknownModel) -> JSONResponse:
        return error_response(request, 404, "model_not_found", str(exc))

    @app.exception_handler(ClientDisconnected)
    async def disconnected(request: Request, exc: ClientDisconnected) -> JSONResponse:
        # Nobody reads it; 499 (nginx's "client closed request") keeps the access log honest.
        return error_response(request, 499, "client_disconnected", "the client went away")

    @app.exception_handler(TenantLimited)
    async def tenant_limited(request: Request, exc: TenantLimited) -> JSONResponse:
        headers = {"Retry-After": exc.retry_after, "X-Limit": exc.limit}
        return error_response(request, 429, "rate_limited", str(exc), headers)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        r = exc.refusal
        return error_response(request, r.status, r.kind, r.detail, r.headers)

    @app.exception_handler(ItemTooLarge)
    async def too_large(request: Request, exc: ItemTooLarge) -> JSONResponse:
        return error_response(request, 422, "input_too_large", str(exc))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return error_response(request, 429, "queue_full", str(exc), {"Retry-After": "1"})

    @app.exception_handler(DeadlineUnreachable)
    async def unreachable(request: Request, exc: DeadlineUnreachable) -> JSONResponse:
        retry = str(max(1, round(exc.expected_wait_s - exc.allowed_s)))
        return error_response(
            request, 429, "deadline_unreachable", str(exc), {"Retry-After": retry}
        )

    @app.exception_handler(NotReady)
    async def not_ready(request: Request, exc: NotReady) -> JSONResponse:
        return error_response(request, 503, "not_ready", str(exc), {"Retry-After": "5"})

    @app.exception_handler(EngineClosed)
    async def closed(request: Request, exc: EngineClosed) -> JSONResponse:
        return error_response(request, 503, "unavailable", str(exc), {"Retry-After": "5"})

    @app.exception_handler(DeadlineExceeded)
    async def deadline(request: Request, exc: DeadlineExceeded) -> JSONResponse:
        return error_response(request, 504, "deadline_exceeded", str(exc))

    @app.exception_handler(InferenceFailed)
    async def failed(request: Request, exc: InferenceFailed) -> JSONResponse:
        request_id = getattr(request.state, "request_id", None)
        logger.error("inference failed for request %s: %r", request_id, exc.__cause__)
        return error_response(
            request,
            500,
            "inference_failed",
            f"the model failed on this input (request {request_id})",
        )
