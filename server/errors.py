"""Typed engine errors -> HTTP statuses, in one JSON shape:
`{"detail": ..., "type": ..., "request_id": ...}`. Never a traceback."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from batcher import (
    DeadlineExceeded,
    EngineClosed,
    InferenceFailed,
    ItemTooLarge,
    QueueFull,
)

logger = logging.getLogger("microbatch.server")


class NotReady(Exception):
    """The model is still loading or warming up, or the server is draining (HTTP 503)."""


def error_response(
    request: Request,
    status: int,
    kind: str,
    detail: Any,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    body = {"detail": detail, "type": kind, "request_id": request_id}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_detail(exc: RequestValidationError) -> list[dict[str, Any]]:
    # FastAPI's own shape, minus `input`: echoing a megabyte of bad input back is a cost.
    detail = []
    for error in exc.errors():
        item = {
            "loc": list(error.get("loc", ())),
            "msg": error.get("msg"),
            "type": error.get("type"),
        }
        if error.get("type") == "json_invalid":
            item["msg"] = f"body is not valid JSON: {error.get('ctx', {}).get('error')}"
        detail.append(item)
    return detail


def install(app: FastAPI) -> None:
    """Register the handlers on `app`."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, 422, "invalid_input", _validation_detail(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(request, exc.status_code, "http_error", exc.detail, exc.headers)

    @app.exception_handler(ItemTooLarge)
    async def too_large(request: Request, exc: ItemTooLarge) -> JSONResponse:
        return error_response(request, 422, "input_too_large", str(exc))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return error_response(request, 429, "queue_full", str(exc), {"Retry-After": "1"})

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

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", None)
        logger.exception("unhandled error in request %s", request_id)
        return error_response(
            request, 500, "internal_error", f"internal error (request {request_id})"
        )
