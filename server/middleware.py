"""Pure ASGI middleware (no BaseHTTPMiddleware: it costs a task per request):
request ids, request timing, the body size limit and the JSON content type.

The body limit is ours rather than Starlette's `max_body_size`, which answers in plain
text and outside the app, so the 413 would carry neither our JSON shape nor the id."""

from __future__ import annotations

import contextvars
import email.message
import logging
import random
import re
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batcher import SECONDS_BUCKETS
from server.access import KSERVE_INFER, KSERVE_MODELS, is_queued_route
from server.calls import Call
from server.errors import Refusal

logger = logging.getLogger("microbatch.server")

REQUEST_ID_HEADER = b"x-request-id"
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "microbatch_request_id", default=None
)
"""The id of the request being handled, for log records (see `server.logs`)."""
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


class RequestContextMiddleware:
    """Gives every request an id (the client's `X-Request-ID` when it is sane), returns it
    in `X-Request-ID`, refuses bodies over `max_body_bytes` (413), and times the request
    by route and status. The seconds of each answered request on a queued route (one
    that goes through the engine) are also appended to `latencies`, for the dashboard's
    exact percentiles."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        image_body_bytes: int | None = None,
        registry: CollectorRegistry,
        latencies: deque[float] | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.image_body_bytes = max(max_body_bytes, image_body_bytes or 0)
        """The limit of a server that serves an image model (`Settings.image_body_bytes`)."""
        self.latencies = latencies
        self.duration = Histogram(
            "microbatch_request_duration_seconds",
            "HTTP requests: time from arrival to the last byte of the reply.",
            ["route", "status"],
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self._children: dict[tuple[str, int], Histogram] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        head = _Head.read(scope["headers"])
        request_id = head.request_id or _new_id()
        REQUEST_ID.set(request_id)
        # The request's own copy of the lifespan state, as uvicorn gives each request:
        # a server that hands every request the same dict (asgi-lifespan's, in the
        # tests) would otherwise let concurrent requests overwrite each other's ids and
        # calls.
        state = scope["state"] = {**scope.get("state", {})}
        state["request_id"], state["started"] = request_id, started
        id_header = (REQUEST_ID_HEADER, request_id.encode("latin-1"))
        status = 500
        started_reply = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_reply
            if message["type"] == "http.response.start":
                status, started_reply = message["status"], True
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        try:
            limit = self._limit(state, head)
            refusal = self._refusal(scope, head, limit)
            if refusal is not None:
                await refusal.response(request_id, scope["path"])(scope, receive, send_with_id)
            else:
                # A declared length was checked above, and the server reads no more than
                # it; only a chunked body must be counted as it streams in.
                limited = (
                    receive if head.content_length is not None else self._limited(receive, limit)
                )
                await self.app(scope, limited, send_with_id)
        except Exception:
            # Logged once, here, with the request id; the client gets the id, not the
            # traceback. Caught before Starlette's ServerErrorMiddleware, which would
            # re-raise it to the server to be logged a second time.
            logger.exception("unhandled error in request %s", request_id)
            if started_reply:
                raise
            detail = f"internal error (request {request_id})"
            refusal = Refusal(500, "internal_error", detail)
            await refusal.response(request_id, scope["path"])(scope, receive, send_with_id)
        finally:
            call: Call | None = state.get("call")
            if call is not None:  # its model version may unload now (`server.calls`)
                call.release()
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            took_s = time.perf_counter() - started
            self._timer(path, status).observe(took_s)
            if status == 200 and self.latencies is not None and is_queued_route(path):
                self.latencies.append(took_s)

    def _timer(self, path: str, status: int) -> Histogram:
        """The histogram child for (route, status), looked up once (`labels` takes a lock
        and builds its key on every call)."""
        key = (path, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.duration.labels(path, str(status))
        return child

    def _limit(self, state: dict[str, Any], head: _Head) -> int:
        """The body limit: `max_body_bytes`, or the larger one of a server that serves
        an image model (looked up only for a body that needs it)."""
        if self.image_body_bytes == self.max_body_bytes:
            return self.max_body_bytes
        if head.content_length is not None and head.content_length <= self.max_body_bytes:
            return self.max_body_bytes
        runtime = state.get("runtime")
        takes_images = runtime is not None and runtime.takes_images
        return self.image_body_bytes if takes_images else self.max_body_bytes

    def _refusal(self, scope: Scope, head: _Head, limit: int) -> Refusal | None:
        """A request refused before its body is read: too large, or not JSON."""
        if (head.content_length or 0) > limit:
            return Refusal(413, "http_error", self._too_large(limit))
        if scope["method"] in _BODY_METHODS and not _is_json(head.content_type):
            if _is_binary_infer(scope["path"], head.content_type):
                return None
            if _is_upload(scope["path"], head.content_type):
                return None
            detail = "send the body as Content-Type: application/json"
            return Refusal(415, "unsupported_media_type", detail)
        return None

    def _too_large(self, limit: int) -> str:
        if limit > self.max_body_bytes:
            return f"request body is over {limit} bytes (--max-image-bytes, in base64)"
        return f"request body is over {limit} bytes (--max-body-bytes)"

    def _limited(self, receive: Receive, limit: int) -> Receive:
        """Counts a streamed (chunked) body; FastAPI passes the HTTPException through."""
        seen = 0

        async def receive_limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, self._too_large(limit))
            return message

        return receive_limited


@dataclass(slots=True)
class _Head:
    """The request headers the middleware reads, found in one pass."""

    content_length: int | None = None
    content_type: bytes | None = None
    request_id: str | None = None

    @classmethod
    def read(cls, headers: Iterable[tuple[bytes, bytes]]) -> _Head:
        head = cls()
        for name, value in headers:
            if name == b"content-length":
                head.content_length = int(value) if value.isdigit() else 0
            elif name == b"content-type":
                head.content_type = value
            elif name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _CLIENT_ID.fullmatch(candidate):
                    head.request_id = candidate
        return head


def _new_id() -> str:
    """32 hex digits, unique in practice: ids name requests in logs and replies, and
    guard nothing, so they come from random's generator (seeded from os.urandom, and
    again in each forked child), not from `secrets`, whose os.urandom call cost 3 % of a
    front-end's CPU per request (py-spy)."""
    return f"{random.getrandbits(128):032x}"


def _is_binary_infer(path: str, content_type: bytes | None) -> bool:
    """An Open Inference Protocol request with binary tensors: Triton's clients send it
    with no content type, or as application/octet-stream."""
    binary = content_type is None or content_type.lower().startswith(b"application/octet-stream")
    return binary and path.startswith(KSERVE_MODELS) and path.endswith(KSERVE_INFER)


def _is_upload(path: str, content_type: bytes | None) -> bool:
    """An image uploaded as a file to /predict (`server.routes.uploads`)."""
    return (
        path == "/predict"
        and content_type is not None
        and content_type.lower().startswith(b"multipart/form-data")
    )


def _is_json(value: bytes | None) -> bool:
    if value is None:
        return False
    if value == b"application/json" or value.startswith(b"application/json;"):
        return True  # the common case, without parsing
    message = email.message.Message()
    message["content-type"] = value.decode("latin-1")
    subtype = message.get_content_subtype()
    is_app = message.get_content_maintype() == "application"
    return is_app and (subtype == "json" or subtype.endswith("+json"))
